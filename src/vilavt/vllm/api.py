"""Python API of the vLLM backend, mirroring the transformers model's `generate` / `chat`.

    from vilavt.vllm.api import ViLaVTVLLM
    engine = ViLaVTVLLM.load("path/to/checkpoint")                  # a vllm.LLM inside
    answer, trace = engine.chat("photo.jpg", "What is written on the sign?")
    out = engine.generate(**inputs, images=[[original]], max_rounds=5, return_dict_in_generate=True)

Same inputs, outputs (`ViLaVTGenerateOutput`: sequences, sampled_mask, traces, episodes, logprobs) and
rules as `ViLaVTForConditionalGeneration.generate`; each episode also has `vllm_requests` (one
`RequestStats` per turn: prompt tokens and prefix-cache hits as vLLM counted them).
"""

import copy
import os
from pathlib import Path

import torch
from transformers import GenerationConfig

from ..remote_code.generation_vilavt import ViLaVTGenerateOutput, episodes_from_inputs
from ..remote_code.modeling_vilavt import ViLaVTForConditionalGeneration
from ..remote_code.processing_vilavt import ViLaVTProcessor
from . import check_backend

check_backend()  # one clear error naming what is missing, before the imports that need vLLM

from .loop import VLLMChatSession  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = ViLaVTForConditionalGeneration.DEFAULT_MAX_NEW_TOKENS


def load_engine(model, *, dtype: str = "auto", max_model_len: int | None = None, max_images: int = 64, **llm_kwargs):
    """A `vllm.LLM` for a ViLaVT checkpoint folder, set up for the chatting loop: prefix caching on,
    `max_images` image items per request, the per-conversation logits-processor adapter, and the engine
    core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set: the adapter's registry lives
    here). Raises `VLLMBackendError` naming what is missing when vLLM or the plugin is not usable."""
    check_backend()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from .logits import TransformersLogitsProcessors

    llm_kwargs.setdefault("enable_prefix_caching", True)
    llm_kwargs.setdefault("limit_mm_per_prompt", {"image": max_images})
    processors = list(llm_kwargs.pop("logits_processors", []) or [])
    return LLM(
        model=str(model),
        dtype=dtype,
        max_model_len=max_model_len,
        logits_processors=[TransformersLogitsProcessors, *processors],
        **llm_kwargs,
    )


class ViLaVTVLLM:
    """`generate` and `chat` of the ViLaVT chatting loop on a vLLM engine.

    Args:
        llm: a `vllm.LLM` serving a ViLaVT checkpoint (see `load_engine`).
        processor: the ViLaVT processor (default: the checkpoint's).
        generation_config: defaults for `generate` (default: the checkpoint's `generation_config.json`).
    """

    DEFAULT_MAX_NEW_TOKENS = DEFAULT_MAX_NEW_TOKENS

    def __init__(self, llm, processor: ViLaVTProcessor | None = None, generation_config: GenerationConfig | None = None):
        self.llm = llm
        path = llm.llm_engine.model_config.model
        self.config = llm.llm_engine.model_config.hf_config
        self.processor = processor or ViLaVTProcessor.from_pretrained(path)
        if generation_config is None:
            try:
                generation_config = GenerationConfig.from_pretrained(path)
            except OSError:
                generation_config = GenerationConfig(eos_token_id=self.config.text_config.eos_token_id)
        self.generation_config = generation_config
        self.device = torch.device("cpu")  # where inputs live; the engine owns its own devices
        self.name_or_path = path

    @classmethod
    def load(cls, model, processor=None, **engine_kwargs) -> "ViLaVTVLLM":
        return cls(load_engine(model, **engine_kwargs), processor)

    def _chat_processor(self, processor=None) -> ViLaVTProcessor:
        if processor is not None:
            self.processor = processor
        return self.processor

    def _generation_config(self, generation_config, kwargs) -> GenerationConfig:
        config = copy.deepcopy(generation_config or self.generation_config)
        unknown = config.update(**kwargs)
        if unknown:
            raise ValueError(f"generate() got unexpected arguments: {sorted(unknown)}")
        if config.num_beams not in (None, 1):
            raise ValueError("beam search is not supported by the ViLaVT tool loop; use greedy or sampling")
        if config.eos_token_id is None:
            config.eos_token_id = self.config.text_config.eos_token_id
        if config.pad_token_id is None:
            config.pad_token_id = self.processor.tokenizer.pad_token_id or 0
        placeholders = {self.config.image_token_id, self.config.video_token_id}
        config.suppress_tokens = sorted(set(config.suppress_tokens or []) | placeholders)
        return config

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        query_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        image_to_query_mapping: torch.LongTensor | None = None,
        *,
        images: list | None = None,
        processor: ViLaVTProcessor | None = None,
        max_rounds: int = 5,
        max_regions: int = 8,
        max_turn_tokens: int | None = None,
        output_logprobs: bool = False,
        generation_config: GenerationConfig | None = None,
        logits_processor=None,
        logits_processor_factory=None,
        hashing: str = "per_image",
        seed: int | None = None,
        mm_token_type_ids=None,
        **kwargs,
    ):
        """As `ViLaVTForConditionalGeneration.generate`, on vLLM. Extra: `logits_processor_factory(row)` builds
        one row's processors (e.g. a scripted policy per conversation), `hashing` ("per_image" or "authors",
        for measurements), `seed` for vLLM's per-request sampling. Not supported: `stopping_criteria`,
        `streamer`, `incremental=False`, `output_logits`."""
        for name in ("stopping_criteria", "streamer", "output_logits", "incremental"):
            if kwargs.get(name) not in (None, True if name == "incremental" else None):
                raise ValueError(f"the vLLM loop does not support {name}={kwargs[name]!r}")
            kwargs.pop(name, None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (use the processor's apply_chat_template(..., tokenize=True))")
        processor = self._chat_processor(processor)
        config = self._generation_config(generation_config, kwargs)
        episodes = episodes_from_inputs(
            self.config, processor, input_ids, attention_mask, pixel_values, image_grid_thw,
            query_ids, query_attention_mask, image_to_query_mapping, images,
        )  # fmt: skip
        if config.bad_words_ids:  # transformers turns it into a logits processor inside generate; so do we
            from transformers import LogitsProcessorList, NoBadWordsLogitsProcessor

            logits_processor = LogitsProcessorList(
                [*(logits_processor or []), NoBadWordsLogitsProcessor(config.bad_words_ids, config.eos_token_id)]
            )
        copies = config.num_return_sequences or 1
        rows = [row for row in range(len(episodes)) for _ in range(copies)]
        episodes = [ep if i == 0 else ep.clone() for ep in episodes for i in range(copies)]
        session = VLLMChatSession(
            self.llm,
            processor,
            config,
            logits_processor=logits_processor,
            logits_processor_factory=logits_processor_factory,
            max_rounds=max_rounds,
            max_regions=max_regions,
            max_new_tokens=config.max_new_tokens or self.DEFAULT_MAX_NEW_TOKENS,
            max_turn_tokens=max_turn_tokens,
            output_logprobs=output_logprobs,
            hashing=hashing,
            seed=seed,
        )
        session.run(episodes, rows)
        return generate_output(input_ids, episodes, copies, session.pad_id, config, output_logprobs)

    # The transformers model's `chat`, the same function: it renders the question, calls `self.generate`.
    chat = ViLaVTForConditionalGeneration.chat


def generate_output(input_ids, episodes, copies, pad, config, output_logprobs) -> ViLaVTGenerateOutput | torch.Tensor:
    """`generate`'s return value from finished episodes, laid out as the transformers loop lays it out."""
    prompts = input_ids.repeat_interleave(copies, dim=0).cpu()
    width = prompts.shape[1] + max(ep.new_tokens for ep in episodes)
    sequences = torch.full((len(episodes), width), pad, dtype=torch.long)
    sampled_mask = torch.zeros((len(episodes), width), dtype=torch.bool)
    for row, ep in enumerate(episodes):
        new = ep.ids[ep.prompt_length :]
        sequences[row, : prompts.shape[1]] = prompts[row]
        sequences[row, prompts.shape[1] : prompts.shape[1] + len(new)] = torch.tensor(new, dtype=torch.long)
        sampled_mask[row, prompts.shape[1] : prompts.shape[1] + len(new)] = torch.tensor(
            ep.sampled[ep.prompt_length :], dtype=torch.bool
        )
    if not config.return_dict_in_generate:
        return sequences
    return ViLaVTGenerateOutput(
        sequences=sequences,
        sampled_mask=sampled_mask,
        traces=[ep.trace for ep in episodes],
        episodes=episodes,
        logprobs=[torch.tensor(ep.logprobs) for ep in episodes] if output_logprobs else None,
    )


def engine_name(llm) -> str:
    return Path(llm.llm_engine.model_config.model).name


__all__ = ["load_engine", "ViLaVTVLLM", "generate_output"]

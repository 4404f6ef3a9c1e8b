"""Python API of the vLLM backend, mirroring the transformers model's `generate` / `chat`.

    from vilavt.vllm.api import ViLaVTVLLM
    engine = ViLaVTVLLM.load("path/to/checkpoint")                  # a vllm.LLM inside
    answer, trace = engine.chat("photo.jpg", "What is written on the sign?")
    out = engine.generate(**inputs, images=[[original]], max_rounds=5, return_dict_in_generate=True)

Same inputs (`generate(**processor_outputs)` crops from the `originals` they carry), outputs
(`ViLaVTGenerateOutput`: sequences, sampled_mask, traces, episodes, logprobs) and rules as
`ViLaVTForConditionalGeneration.generate`; each episode also has `vllm_requests` (one `RequestStats` per
turn: prompt tokens and prefix-cache hits as vLLM counted them).
"""

import copy
import json
import os
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessorList

from ..remote_code.generation_vilavt import ViLaVTChatMixin, check_loop_arguments, episodes_from_inputs
from ..remote_code.processing_vilavt import ViLaVTProcessor
from . import check_backend

check_backend()  # one clear error naming what is missing, before the imports that need vLLM

from .loop import VLLMChatSession  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = ViLaVTChatMixin.DEFAULT_MAX_NEW_TOKENS

# Generation settings transformers turns into logits processors that the vLLM loop does not apply (besides those
# the transformers loop itself refuses, `check_loop_arguments`): an error rather than a silent difference.
_VLLM_UNSUPPORTED = {
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "typical_p": 1.0,
    "encoder_repetition_penalty": 1.0, "renormalize_logits": False, "remove_invalid_values": False,
    "watermarking_config": None, "stop_strings": None, "max_time": None, "output_logits": False,
    "output_scores": False,
}  # fmt: skip


def load_engine(model, *, dtype: str | None = None, max_model_len: int | None = None, max_images: int = 64,
                **llm_kwargs):
    """A `vllm.LLM` for a ViLaVT checkpoint folder, set up for the chatting loop: prefix caching on,
    `max_images` image items per request, and the engine core in this process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set: per-conversation logits processors and log-prob records
    live here). `dtype` defaults to the checkpoint's (vLLM's "auto" would run a float32 checkpoint in 16 bits,
    unlike the transformers model). Raises `VLLMBackendError` naming what is missing when vLLM or the plugin is
    not usable."""
    check_backend()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    if dtype is None:
        config = Path(model) / "config.json"
        saved = json.loads(config.read_text()) if config.is_file() else {}
        dtype = saved.get("dtype") or saved.get("torch_dtype") or "auto"

    llm_kwargs.setdefault("enable_prefix_caching", True)
    llm_kwargs.setdefault("limit_mm_per_prompt", {"image": max_images})
    return LLM(model=str(model), dtype=dtype, max_model_len=max_model_len, **llm_kwargs)


def generation_defaults(config: GenerationConfig) -> GenerationConfig:
    """`config` with transformers' global defaults for what it leaves unset (as `generate` fills them)."""
    for key, value in GenerationConfig._get_default_generation_params().items():
        if getattr(config, key, None) is None and value is not None:
            setattr(config, key, value)
    return config


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

    def _chat_processor(self, processor=None, required: bool = True) -> ViLaVTProcessor:
        if processor is not None:
            self.processor = processor
        return self.processor

    def _generation_config(self, generation_config, kwargs) -> GenerationConfig:
        config = copy.deepcopy(generation_config or self.generation_config)
        unknown = config.update(**kwargs)
        config = generation_defaults(config)
        check_loop_arguments(config, kwargs, unknown, None)
        unsupported = sorted(name for name, default in _VLLM_UNSUPPORTED.items() if getattr(config, name, default) not in (None, default))
        if unsupported:
            raise ValueError(f"the vLLM loop does not support {', '.join(unsupported)}; use the transformers model")
        if config.eos_token_id is None:
            config.eos_token_id = self.config.text_config.eos_token_id
        if config.pad_token_id is None:
            config.pad_token_id = self.processor.tokenizer.pad_token_id or 0
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
        originals: list | None = None,
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
        """As `ViLaVTForConditionalGeneration.generate` with the tool loop, on vLLM. Extra:
        `logits_processor_factory(row)` builds one row's processors (e.g. a scripted policy per conversation),
        `hashing` ("per_image" or "authors", for measurements), `seed` for vLLM's per-request sampling. Not
        supported (a one-line error): `stopping_criteria`, `streamer`, `incremental=False`, `tool_loop=False`,
        `stop_strings`, `max_time`, `output_logits`, `output_scores` and the settings in `_VLLM_UNSUPPORTED`."""
        for name, default in (("stopping_criteria", None), ("streamer", None), ("incremental", True), ("tool_loop", True)):
            if kwargs.get(name, default) is not default:
                raise ValueError(f"the vLLM loop does not support {name}={kwargs[name]!r}")
            kwargs.pop(name, None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (use the processor's apply_chat_template(..., tokenize=True))")
        processor = self._chat_processor(processor)
        config = self._generation_config(generation_config, kwargs)
        episodes = episodes_from_inputs(
            self.config, processor, input_ids, attention_mask, pixel_values, image_grid_thw,
            query_ids, query_attention_mask, image_to_query_mapping, originals if images is None else images,
        )  # fmt: skip
        if config.bad_words_ids:  # transformers turns it into a logits processor inside generate; so do we
            from transformers import NoBadWordsLogitsProcessor

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
            self.config,
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
        return session.output(input_ids.repeat_interleave(copies, dim=0), episodes, output_logprobs)

    # The transformers model's `chat`, the same function: it renders the question, calls `self.generate`.
    chat = ViLaVTChatMixin.chat


__all__ = ["load_engine", "ViLaVTVLLM", "generation_defaults"]

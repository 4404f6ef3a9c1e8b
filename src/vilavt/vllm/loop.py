"""The chatting loop on vLLM, token in, token out.

Each assistant turn is one vLLM request whose prompt is the conversation's token ids so far (the
previous prompt + the sampled ids + the tool-response ids; nothing is re-tokenised) and whose image
items are the originals (empty query) and every crop so far (its call's query). vLLM's prefix cache
then serves everything before the new tool response, and its encoder runs only on the new crops,
because every item's hash covers only its own image, query and call (`processing.py`).

The rules are the transformers loop's, run by the same code: `ChatSession.stop_reason` decides where a
turn ends (token by token over what vLLM sampled), `ChatSession.end_turn` acts on the ended turn (answer
its tool call through `tool_response` — parse, crop from the originals, render through the chat
template, errors become tool-response text — under the same round and token budgets, or end the
episode), and `Episode` / `Trace` record it all. Conversations are in flight together on vLLM's engine:
a finished turn is answered and the next request submitted while the others decode.
"""

import itertools
import time
import types
from dataclasses import dataclass, field

import torch
from transformers.generation import LogitsProcessorList, StoppingCriteriaList

from ..remote_code.generation_vilavt import ChatSession, Episode
from ..remote_code.images_vilavt import pixels_to_images
from ..remote_code.protocol_vilavt import ANSWER_CLOSE, TOOL_CLOSE
from . import VLLMBackendError
from . import logits as vllm_logits
from .processing import authors_hashing_kwargs

_runs = itertools.count()


@dataclass
class RequestStats:
    """One assistant turn as vLLM served it: from vLLM's own per-request counter `num_cached_tokens`."""

    prompt_tokens: int
    cached_tokens: int
    images: int  # image items in the request
    new_images: int  # items added since the previous turn (the only ones whose features are new)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class VLLMState:
    items: list  # vLLM image items of the conversation so far
    queries: list = field(default_factory=list)  # every query so far (for the authors' hashing)
    requests: list = field(default_factory=list)  # RequestStats per turn
    new_images: int = 0  # items added since the last request
    pending_images: int = 0  # new items of the request in flight
    processors: str | None = None  # registry key of this conversation's logits processors (vilavt.vllm.logits)
    record: str | None = None  # registry key of the request in flight's LogprobRecord


def original_items(episode: Episode, image_processor) -> list[dict]:
    """The conversation's original images as vLLM items (empty query: f0), rebuilt from the prompt's patch
    rows (exact for float32 rows), so vLLM encodes exactly the pixels the prompt was rendered with."""
    if any(bool(mask.any()) for mask in episode.query_mask):
        raise ValueError("the vLLM loop encodes the prompt's original images with the empty query (f0); got query tokens")
    if len(set(episode.mapping)) != len(episode.mapping):
        raise ValueError("the vLLM loop encodes each original image alone (f0); the prompt maps several to one query")
    if not episode.pixel_rows:
        return []
    images = pixels_to_images(torch.cat(episode.pixel_rows), episode.grids, image_processor)
    return [{"image": image, "query": ""} for image in images]


def crop_items(crops: list, query: str) -> list[dict]:
    """The crops of one call as vLLM items: encoded jointly with the call's query."""
    if len(crops) == 1:
        return [{"image": crops[0], "query": query}]
    return [{"image": crop, "query": query, "joint": list(crops), "joint_index": i} for i, crop in enumerate(crops)]


class VLLMChatSession(ChatSession):
    """The transformers loop's rules (`ChatSession`) driving a vLLM engine instead of a KV cache.

    Args:
        llm: a `vllm.LLM` serving a ViLaVT checkpoint (`vilavt.vllm.api.load_engine`, or TRL's colocated engine).
        model_config: the checkpoint's `ViLaVTConfig` (its control tokens are never sampled).
        logits_processor: transformers-style processors applied to every turn of every conversation
            (built per conversation by `logits_processor_factory(row)` if given instead).
        hashing: "per_image" (each image's hash covers its image, query and call) or "authors" (every
            query of the conversation in every image's hash, as the authors' plugin; for measurements).
        seed: base seed of vLLM's per-request sampling.

    Sampling: vLLM samples with the config's temperature / top-k / top-p / min-p / repetition penalty, after the
    logits processors and the control-token ban (`vilavt.vllm.logits`). `output_logprobs` records what the
    transformers loop records: log-softmax(logits / temperature) of the raw logits, before any processor.
    """

    def __init__(
        self,
        llm,
        processor,
        generation_config,
        model_config,
        logits_processor: LogitsProcessorList | None = None,
        logits_processor_factory=None,
        max_rounds: int = 5,
        max_regions: int = 8,
        max_new_tokens: int = 8192,
        max_turn_tokens: int | None = None,
        output_logprobs: bool = False,
        hashing: str = "per_image",
        seed: int | None = None,
    ):
        # No transformers model: ChatSession reads only its config (the control tokens) and its device.
        super().__init__(
            types.SimpleNamespace(device=torch.device("cpu"), config=model_config),
            processor,
            generation_config,
            LogitsProcessorList(),
            StoppingCriteriaList(),
            max_rounds=max_rounds,
            max_regions=max_regions,
            max_new_tokens=max_new_tokens,
            max_turn_tokens=max_turn_tokens,
            output_logprobs=output_logprobs,
        )
        if hashing not in ("per_image", "authors"):
            raise ValueError(f"hashing must be 'per_image' or 'authors', got {hashing!r}")
        self.llm = llm
        self.hashing = hashing
        self.seed = seed
        self.shared_logits_processor = logits_processor if logits_processor else None
        self.logits_processor_factory = logits_processor_factory
        # Never sampled: the loop's control tokens and the config's suppressed tokens.
        self.banned = sorted(set(self.banned_ids.tolist()) | set(generation_config.suppress_tokens or []))
        self.image_token_id = processor.image_token_id

    # ---- tokens ---------------------------------------------------------------------------------

    def append(self, ep: Episode, ids: list[int], sampled: bool, grids=None) -> None:
        """Record tokens; vLLM computes their positions itself."""
        ep.ids += ids
        ep.sampled += [sampled] * len(ids)

    # ---- requests -------------------------------------------------------------------------------

    def sampling_params(self, ep: Episode, state: VLLMState, row: int):
        from vllm import SamplingParams

        config = self.generation_config
        budget = self.max_new_tokens - ep.new_tokens
        max_tokens = budget if self.max_turn_tokens is None else min(budget, self.max_turn_tokens)
        kwargs = dict(
            max_tokens=max(1, max_tokens),
            stop=[TOOL_CLOSE, ANSWER_CLOSE],
            include_stop_str_in_output=True,
            stop_token_ids=sorted(self.eos_ids),
            skip_special_tokens=False,
            extra_args=vllm_logits.request_args(self.banned, state.processors, state.record, self.temperature),
        )
        if config.repetition_penalty not in (None, 1.0):
            kwargs["repetition_penalty"] = float(config.repetition_penalty)
        if config.do_sample:
            kwargs.update(temperature=float(config.temperature or 1.0), top_p=float(config.top_p or 1.0))
            if config.top_k:
                kwargs["top_k"] = int(config.top_k)
            if config.min_p:
                kwargs["min_p"] = float(config.min_p)
            if self.seed is not None:
                kwargs["seed"] = self.seed + 1000 * row + ep.rounds
        else:
            kwargs["temperature"] = 0.0
        return SamplingParams(**kwargs)

    def submit(self, row: int, ep: Episode, state: VLLMState) -> None:
        # vLLM expands each image's placeholder itself (to the same count: the item's grid).
        prompt = {"prompt_token_ids": collapse_image_pads(ep.ids, self.image_token_id)}
        if state.items:
            prompt["multi_modal_data"] = {"image": list(state.items)}
            if self.hashing == "authors":
                prompt["mm_processor_kwargs"] = authors_hashing_kwargs(state.queries)
        if self.output_logprobs:
            state.record = vllm_logits.register(vllm_logits.LogprobRecord(self.temperature))
        request_id = f"vilavt-{self.run_id}-{row}-{ep.rounds}"
        returned = self.llm.llm_engine.add_request(request_id, prompt, self.sampling_params(ep, state, row))
        self.requests[returned] = row
        self.requests[request_id] = row
        state.pending_images = state.new_images
        state.new_images = 0

    # ---- turns ----------------------------------------------------------------------------------

    def take_turn(self, row: int, ep: Episode, state: VLLMState, output) -> bool:
        """Take what vLLM sampled for the turn, up to where the transformers loop would have stopped, and act on
        the ended turn (`ChatSession.end_turn`). Returns whether the conversation goes on (a new request is due)."""
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        if completion.finish_reason == "stop" and isinstance(completion.stop_reason, int):
            if not tokens or tokens[-1] != completion.stop_reason:
                tokens.append(completion.stop_reason)
        state.requests.append(
            RequestStats(len(output.prompt_token_ids), output.num_cached_tokens or 0, len(state.items), state.pending_images)
        )
        logprobs = None
        if state.record is not None:
            logprobs = vllm_logits.lookup(state.record).values(tokens)
            vllm_logits.unregister(state.record)
            state.record = None
        reason = None
        for position, token in enumerate(tokens):
            if logprobs is not None:
                ep.logprobs.append(logprobs[position])
            self.append(ep, [token], sampled=True)
            reason = self.stop_reason(ep, token, row, None)
            if reason is not None:
                break
        if reason is None:  # vLLM stopped for a limit of its own (e.g. max_model_len)
            reason = "max_new_tokens"
        response = self.end_turn(ep, reason)
        if ep.done:
            return False
        if response is not None:  # crops to encode: new items carrying the call's query
            state.items += crop_items([crop.image for crop in response.crops], response.query)
            state.queries.append(response.query)
            state.new_images = len(response.crops)
        return True

    # ---- driver ---------------------------------------------------------------------------------

    def run(self, episodes: list[Episode], rows=None) -> list[Episode]:
        """Generate every episode to its end; `rows` (one per episode) feed `logits_processor_factory`."""
        if (self.output_logprobs or self.shared_logits_processor or self.logits_processor_factory) and not in_process(self.llm):
            raise VLLMBackendError(
                "logits processors and output_logprobs on the vLLM loop need the engine core in this process "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0, as vilavt.vllm.api.load_engine sets it)"
            )
        self.run_id = next(_runs)
        self.requests: dict[str, int] = {}
        started = time.perf_counter()
        image_processor = self.processor.image_processor
        states = []
        for r, ep in enumerate(episodes):
            state = VLLMState(items=original_items(ep, image_processor))
            state.new_images = len(state.items)
            processors = self.shared_logits_processor
            if self.logits_processor_factory is not None:
                processors = self.logits_processor_factory(rows[r] if rows is not None else r)
            state.processors = vllm_logits.register(processors) if processors else None
            states.append(state)
            ep._turn_clock = started
        engine = self.llm.llm_engine
        try:
            for r, ep in enumerate(episodes):
                self.submit(r, ep, states[r])
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if not output.finished:
                        continue
                    r = self.requests.pop(output.request_id)
                    if self.take_turn(r, episodes[r], states[r], output):
                        self.submit(r, episodes[r], states[r])
        finally:
            if self.requests:  # an error mid-run: leave no request of this run in the engine
                engine.abort_request(list(self.requests))
            for state in states:
                vllm_logits.unregister(state.processors)
                vllm_logits.unregister(state.record)
        self.close_traces(episodes, time.perf_counter() - started)
        for ep, state in zip(episodes, states):
            ep.vllm_requests = state.requests
        return episodes


def in_process(llm) -> bool:
    """Whether `llm`'s engine core runs in this process (where the loop's logits registry lives)."""
    from vllm.v1.engine.core_client import InprocClient

    return isinstance(getattr(llm.llm_engine, "engine_core", None), InprocClient)


def collapse_image_pads(ids: list[int], image_token_id: int) -> list[int]:
    """`ids` with each run of image placeholder tokens (one image) reduced to one token."""
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


__all__ = ["VLLMChatSession", "RequestStats", "original_items", "crop_items"]

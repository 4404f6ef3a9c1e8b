"""The chatting loop on vLLM, token in, token out.

Each assistant turn is one vLLM request whose prompt is the conversation's token ids so far (the
previous prompt + the sampled ids + the tool-response ids; nothing is re-tokenised) and whose image
items are the originals (empty query) and every crop so far (its call's query). vLLM's prefix cache
then serves everything before the new tool response, and its encoder runs only on the new crops,
because every item's hash covers only its own image, query and call (`processing.py`).

The rules are the transformers loop's, run by the same code: `ChatSession.stop_reason` decides where a
turn ends (token by token over what vLLM sampled), `ChatSession.prepare_tool_call` answers a tool call
(`tool_response`: parse, crop from the originals, render through the chat template; errors become
tool-response text) under the same round and token budgets, and `Episode` / `Trace` record it all.
Conversations are in flight together on vLLM's engine: a finished turn is answered and the next
request submitted while the others decode.
"""

import itertools
import time
import types
from dataclasses import dataclass, field

import torch
from transformers.generation import LogitsProcessorList, StoppingCriteriaList

from ..remote_code.generation_vilavt import ChatSession, Episode, pixels_to_images
from ..remote_code.protocol_vilavt import ANSWER_CLOSE, TOOL_CLOSE, TOOL_OPEN, parse_step
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
    lp_key: str | None = None  # this conversation's logits processors (vilavt.vllm.logits)


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
        llm: a `vllm.LLM` serving a ViLaVT checkpoint (`vilavt.vllm.api.load_engine`).
        logits_processor: transformers-style processors applied to every turn of every conversation
            (built per conversation by `logits_processor_factory(row)` if given instead).
        hashing: "per_image" (each image's hash covers its image, query and call) or "authors" (every
            query of the conversation in every image's hash, as the authors' plugin; for measurements).
        seed: base seed of vLLM's per-request sampling.
    """

    def __init__(
        self,
        llm,
        processor,
        generation_config,
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
        # No transformers model: ChatSession only reads its device.
        super().__init__(
            types.SimpleNamespace(device=torch.device("cpu")),
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
        self.suppress = sorted(set(generation_config.suppress_tokens or []))
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
            # Image placeholders are never sampled (the transformers loop suppresses them too).
            logit_bias={token: -100.0 for token in self.suppress} or None,
        )
        if config.do_sample:
            kwargs.update(temperature=float(config.temperature or 1.0), top_p=float(config.top_p or 1.0))
            if config.top_k:
                kwargs["top_k"] = int(config.top_k)
            if self.seed is not None:
                kwargs["seed"] = self.seed + 1000 * row + ep.rounds
        else:
            kwargs["temperature"] = 0.0
        if self.output_logprobs:
            kwargs["logprobs"] = 0
        if state.lp_key is not None:
            kwargs["extra_args"] = {vllm_logits.KEY: state.lp_key}
        return SamplingParams(**kwargs)

    def submit(self, row: int, ep: Episode, state: VLLMState) -> None:
        # vLLM expands each image's placeholder itself (to the same count: the item's grid).
        prompt = {"prompt_token_ids": collapse_image_pads(ep.ids, self.image_token_id)}
        if state.items:
            prompt["multi_modal_data"] = {"image": list(state.items)}
            if self.hashing == "authors":
                prompt["mm_processor_kwargs"] = authors_hashing_kwargs(state.queries)
        request_id = f"vilavt-{self.run_id}-{row}-{ep.rounds}"
        returned = self.llm.llm_engine.add_request(request_id, prompt, self.sampling_params(ep, state, row))
        self.requests[returned] = row
        self.requests[request_id] = row
        state.pending_images = state.new_images
        state.new_images = 0

    # ---- turns ----------------------------------------------------------------------------------

    def end_turn(self, row: int, ep: Episode, state: VLLMState, output) -> bool:
        """Take what vLLM sampled for the turn, up to where the transformers loop would have stopped, and
        answer the turn. Returns whether the conversation goes on (a new request is due)."""
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        if completion.finish_reason == "stop" and isinstance(completion.stop_reason, int):
            if not tokens or tokens[-1] != completion.stop_reason:
                tokens.append(completion.stop_reason)
        state.requests.append(
            RequestStats(len(output.prompt_token_ids), output.num_cached_tokens or 0, len(state.items), state.pending_images)
        )
        reason = None
        for position, token in enumerate(tokens):
            if self.output_logprobs:
                ep.logprobs.append(_sampled_logprob(completion.logprobs, position, token))
            self.append(ep, [token], sampled=True)
            reason = self.stop_reason(ep, token, row, None)
            if reason is not None:
                break
        if reason is None:  # vLLM stopped for a limit of its own (e.g. max_model_len)
            reason = "max_new_tokens"
        # As in ChatSession.run: an unclosed call is answered with its error; an answer's turn is closed.
        turn = self.tokenizer.decode(ep.turn_ids)
        if reason == "eos" and TOOL_OPEN in turn:
            reason = "tool"
        if reason == "tool":
            rounds = len(ep.trace.rounds)
            self.prepare_tool_call(ep)
            if ep.done:
                return False
            record = ep.trace.rounds[rounds] if len(ep.trace.rounds) > rounds else None
            if record is not None and record.crops:
                state.items += crop_items(record.crops, record.query)
                state.queries.append(record.query)
                state.new_images = len(record.crops)
            ep._turn_clock = time.perf_counter()
            return True
        if reason == "eos":
            self.finish(ep, "answer" if parse_step(turn).answer else "eos")
        else:
            if reason == "answer" and self.turn_end is not None and ep.new_tokens < self.max_new_tokens:
                self.append(ep, [self.turn_end], sampled=False)
            self.finish(ep, reason)
        return False

    # ---- driver ---------------------------------------------------------------------------------

    def run(self, episodes: list[Episode], rows=None) -> list[Episode]:
        """Generate every episode to its end; `rows` (one per episode) feed `logits_processor_factory`."""
        self.run_id = next(_runs)
        self.requests: dict[str, int] = {}
        started = time.perf_counter()
        image_processor = self.processor.image_processor
        states, keys = [], []
        for r, ep in enumerate(episodes):
            state = VLLMState(items=original_items(ep, image_processor))
            state.new_images = len(state.items)
            processors = self.shared_logits_processor
            if self.logits_processor_factory is not None:
                processors = self.logits_processor_factory(rows[r] if rows is not None else r)
            state.lp_key = vllm_logits.register(processors) if processors else None
            keys.append(state.lp_key)
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
                    if self.end_turn(r, episodes[r], states[r], output):
                        self.submit(r, episodes[r], states[r])
        finally:
            for key in keys:
                if key is not None:
                    vllm_logits.unregister(key)
        elapsed = time.perf_counter() - started
        for ep, state in zip(episodes, states):
            trace = ep.trace
            trace.generated_tokens = sum(ep.sampled)
            trace.injected_tokens = ep.new_tokens - trace.generated_tokens
            trace.seconds = elapsed
            trace.text = self.tokenizer.decode(ep.ids[ep.prompt_length :], skip_special_tokens=True)
            ep.vllm_requests = state.requests
        return episodes


def collapse_image_pads(ids: list[int], image_token_id: int) -> list[int]:
    """`ids` with each run of image placeholder tokens (one image) reduced to one token."""
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def _sampled_logprob(logprobs, position: int, token: int) -> float:
    if logprobs is None or position >= len(logprobs):
        return float("nan")  # a token vLLM did not sample (the eos it reports apart)
    entry = logprobs[position]
    return float(entry[token].logprob) if token in entry else float("nan")


__all__ = ["VLLMChatSession", "RequestStats", "original_items", "crop_items"]

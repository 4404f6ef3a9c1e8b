"""Chatting with images inside `generate`: decode until a tool call, crop, re-encode only the new crops
jointly with their query, append the tool response and its image tokens to the live KV cache with
the right 3-D (mRoPE) positions, and resume — until an answer, the round budget or the token budget.

Rows of a batch progress independently: a row that calls the tool gets its tool-response tokens in
the next forward while the other rows decode one token (shorter rows are left-padded inside the
step and the pads masked), and finished rows leave the cache. Sampled token ids are kept as sampled.

`incremental=False` is the reference-style loop used as the baseline and correctness oracle: every
round, each conversation is rebuilt from its token ids and all its images are encoded again.
"""

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers.generation import LogitsProcessorList, MaxTimeCriteria, StopStringCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from .cache_vilavt import CACHE_ARGUMENT, GrowingCache
from .images_vilavt import open_image, pixels_to_images
from .processing_vilavt import TURN_END, batch_vision
from .prompts_vilavt import tool_message
from .protocol_vilavt import ANSWER_CLOSE, TOOL_CLOSE, Step, parse_step
from .regions_vilavt import ImageLedger, RegionError
from .trace_vilavt import RoundTrace, Trace

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# What a generation returns
# --------------------------------------------------------------------------------------------------


@dataclass
class ViLaVTGenerateOutput(ModelOutput):
    """`sequences`: each row's input ids as given followed by its new tokens (right-padded);
    `sampled_mask`: True where a token was sampled (False for prompt and injected tool responses);
    `traces`: one `Trace` per sequence; `episodes`: the records that rebuild each conversation's model
    inputs (`Episode.model_inputs`); `logits`: per sequence, the raw logits of each sampled token; `scores`: the
    same after the logits processors;
    `logprobs`: per sequence, log p(token) of each sampled token under softmax(logits / temperature)."""

    sequences: torch.LongTensor | None = None
    sampled_mask: torch.BoolTensor | None = None
    traces: list | None = None
    episodes: list | None = None
    logits: list | None = None
    scores: list | None = None
    logprobs: list | None = None


# --------------------------------------------------------------------------------------------------
# One conversation
# --------------------------------------------------------------------------------------------------


class Episode:
    """One conversation being generated: its token ids, images and queries — enough to rebuild the
    full model inputs (the reference-style recompute, or a training forward over a rollout)."""

    def __init__(self, prompt_ids, pixel_rows, grids, query_ids, query_mask, mapping, ledger):
        self.ids = list(prompt_ids)
        self.sampled = [False] * len(self.ids)
        self.prompt_length = len(self.ids)
        self.pixel_rows = list(pixel_rows)  # one [patches, 1176] tensor per image
        self.grids = grids  # [images, 3] (t, h, w) patch grids
        self.query_ids = list(query_ids)  # one [T] tensor per query row
        self.query_mask = list(query_mask)
        self.mapping = list(mapping)
        self.ledger = ledger
        self.trace = Trace(originals=ledger.originals)
        self.next_position = 0
        self.turn_start = len(self.ids)
        self.waiting = False  # reference-style loop: tool response appended, waiting for the re-prefill
        self.pending: list[int] = []  # ids to feed in the next forward
        self.pending_positions: list[torch.Tensor] = []
        self.pending_features: torch.Tensor | None = None
        self.logits: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.logprobs: list[float] = []
        self._ids_tensor = torch.tensor(self.ids, dtype=torch.long)
        self._turn_clock = time.perf_counter()

    @property
    def rounds(self) -> int:
        """Tool calls answered so far."""
        return len(self.trace.rounds)

    @property
    def done(self) -> bool:
        return bool(self.trace.stop_reason)

    def clone(self) -> "Episode":
        twin = copy.copy(self)
        for name in ("ids", "sampled", "pixel_rows", "query_ids", "query_mask", "mapping"):
            setattr(twin, name, list(getattr(self, name)))
        twin.ledger = copy.copy(self.ledger)
        twin.ledger.entries = list(self.ledger.entries)
        twin.trace = Trace(originals=self.ledger.originals)
        twin.pending, twin.pending_positions = list(self.pending), list(self.pending_positions)
        twin.logits, twin.scores, twin.logprobs = [], [], []
        return twin

    def ids_tensor(self) -> torch.Tensor:
        """`ids` as a tensor, extended (not rebuilt) as tokens arrive."""
        cached = self._ids_tensor
        if len(cached) > len(self.ids):
            cached = torch.tensor(self.ids, dtype=torch.long)
        elif len(cached) < len(self.ids):
            cached = torch.cat([cached, torch.tensor(self.ids[len(cached) :], dtype=torch.long)])
        self._ids_tensor = cached
        return cached

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - self.prompt_length

    @property
    def turn_ids(self) -> list[int]:
        return self.ids[self.turn_start :]

    def add_tool_response(self, response: "ToolResponse", generated_tokens: int = 0, seconds_decode: float = 0.0,
                          seconds_tool: float = 0.0) -> RoundTrace:
        """Record a tool response: its crops become new images encoded with its query, and the round joins the
        trace (`generated_tokens`: sampled in the turn that made the call)."""
        indices = self.ledger.add(response.crops)
        if response.pixel_values is not None:
            self.pixel_rows += list(response.pixel_values.split(response.grids.prod(-1).tolist()))
            self.grids = torch.cat([self.grids, response.grids])
            self.query_ids.append(response.query_ids)
            self.query_mask.append(response.query_mask)
            self.mapping += [len(self.query_ids) - 1] * len(indices)
        record = RoundTrace(
            thought=response.thought,
            query=response.query,
            regions=response.regions,
            crops=[crop.image for crop in response.crops],
            crop_indices=indices,
            error=response.error,
            notes=response.notes,
            generated_tokens=generated_tokens,
            injected_tokens=len(response.ids),
            seconds_decode=seconds_decode,
            seconds_tool=seconds_tool,
        )
        self.trace.rounds.append(record)
        return record

    def model_inputs(self, pad_token_id: int = 0) -> dict:
        """The full-sequence model inputs of this conversation (batch of one)."""
        return full_inputs([self], pad_token_id)


def same_conversation(a: Episode, b: Episode) -> bool:
    """Same tokens, images and queries (e.g. several samples of one prompt)."""
    return (
        a.ids == b.ids
        and torch.equal(a.grids, b.grids)
        and a.mapping == b.mapping
        and all(x is y or torch.equal(x, y) for x, y in zip(a.pixel_rows, b.pixel_rows))
        and len(a.query_ids) == len(b.query_ids)
        and all(torch.equal(x, y) for x, y in zip(a.query_ids + a.query_mask, b.query_ids + b.query_mask))
    )


def episode_vision(episode: Episode) -> dict:
    """One conversation's vision inputs (all its images and queries), as `batch_vision` takes them."""
    if not episode.pixel_rows:
        return {}
    return {
        "pixel_values": torch.cat(episode.pixel_rows),
        "image_grid_thw": episode.grids,
        "query_ids": torch.stack(episode.query_ids),
        "query_attention_mask": torch.stack(episode.query_mask),
        "image_to_query_mapping": torch.tensor(episode.mapping, dtype=torch.long),
    }


def full_inputs(episodes: list[Episode], pad_token_id: int, padding_side: str = "left") -> dict:
    """Batch the complete conversations of `episodes` (all tokens, all images, all queries) as model inputs."""
    length = max(len(ep.ids) for ep in episodes)
    input_ids = torch.full((len(episodes), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(episodes), length), dtype=torch.long)
    for row, ep in enumerate(episodes):
        span = slice(length - len(ep.ids), length) if padding_side == "left" else slice(0, len(ep.ids))
        input_ids[row, span] = ep.ids_tensor()
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **vision_inputs(episodes)}


def vision_inputs(episodes: list[Episode]) -> dict:
    """The vision part of `full_inputs`: every image and query of `episodes` (empty when none has an image)."""
    return batch_vision([episode_vision(ep) for ep in episodes])


# --------------------------------------------------------------------------------------------------
# Tool responses (shared by the loop and by training-data replay)
# --------------------------------------------------------------------------------------------------


@dataclass
class ToolResponse:
    """What answers one assistant turn's tool call."""

    thought: str | None
    query: str | None
    crops: list  # regions_vilavt.Crop
    error: str | None  # why the call failed (the response says so)
    notes: list[str]
    ids: list[int]  # closes the assistant turn, the tool turn, then the next assistant header
    closing: int  # how many leading `ids` close the assistant turn
    grids: torch.Tensor  # [crops, 3]
    pixel_values: torch.Tensor | None
    query_ids: torch.Tensor | None
    query_mask: torch.Tensor | None
    regions: list[dict]  # per crop: index, bbox_2d (displayed pixels), source original, box_in_original (pixels)


def tool_response(
    episode: Episode, processor, turn: "str | Step", final: bool, max_regions: int | None = None, turn_closed: bool = False
) -> ToolResponse:
    """Parse an assistant turn's tool call, crop its regions from the originals and render the tool
    response with the processor's prompt templates. Problems with the call become an error text in the response;
    text it echoes (an error's quote of the call) is encoded as text, never as a control token.
    `turn`: the assistant turn's text, or the turn already parsed; `turn_closed`: the turn already ends with the
    end-of-turn token (an unclosed call)."""
    step = turn if isinstance(turn, Step) else parse_step(turn, max_regions)
    crops, notes, error = [], [], step.error
    if step.tool_call is not None:
        factor = processor.patch_factor
        try:
            crops = [
                episode.ledger.crop(region, processor.crop_max_pixels, processor.crop_min_pixels, factor)
                for region in step.tool_call.regions
            ]
        except RegionError as err:
            error = str(err)
    query = None
    if crops:
        query, truncated = processor.tokenize_queries([step.tool_call.query])
        if truncated[0]:
            limit = processor.max_query_length
            notes.append(f"the query is longer than {limit} tokens; only its first {limit} were used")
    message = tool_message([c.image for c in crops], len(episode.ledger), final, error, notes)
    encoded = processor.apply_chat_template(
        [message], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"queries": query, "image_to_query_mapping": [0] * len(crops)} if crops else None,
    )  # fmt: skip
    closing = processor.tokenizer.encode("\n" if turn_closed else TURN_END, add_special_tokens=False)
    return ToolResponse(
        thought=step.thought,
        query=step.tool_call.query if step.tool_call else None,
        crops=crops,
        error=error,
        notes=notes,
        ids=closing + encoded["input_ids"][0].tolist(),
        closing=len(closing),
        grids=encoded["image_grid_thw"] if crops else torch.zeros((0, 3), dtype=torch.long),
        pixel_values=encoded["pixel_values"] if crops else None,
        query_ids=encoded["query_ids"][0] if crops else None,
        query_mask=encoded["query_attention_mask"][0] if crops else None,
        regions=[
            {"index": r.index, "bbox_2d": list(r.bbox), "source": c.entry.source, "box_in_original": list(c.pixel_box)}
            for r, c in zip(step.tool_call.regions if crops else [], crops)
        ],
    )


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class ChatSession:
    """Runs the chatting loop over a batch of episodes. Built and driven by `ViLaVTForConditionalGeneration.generate`."""

    def __init__(
        self,
        model,
        processor,
        generation_config,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        streamer=None,
        max_rounds: int = 5,
        max_regions: int = 8,
        max_new_tokens: int = 8192,
        max_turn_tokens: int | None = None,
        incremental: bool = True,
        output_logits: bool = False,
        output_scores: bool = False,
        output_logprobs: bool = False,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.generation_config = generation_config
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.streamer = streamer
        self.max_rounds = max_rounds
        self.max_regions = max_regions
        self.max_new_tokens = max_new_tokens
        self.max_turn_tokens = max_turn_tokens
        self.incremental = incremental
        self.output_logits = output_logits
        self.output_scores = output_scores
        self.output_logprobs = output_logprobs
        # Log-probs are those of the policy itself: softmax(logits / temperature), as a trainer scores them.
        self.temperature = float(generation_config.temperature or 1.0) if generation_config.do_sample else 1.0
        eos = generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.turn_end = eos if isinstance(eos, int) else (eos[0] if eos else None)
        self.pad_id = generation_config.pad_token_id if generation_config.pad_token_id is not None else 0
        self.device = model.device
        self.banned_ids = torch.tensor(sorted(control_token_ids(model.config, self.tokenizer)), device=self.device)
        self.cache = None
        self.cache_rows: list[int] = []  # episode index of each cache row
        self.mask = None

    # ---- forwards -------------------------------------------------------------------------------

    def _forward(self, **inputs) -> torch.Tensor:
        outputs = self.model(
            **inputs, **{CACHE_ARGUMENT: self.cache}, use_cache=True, logits_to_keep=1, return_dict=True
        )
        return outputs.logits[:, -1].float()

    def prefill(self, episodes: list[Episode], rows: list[int]) -> dict[int, torch.Tensor]:
        """Encode `rows` from scratch — all their tokens and images — into a fresh cache. Identical
        conversations (several samples of one prompt) are encoded once and share the cache rows."""
        unique, owner = [], []
        for r in rows:
            match = next((j for j, u in enumerate(unique) if same_conversation(episodes[r], episodes[u])), None)
            owner.append(len(unique) if match is None else match)
            if match is None:
                unique.append(r)
        batch = [episodes[r] for r in unique]
        inputs = {k: v.to(self.device) for k, v in full_inputs(batch, self.pad_id).items()}
        mm_types = self.model.model.mm_token_type_ids(inputs["input_ids"])
        position_ids, deltas = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_types,
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
        next_positions = (deltas[:, 0] + inputs["attention_mask"].sum(1)).tolist()
        for r, j in zip(rows, owner):
            ep = episodes[r]
            ep.next_position = next_positions[j]
            ep.pending, ep.pending_positions, ep.pending_features, ep.waiting = [], [], None, False
        self.cache, self.cache_rows = GrowingCache(), list(rows)
        logits = self._forward(**inputs, position_ids=position_ids)
        self.mask = inputs["attention_mask"]
        if len(unique) < len(rows):
            index = torch.tensor(owner, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask, logits = self.mask[index], logits[index]
        return dict(zip(rows, logits))

    def advance(self, episodes: list[Episode]) -> dict[int, torch.Tensor]:
        """Feed every cached row's pending tokens in one forward (right-aligned, pads masked)."""
        width = max(len(episodes[r].pending) for r in self.cache_rows)
        count = len(self.cache_rows)
        ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((count, width), dtype=torch.long)
        positions = torch.zeros((3, count, width), dtype=torch.long)
        features = []
        for i, r in enumerate(self.cache_rows):
            ep = episodes[r]
            n = len(ep.pending)
            ids[i, width - n :] = torch.tensor(ep.pending)
            mask[i, width - n :] = 1
            positions[:, i, width - n :] = torch.cat(ep.pending_positions, dim=1)
            if ep.pending_features is not None:
                features.append(ep.pending_features)
            ep.pending, ep.pending_positions, ep.pending_features = [], [], None
        self.mask = torch.cat([self.mask, mask.to(self.device)], dim=1)
        encoder_outputs = None
        if features:
            encoder_outputs = {"image": BaseModelOutputWithPooling(pooler_output=(torch.cat(features),))}
        logits = self._forward(
            input_ids=ids.to(self.device),
            attention_mask=self.mask,
            position_ids=positions.to(self.device),
            mm_encoder_outputs=encoder_outputs,
        )
        return dict(zip(self.cache_rows, logits))

    def drop(self, rows: set[int]) -> None:
        """Remove finished (or re-prefilling) rows from the cache."""
        keep = [i for i, r in enumerate(self.cache_rows) if r not in rows]
        if len(keep) == len(self.cache_rows):
            return
        self.cache_rows = [self.cache_rows[i] for i in keep]
        if keep:
            index = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
            # Columns that are padding for every remaining row carry no information.
            live = self.mask.any(dim=0)
            if not bool(live.all()):
                columns = live.nonzero().squeeze(1)
                self.mask = self.mask[:, columns]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, columns], layer.values[:, :, columns]
        else:
            self.cache, self.mask = None, None

    # ---- tokens ---------------------------------------------------------------------------------

    def append(self, ep: Episode, ids: list[int], sampled: bool, grids=None) -> None:
        """Append tokens to an episode, with their 3-D rotary positions, to be fed next."""
        token_ids = torch.tensor([ids], dtype=torch.long)
        if grids is not None and len(grids):
            positions, _ = self.model.model.get_rope_index(
                token_ids, self.model.model.mm_token_type_ids(token_ids), image_grid_thw=grids
            )
            positions = positions[:, 0] + ep.next_position
        else:
            positions = torch.arange(len(ids)).expand(3, -1) + ep.next_position
        ep.next_position = int(positions.max()) + 1
        ep.ids += ids
        ep.sampled += [sampled] * len(ids)
        ep.pending += ids
        ep.pending_positions.append(positions)
        if self.streamer is not None:
            # An image reaches the streamer as <|vision_start|><|vision_end|>: its run of placeholders is noise.
            self.streamer.put(token_ids[0][token_ids[0] != self.model.config.image_token_id])

    def stop_reason(self, ep: Episode, token: int, row: int, history: torch.Tensor | None) -> str | None:
        """Why the current turn ends after `token`, if it does."""
        if token in self.eos_ids:
            return "eos"
        last = self.tokenizer.decode([token])
        if ">" in last:  # cheap pre-check before decoding the tail
            tail = self.tokenizer.decode(ep.turn_ids[-8:])
            if TOOL_CLOSE in tail:
                return "tool"
            if ANSWER_CLOSE in tail:
                return "answer"
        if ep.new_tokens >= self.max_new_tokens:
            return "max_new_tokens"
        if self.max_turn_tokens is not None and len(ep.turn_ids) >= self.max_turn_tokens:
            return "max_turn_tokens"
        if history is not None and len(self.stopping_criteria) and bool(self.stopping_criteria(history, None)[row]):
            return "stopping_criteria"
        return None

    def history(self, episodes: list[Episode]) -> torch.Tensor:
        """Every row's tokens so far, left-padded: the `input_ids` logits processors see."""
        return torch.nn.utils.rnn.pad_sequence(
            [ep.ids_tensor() for ep in episodes], batch_first=True, padding_value=self.pad_id, padding_side="left"
        ).to(self.device)

    # ---- tool calls -----------------------------------------------------------------------------

    def end_turn(self, ep: Episode, reason: str) -> ToolResponse | None:
        """Act on a turn that ended for `reason` (`stop_reason`): answer its tool call or end the episode.
        Returns the tool response whose crops must be encoded, if any."""
        response = None
        step = None
        if reason == "eos":
            step = parse_step(self.tokenizer.decode(ep.turn_ids, skip_special_tokens=True), self.max_regions)
            if step.wants_tool:
                reason = "tool"  # an attempted call that never closed: the model reads why it failed
        if reason == "tool":
            response = self.prepare_tool_call(ep, step)
            ep.waiting = not ep.done and not self.incremental
        elif reason == "eos":
            self.finish(ep, "answer" if step.answer is not None else "eos", step)
        else:
            if reason == "answer" and self.turn_end is not None and ep.new_tokens < self.max_new_tokens:
                self.append(ep, [self.turn_end], sampled=False)  # close the final turn, as the model would
            self.finish(ep, reason)
        ep._turn_clock = time.perf_counter()
        return response

    def finish(self, ep: Episode, reason: str, step=None) -> None:
        """End `ep` (`step`: its last turn, parsed, when the caller has it)."""
        if step is None:
            step = parse_step(self.tokenizer.decode(ep.turn_ids, skip_special_tokens=True))
        ep.trace.final_turn = step.text
        ep.trace.answer = step.answer
        # "answer" means an answer was given: a closing tag without an opening one is no answer.
        ep.trace.stop_reason = "no_answer" if reason == "answer" and step.answer is None else reason

    def prepare_tool_call(self, ep: Episode, step: Step | None = None) -> ToolResponse | None:
        """Answer the turn's tool call (crops, or an error the model reads) and queue the response (`step`: the
        turn, parsed, when the caller has it). Returns the response when it has crops to encode, else None (no
        crops, or the episode ended instead)."""
        started = time.perf_counter()
        if step is None:
            step = parse_step(self.tokenizer.decode(ep.turn_ids, skip_special_tokens=True), self.max_regions)
        if ep.rounds >= self.max_rounds:
            self.finish(ep, "max_rounds", step)
            return None
        response = tool_response(
            ep,
            self.processor,
            step,
            final=ep.rounds + 1 >= self.max_rounds,
            max_regions=self.max_regions,
            turn_closed=ep.ids[-1] in self.eos_ids,
        )
        turn_tokens = len(ep.turn_ids)
        if response.error is not None and self.processor.prompts.on_error == "end":
            # The authors' RL rollout: a failed call ends the trajectory, with no tool response.
            if self.turn_end is not None and ep.ids[-1] not in self.eos_ids and ep.new_tokens < self.max_new_tokens:
                self.append(ep, [self.turn_end], sampled=False)  # close the turn, as the model would
            response.ids = []
            ep.add_tool_response(response, turn_tokens, started - ep._turn_clock, time.perf_counter() - started)
            self.finish(ep, "tool_error", step)
            return None
        if ep.new_tokens + len(response.ids) >= self.max_new_tokens:  # no room left for the model to write
            self.finish(ep, "max_new_tokens", step)
            return None
        ep.add_tool_response(response, turn_tokens, started - ep._turn_clock, time.perf_counter() - started)
        self.append(ep, response.ids, sampled=False, grids=response.grids)
        ep.turn_start = len(ep.ids)
        return response if response.pixel_values is not None else None

    def encode_crops(self, episodes: list[Episode], requests: dict[int, ToolResponse]) -> None:
        """Encode the new crops of all rows in one vision call (each row's crops grouped with its query)."""
        if not requests:
            return
        started = time.perf_counter()
        batch = batch_vision(
            [
                {
                    "pixel_values": response.pixel_values,
                    "image_grid_thw": response.grids,
                    "query_ids": response.query_ids[None],
                    "query_attention_mask": response.query_mask[None],
                    "image_to_query_mapping": torch.zeros(len(response.grids), dtype=torch.long),
                }
                for response in requests.values()
            ]
        )
        with torch.no_grad():
            features = self.model.model.get_image_features(
                **{key: value.to(self.device) for key, value in batch.items()}
            ).pooler_output
        elapsed = time.perf_counter() - started
        start = 0
        for r, response in requests.items():
            episodes[r].pending_features = torch.cat(features[start : start + len(response.grids)])
            episodes[r].trace.rounds[-1].seconds_tool += elapsed  # the batch's encode, shared by its rows
            start += len(response.grids)

    # ---- driver ---------------------------------------------------------------------------------

    def run(self, episodes: list[Episode]) -> list[Episode]:
        started = time.perf_counter()
        for ep in episodes:
            ep._turn_clock = started
        if self.streamer is not None:
            prompt = torch.tensor(episodes[0].ids)
            self.streamer.put(prompt[prompt != self.model.config.image_token_id])
        logits = self.prefill(episodes, list(range(len(episodes))))
        do_sample = bool(self.generation_config.do_sample)
        vocab = next(iter(logits.values())).shape[-1]
        while logits:
            needs_history = len(self.logits_processor) > 0 or len(self.stopping_criteria) > 0
            history = self.history(episodes) if needs_history else None
            batch_logits = torch.zeros(len(episodes), vocab, device=self.device)
            for r, row_logits in logits.items():
                batch_logits[r] = row_logits
            scores = self.logits_processor(history, batch_logits) if len(self.logits_processor) else batch_logits
            scores = scores.index_fill(1, self.banned_ids, float("-inf"))  # after every processor: never sampled
            if do_sample:
                tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = scores.argmax(dim=-1)
            tokens = tokens.tolist()

            if self.output_logprobs:
                rows = list(logits)
                logprobs = torch.log_softmax(torch.stack([logits[r] for r in rows]) / self.temperature, dim=-1)
                picked = logprobs[torch.arange(len(rows)), torch.tensor([tokens[r] for r in rows])].tolist()
                for r, value in zip(rows, picked):
                    episodes[r].logprobs.append(value)
            for r in logits:
                if self.output_logits:
                    episodes[r].logits.append(logits[r].clone())  # a row of a batch tensor: keep the row only
                if self.output_scores:
                    episodes[r].scores.append(scores[r].clone())
                self.append(episodes[r], [tokens[r]], sampled=True)
            history = self.history(episodes) if len(self.stopping_criteria) else None
            requests, leaving = {}, set()
            for r in logits:
                ep = episodes[r]
                reason = self.stop_reason(ep, tokens[r], r, history)
                if reason is None:
                    continue
                response = self.end_turn(ep, reason)
                if response is not None:
                    requests[r] = response
                if ep.done or ep.waiting:
                    leaving.add(r)

            self.encode_crops(episodes, requests)
            self.drop(leaving)
            logits = self.advance(episodes) if self.cache_rows else {}
            if not self.cache_rows:
                waiting = [r for r, ep in enumerate(episodes) if ep.waiting]
                if waiting:  # reference-style: rebuild every waiting conversation from scratch
                    logits = self.prefill(episodes, waiting)

        if self.streamer is not None:
            self.streamer.end()
        self.close_traces(episodes, time.perf_counter() - started)
        return episodes

    def close_traces(self, episodes: list[Episode], seconds: float) -> None:
        """Fill in what a trace knows only at the end: token counts, run time and the decoded completion."""
        for ep in episodes:
            trace = ep.trace
            trace.generated_tokens = sum(ep.sampled)
            trace.injected_tokens = ep.new_tokens - trace.generated_tokens
            trace.seconds = seconds
            trace.text = self.tokenizer.decode(ep.ids[ep.prompt_length :], skip_special_tokens=True)

    def output(self, prompts: torch.Tensor, episodes: list[Episode], output_logprobs: bool = False):
        """What `generate` returns for `episodes` whose input ids were `prompts` (one row per episode)."""
        prompts = prompts.cpu()
        width = prompts.shape[1] + max(ep.new_tokens for ep in episodes)
        sequences = torch.full((len(episodes), width), self.pad_id, dtype=torch.long)
        sampled_mask = torch.zeros((len(episodes), width), dtype=torch.bool)
        for row, ep in enumerate(episodes):
            end = prompts.shape[1] + ep.new_tokens
            sequences[row, : prompts.shape[1]] = prompts[row]
            sequences[row, prompts.shape[1] : end] = torch.tensor(ep.ids[ep.prompt_length :], dtype=torch.long)
            sampled_mask[row, prompts.shape[1] : end] = torch.tensor(ep.sampled[ep.prompt_length :], dtype=torch.bool)
        sequences = sequences.to(self.device)
        if not self.generation_config.return_dict_in_generate:
            return sequences

        def stacked(name):
            return [torch.stack(getattr(ep, name)) if getattr(ep, name) else None for ep in episodes]

        return ViLaVTGenerateOutput(
            sequences=sequences,
            sampled_mask=sampled_mask.to(self.device),
            traces=[ep.trace for ep in episodes],
            episodes=episodes,
            logits=stacked("logits") if self.output_logits else None,
            scores=stacked("scores") if self.output_scores else None,
            logprobs=[torch.tensor(ep.logprobs) for ep in episodes] if output_logprobs else None,
        )


# --------------------------------------------------------------------------------------------------
# From `generate` inputs to episodes
# --------------------------------------------------------------------------------------------------


def episodes_from_inputs(
    config,
    processor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    query_ids: torch.Tensor | None,
    query_attention_mask: torch.Tensor | None,
    image_to_query_mapping: torch.Tensor | None,
    images: list | None,
) -> list[Episode]:
    """Split batched processor outputs into one Episode per row (`config`: the model's ViLaVTConfig)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
    per_row_images = [row.count(config.vision_start_token_id) for row in rows]
    grids = image_grid_thw.cpu() if image_grid_thw is not None else torch.zeros((0, 3), dtype=torch.long)
    if sum(per_row_images) != len(grids):
        raise ValueError(
            f"input_ids hold {sum(per_row_images)} images (<|vision_start|> tokens) but image_grid_thw has {len(grids)} rows"
        )
    pixel_chunks = list(pixel_values.cpu().split(grids.prod(-1).tolist())) if len(grids) else []
    if images is not None:
        if len(images) != len(rows) or any(len(imgs) != n for imgs, n in zip(images, per_row_images)):
            raise ValueError(
                f"`images` must hold each row's original images: expected counts {per_row_images}, "
                f"got {[len(imgs) for imgs in images] if len(images) == len(rows) else len(images)} "
                f"for {len(rows)} rows"
            )
        originals = [open_image(image) for row in images for image in row]
    elif len(grids):
        logger.warning_once(
            "generate() got no original images (`images=`, which the processor's outputs carry); crops are taken "
            "from the displayed images, at their lower resolution."
        )
        originals = pixels_to_images(pixel_values, grids, processor.image_processor)
    else:
        originals = []
    if query_ids is None:
        empty, _ = processor.tokenize_queries([""])
        query_rows = [empty["query_ids"][0]] * len(grids)
        mask_rows = [empty["query_attention_mask"][0]] * len(grids)
        mapping = list(range(len(grids)))
    else:
        query_rows, mask_rows = list(query_ids.cpu()), list(query_attention_mask.cpu())
        mapping = image_to_query_mapping.tolist() if image_to_query_mapping is not None else list(range(len(grids)))

    episodes, start = [], 0
    patch = processor.image_processor.patch_size
    for ids, count in zip(rows, per_row_images):
        row_grids = grids[start : start + count]
        row_mapping = mapping[start : start + count]
        used = sorted(set(row_mapping))
        ledger = ImageLedger(originals[start : start + count], [(w * patch, h * patch) for _, h, w in row_grids.tolist()])
        episodes.append(
            Episode(
                ids,
                pixel_chunks[start : start + count],
                row_grids,
                [query_rows[q] for q in used],
                [mask_rows[q] for q in used],
                [used.index(q) for q in row_mapping] if row_mapping else [],
                ledger,
            )
        )
        start += count
    return episodes


def control_token_ids(config, tokenizer) -> set[int]:
    """Tokens the model must never sample: image / video placeholders and markers (images come only from the
    processor and the tool) and a turn's start header (turns end with the end-of-turn token)."""
    ids = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    for token in ("<|vision_pad|>", "<|im_start|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return {i for i in ids if i is not None}


# --------------------------------------------------------------------------------------------------
# `generate` and `chat` of the model
# --------------------------------------------------------------------------------------------------

# Generation settings the tool loop honours (everything a logits processor or a stopping criterion does, plus
# the loop's own budget and outputs). Any other setting given a non-default value is an error: the loop would
# silently ignore it. Decode without the loop (`tool_loop=False`) for beam search, assisted decoding, static
# caches, attentions or hidden states.
_LOOP_UNSUPPORTED = {
    "num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "length_penalty": 1.0, "early_stopping": False,
    "constraints": None, "force_words_ids": None, "penalty_alpha": None, "dola_layers": None, "low_memory": None,
    "use_cache": True, "cache_implementation": None, "cache_config": None, "max_cache_len": None,
    "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None, "assistant_early_exit": None,
    "speculation_type": None, "use_mtp": None, "token_healing": None, "guidance_scale": None,
    "prefill_chunk_size": None, "output_attentions": False, "output_hidden_states": False,
}  # fmt: skip


def check_loop_arguments(generation_config, user_kwargs: dict, model_kwargs: dict, assistant_model) -> None:
    """Raise a one-line ValueError naming every `generate` argument the tool loop would not honour."""
    unsupported = {name for name, default in _LOOP_UNSUPPORTED.items() if getattr(generation_config, name, None) not in (None, default)}
    unsupported |= set(model_kwargs)  # arguments that are neither generation settings nor loop inputs
    if "max_length" in user_kwargs:  # the loop budgets new tokens (tool responses included), not total length
        unsupported.add("max_length (use max_new_tokens)")
    if assistant_model is not None:
        unsupported.add("assistant_model")
    if unsupported:
        unsupported = sorted(unsupported)
        raise ValueError(
            f"the ViLaVT tool loop does not support {', '.join(unsupported)}; pass tool_loop=False to decode with "
            "transformers' own generate (no tool calls)"
        )


class ViLaVTChatMixin:
    """`generate` runs the ViLaVT tool loop (`tool_loop=False`: transformers' own `generate`); `chat` asks one
    question about images."""

    DEFAULT_MAX_NEW_TOKENS = 8192
    QUERY_INPUTS = ("query_ids", "query_attention_mask", "image_to_query_mapping")
    _vilavt_processor = None

    def add_model_tags(self, tags) -> None:
        # TRL's stock GRPOTrainer tags the model "grpo" when it is built. Its scoring pass knows only the prompt's
        # images, not the crops a ViLaVT rollout adds, so it would fail after the first rollouts: say so now.
        # ViLaVT's GRPO trainer tags it "vilavt" too.
        tags = [tags] if isinstance(tags, str) else list(tags)
        if "grpo" in tags and "vilavt" not in tags:
            raise ValueError(
                "TRL's GRPOTrainer cannot train ViLaVT: its scoring pass sees only the prompt's images, not the crops "
                "a rollout adds. Use `vilavt grpo --config ...` (vilavt.train.grpo.ViLaVTGRPOTrainer)."
            )
        super().add_model_tags(tags)

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        # The query inputs reach the vision tower through the parent forward's **kwargs, which the check cannot see.
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in self.QUERY_INPUTS})

    def _chat_processor(self, processor=None, required: bool = True):
        """The processor the loop renders tool responses with: given, or the one saved with the checkpoint."""
        from .processing_vilavt import ViLaVTProcessor

        if processor is not None:
            self._vilavt_processor = processor
        if self._vilavt_processor is None:
            try:
                self._vilavt_processor = ViLaVTProcessor.from_pretrained(self.name_or_path)
            except (OSError, ValueError, TypeError) as err:
                if required:
                    raise ValueError(
                        "chat() renders tool responses with the ViLaVT processor; pass `processor=` (none could be "
                        f"loaded from {self.name_or_path!r}: {err})"
                    ) from err
                logger.warning(
                    "no ViLaVT processor could be loaded from %r (%s): generating without the tool loop; pass "
                    "`processor=` to chat with images", self.name_or_path, err,
                )  # fmt: skip
        return self._vilavt_processor

    @torch.no_grad()
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
        processor=None,
        tool_loop: bool = True,
        max_rounds: int = 5,
        max_regions: int = 8,
        max_turn_tokens: int | None = None,
        incremental: bool = True,
        output_logprobs: bool = False,
        generation_config=None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        assistant_model=None,
        mm_token_type_ids=None,
        **kwargs,
    ):
        r"""Generate with the ViLaVT tool loop: decode until `</tool>` or an answer; on a tool call crop the
        regions from the original images, encode only the new crops jointly with the call's query,
        append the tool response to the live KV cache and resume.

        Args:
            input_ids, attention_mask, pixel_values, image_grid_thw, query_*, image_to_query_mapping:
                the processor's outputs for a batch of conversations (`apply_chat_template(...,
                tokenize=True, return_dict=True)`).
            images: per row, the original images (paths, URLs or PIL) to crop from at full resolution. Default:
                `originals`, which the processor's outputs carry, so `generate(**inputs)` crops from the originals.
                Without either, crops come from the displayed images (lower resolution; a warning is logged).
            processor: the ViLaVT processor (default: the one saved with the checkpoint).
            tool_loop: False decodes with transformers' own `generate` (no tool calls): beam search, assisted
                decoding, static caches, `output_scores` + `compute_transition_scores`, ... This is also what
                happens when no processor is given and none can be loaded.
            max_rounds: tool calls allowed per sequence; the last tool response asks for the answer, and a
                further call ends the episode.
            max_regions: regions allowed in one call (more is an error the model reads).
            max_turn_tokens: cap on sampled tokens per assistant turn.
            incremental: False runs the reference-style loop (rebuild and re-encode everything each round).
            output_logprobs: record log p(token) of each sampled token under softmax(logits / temperature).
            generation_config / kwargs: as in transformers (`do_sample`, `temperature`, `top_p`,
                `num_return_sequences`, `max_new_tokens` — the budget of all new tokens of a sequence, tool
                responses included, default 8192 —, `stop_strings`, `max_time`, `output_logits`,
                `output_scores`, `return_dict_in_generate`, ...). A setting the loop cannot honour (beam search,
                `cache_implementation`, `prompt_lookup_num_tokens`, `use_cache=False`, ...) is an error.
            logits_processor, stopping_criteria, streamer: as in transformers. The streamer receives the
                prompt, the sampled tokens and each tool response, with every image shown as
                `<|vision_start|><|vision_end|>` (its `<|image_pad|>` run left out); batch size 1.

        Returns:
            `ViLaVTGenerateOutput` with `sequences`, `sampled_mask`, `traces`, `episodes` (and `logits` /
            `scores` when asked) if `return_dict_in_generate`, else the `sequences` tensor.
        """
        if tool_loop:
            processor = self._chat_processor(processor, required=False)
        if not tool_loop or processor is None:
            inputs = dict(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, query_ids=query_ids, query_attention_mask=query_attention_mask,
                image_to_query_mapping=image_to_query_mapping, mm_token_type_ids=mm_token_type_ids,
            )  # fmt: skip
            return super().generate(
                **{k: v for k, v in inputs.items() if v is not None},
                generation_config=generation_config,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                streamer=streamer,
                assistant_model=assistant_model,
                **kwargs,
            )
        if input_ids is None:
            raise ValueError("generate() needs input_ids (use the processor's apply_chat_template(..., tokenize=True))")
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        check_loop_arguments(generation_config, kwargs, model_kwargs, assistant_model)
        self._prepare_special_tokens(generation_config, attention_mask is not None, device=self.device)
        episodes = episodes_from_inputs(
            self.config, processor, input_ids, attention_mask, pixel_values, image_grid_thw,
            query_ids, query_attention_mask, image_to_query_mapping, originals if images is None else images,
        )  # fmt: skip
        copies = generation_config.num_return_sequences or 1
        episodes = [ep if i == 0 else ep.clone() for ep in episodes for i in range(copies)]
        if streamer is not None and len(episodes) > 1:
            raise ValueError("a streamer needs a batch of one sequence")
        logits_processor = self._get_logits_processor(
            generation_config,
            input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids,
            logits_processor=logits_processor or LogitsProcessorList(),
            device=self.device,
            model_kwargs={},
        )
        # Stop strings and max_time end an episode as they end a transformers generation (the loop handles
        # end-of-turn tokens and its token budgets itself).
        criteria = StoppingCriteriaList()
        if generation_config.max_time is not None:
            criteria.append(MaxTimeCriteria(max_time=generation_config.max_time))
        if generation_config.stop_strings is not None:
            criteria.append(StopStringCriteria(processor.tokenizer, generation_config.stop_strings))
        stopping_criteria = self._merge_criteria_processor_list(criteria, stopping_criteria or StoppingCriteriaList())
        session = ChatSession(
            self,
            processor,
            generation_config,
            logits_processor,
            stopping_criteria,
            streamer=streamer,
            max_rounds=max_rounds,
            max_regions=max_regions,
            max_new_tokens=generation_config.max_new_tokens or self.DEFAULT_MAX_NEW_TOKENS,
            max_turn_tokens=max_turn_tokens,
            incremental=incremental,
            output_logits=bool(generation_config.output_logits),
            output_scores=bool(generation_config.output_scores),
            output_logprobs=output_logprobs,
        )
        session.run(episodes)
        return session.output(input_ids.repeat_interleave(copies, dim=0), episodes, output_logprobs)

    def chat(self, images, question: str, processor=None, **generate_kwargs):
        """Ask `question` about one or more images (paths, URLs or PIL; video = a list of frames).

        Returns `(answer, trace)`: the text of the final <answer> (None if the model gave none) and the
        `Trace` of every round (`trace.save_png(path)` draws it).
        """
        processor = self._chat_processor(processor)
        originals = [open_image(image) for image in (images if isinstance(images, (list, tuple)) else [images])]
        messages = [
            {
                "role": "user",
                "content": [*({"type": "image", "image": im} for im in originals), {"type": "text", "text": question}],
            }
        ]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.device)
        generate_kwargs["return_dict_in_generate"] = True
        output = self.generate(**inputs, images=[originals], processor=processor, **generate_kwargs)
        trace = output.traces[0]
        return trace.answer, trace


__all__ = [
    "ViLaVTChatMixin",
    "ChatSession",
    "Episode",
    "ToolResponse",
    "tool_response",
    "Trace",
    "RoundTrace",
    "ViLaVTGenerateOutput",
    "full_inputs",
    "episode_vision",
    "episodes_from_inputs",
]

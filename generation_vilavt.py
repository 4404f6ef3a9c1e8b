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
from PIL import Image, ImageDraw
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import LogitsProcessorList, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from .images_vilavt import open_image
from .processing_vilavt import TURN_END
from .prompts_vilavt import tool_message
from .protocol_vilavt import ANSWER_CLOSE, TOOL_CLOSE, TOOL_OPEN, parse_step
from .regions_vilavt import ImageLedger, RegionError

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# What a generation returns
# --------------------------------------------------------------------------------------------------


@dataclass
class RoundTrace:
    """One tool call: what the model asked for and what it got back."""

    thought: str | None
    query: str | None
    regions: list[dict]  # index, bbox_2d (displayed pixels), source original, box_in_original (pixels)
    crops: list  # displayed-size PIL crops
    crop_indices: list[int]
    error: str | None
    notes: list[str]
    generated_tokens: int  # sampled in the turn that made the call
    injected_tokens: int  # tool-response tokens appended (text + image)
    seconds_decode: float
    seconds_tool: float  # parse + crop + render + encode


@dataclass
class Trace:
    """Everything one sequence did; `save_png` draws it."""

    originals: list  # full-resolution PIL images
    rounds: list[RoundTrace] = field(default_factory=list)
    answer: str | None = None
    final_turn: str = ""
    text: str = ""  # the whole completion, decoded
    stop_reason: str = ""
    generated_tokens: int = 0
    injected_tokens: int = 0
    seconds: float = 0.0

    def save_png(self, path, max_side: int = 640) -> str:
        """Draw the original image(s) with every round's boxes (labelled by round) and the crops."""
        colors = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]
        panels = []
        for source, original in enumerate(self.originals):
            scale = min(1.0, max_side / max(original.size))
            panel = original.convert("RGB").resize(
                (max(1, round(original.width * scale)), max(1, round(original.height * scale)))
            )
            draw = ImageDraw.Draw(panel)
            for number, rnd in enumerate(self.rounds, 1):
                for region in rnd.regions:
                    if region.get("source") != source:
                        continue
                    box = [v * scale for v in region["box_in_original"]]
                    color = colors[(number - 1) % len(colors)]
                    draw.rectangle(box, outline=color, width=3)
                    draw.text((box[0] + 3, box[1] + 2), f"r{number}", fill=color)
            draw.text((4, 4), f"image {source}", fill="#000000")
            panels.append(panel)
        crops = []
        for number, rnd in enumerate(self.rounds, 1):
            for index, crop in zip(rnd.crop_indices, rnd.crops):
                scale = min(1.0, (max_side // 2) / max(crop.size))
                tile = crop.convert("RGB").resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
                ImageDraw.Draw(tile).text((3, 2), f"r{number}: image {index}", fill=colors[(number - 1) % len(colors)])
                crops.append(tile)
        pad = 8
        top_h = max((p.height for p in panels), default=0)
        bottom_h = max((c.height for c in crops), default=0)
        width = max(sum(p.width for p in panels), sum(c.width for c in crops)) + pad * (max(len(panels), len(crops)) + 1)
        caption = f"answer: {self.answer!r}  ({len(self.rounds)} rounds, stop: {self.stop_reason})"
        canvas = Image.new("RGB", (max(width, 320), top_h + bottom_h + 3 * pad + 16), "white")
        x = pad
        for panel in panels:
            canvas.paste(panel, (x, pad))
            x += panel.width + pad
        x = pad
        for tile in crops:
            canvas.paste(tile, (x, top_h + 2 * pad))
            x += tile.width + pad
        ImageDraw.Draw(canvas).text((pad, top_h + bottom_h + 2 * pad), caption, fill="#000000")
        canvas.save(path)
        return str(path)


@dataclass
class ViLaVTGenerateOutput(ModelOutput):
    """`sequences`: each row's input ids as given followed by its new tokens (right-padded);
    `sampled_mask`: True where a token was sampled (False for prompt and injected tool responses);
    `traces`: one `Trace` per sequence; `episodes`: the records that rebuild each conversation's model
    inputs (`Episode.model_inputs`); `logits`: per sequence, the raw logits of each sampled token;
    `logprobs`: per sequence, log p(token) of each sampled token under softmax(logits / temperature)."""

    sequences: torch.LongTensor | None = None
    sampled_mask: torch.BoolTensor | None = None
    traces: list | None = None
    episodes: list | None = None
    logits: list | None = None
    logprobs: list | None = None


# --------------------------------------------------------------------------------------------------
# The live KV cache
# --------------------------------------------------------------------------------------------------


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new tokens into spare capacity instead of concatenating: `DynamicLayer`
    copies the whole cache every decoding step, which grows with rows x cached tokens (bench/kv_cache.py).
    `keys` / `values` are views of the filled part; assigning them (row selection, column pruning) adopts
    the tensor as the new buffer."""

    headroom = 0.25  # grow by a quarter of the needed length (at least `min_growth` tokens): amortised O(1)
    min_growth = 256

    def _adopt(self, name: str, tensor):
        if tensor is None or tensor.dim() < 4:  # lazy_initialization's empty placeholders, reset()
            setattr(self, name, None)
            self._length = 0
        else:
            setattr(self, name, tensor)
            self._length = tensor.shape[-2]

    keys = property(
        lambda self: None if self._key_buffer is None else self._key_buffer[..., : self._length, :],
        lambda self, tensor: self._adopt("_key_buffer", tensor),
    )
    values = property(
        lambda self: None if self._value_buffer is None else self._value_buffer[..., : self._length, :],
        lambda self, tensor: self._adopt("_value_buffer", tensor),
    )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._key_buffer = self._value_buffer = None
        self._length = 0
        self.is_initialized = True

    def _ensure(self, buffer, states, needed):
        if buffer is not None and buffer.shape[-2] >= needed and buffer.shape[:-2] == states.shape[:-2]:
            return buffer
        capacity = needed + max(self.min_growth, int(needed * self.headroom))
        grown = states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
        if buffer is not None and self._length:
            grown[..., : self._length, :] = buffer[..., : self._length, :]
        return grown

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, needed = self._length, self._length + key_states.shape[-2]
        self._key_buffer = self._ensure(self._key_buffer, key_states, needed)
        self._value_buffer = self._ensure(self._value_buffer, value_states, needed)
        self._key_buffer[..., start:needed, :] = key_states
        self._value_buffer[..., start:needed, :] = value_states
        self._length = needed
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0


class GrowingCache(DynamicCache):
    """DynamicCache made of `GrowingLayer`s: the live cache of the chatting loop."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


# --------------------------------------------------------------------------------------------------
# One conversation
# --------------------------------------------------------------------------------------------------


class Episode:
    """One conversation being generated: its token ids, images and queries — enough to rebuild the
    full model inputs (the reference-style recompute, or a training forward over a rollout)."""

    def __init__(self, prompt_ids, pixel_rows, grids, query_ids, query_mask, query_texts, mapping, ledger):
        self.ids = list(prompt_ids)
        self.sampled = [False] * len(self.ids)
        self.prompt_length = len(self.ids)
        self.pixel_rows = list(pixel_rows)  # one [patches, 1176] tensor per image
        self.grids = [list(g) for g in grids]
        self.query_ids = list(query_ids)  # one [T] tensor per query row
        self.query_mask = list(query_mask)
        self.query_texts = list(query_texts)
        self.mapping = list(mapping)
        self.ledger = ledger
        self.trace = Trace(originals=ledger.originals)
        self.next_position = 0
        self.turn_start = len(self.ids)
        self.rounds = 0
        self.done = False
        self.waiting = False  # reference-style loop: tool response appended, waiting for the re-prefill
        self.pending: list[int] = []  # ids to feed in the next forward
        self.pending_positions: list[torch.Tensor] = []
        self.pending_features: torch.Tensor | None = None
        self.logits: list[torch.Tensor] = []
        self.logprobs: list[float] = []
        self._turn_clock = time.perf_counter()

    def clone(self) -> "Episode":
        twin = copy.copy(self)
        for name in ("ids", "sampled", "pixel_rows", "grids", "query_ids", "query_mask", "query_texts", "mapping"):
            setattr(twin, name, list(getattr(self, name)))
        twin.ledger = copy.copy(self.ledger)
        twin.ledger.entries = list(self.ledger.entries)
        twin.trace = Trace(originals=self.ledger.originals)
        twin.pending, twin.pending_positions, twin.logits, twin.logprobs = list(self.pending), list(self.pending_positions), [], []
        twin._ids_tensor = None
        return twin

    def ids_tensor(self) -> torch.Tensor:
        """`ids` as a tensor, extended (not rebuilt) as tokens arrive."""
        cached = getattr(self, "_ids_tensor", None)
        if cached is None or len(cached) > len(self.ids):
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

    def add_tool_response(self, response: "ToolResponse") -> None:
        """Record a tool response's crops (as new images) and its query."""
        response.trace.crop_indices = self.ledger.add(response.crops)
        if response.pixel_values is None:
            return
        sizes = [t * h * w for t, h, w in response.grids]
        self.pixel_rows += list(response.pixel_values.split(sizes))
        self.grids += response.grids
        self.query_ids.append(response.query_ids)
        self.query_mask.append(response.query_mask)
        self.query_texts.append(response.trace.query)
        self.mapping += [len(self.query_ids) - 1] * len(response.grids)

    def model_inputs(self, pad_token_id: int = 0) -> dict:
        """The full-sequence model inputs of this conversation (batch of one)."""
        return full_inputs([self], pad_token_id)


def same_conversation(a: Episode, b: Episode) -> bool:
    """Same tokens, images and queries (e.g. several samples of one prompt)."""
    return (
        a.ids == b.ids
        and a.grids == b.grids
        and a.mapping == b.mapping
        and all(x is y or torch.equal(x, y) for x, y in zip(a.pixel_rows, b.pixel_rows))
        and len(a.query_ids) == len(b.query_ids)
        and all(torch.equal(x, y) for x, y in zip(a.query_ids + a.query_mask, b.query_ids + b.query_mask))
    )


def _pad_queries(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    # Right-padding a query row keeps its valid slots (and their rotary positions) where they are.
    return torch.stack([torch.nn.functional.pad(row, (0, length - row.shape[0])) for row in rows])


def full_inputs(episodes: list[Episode], pad_token_id: int, padding_side: str = "left") -> dict:
    """Batch the complete conversations of `episodes` (all tokens, all images, all queries) as model inputs;
    each conversation's query rows are offset in `image_to_query_mapping`."""
    length = max(len(ep.ids) for ep in episodes)
    input_ids = torch.full((len(episodes), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(episodes), length), dtype=torch.long)
    for row, ep in enumerate(episodes):
        span = slice(length - len(ep.ids), length) if padding_side == "left" else slice(0, len(ep.ids))
        input_ids[row, span] = torch.tensor(ep.ids)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **vision_inputs(episodes)}


def vision_inputs(episodes: list[Episode]) -> dict:
    """The vision part of `full_inputs`: every image and query of `episodes`, each conversation's query rows
    offset in `image_to_query_mapping` (empty when no episode has an image)."""
    pixel_rows = [rows for ep in episodes for rows in ep.pixel_rows]
    if not pixel_rows:
        return {}
    query_rows = [q for ep in episodes for q in ep.query_ids]
    query_length = max(q.shape[0] for q in query_rows)
    offsets = torch.tensor([0] + [len(ep.query_ids) for ep in episodes]).cumsum(0).tolist()
    return dict(
        pixel_values=torch.cat(pixel_rows),
        image_grid_thw=torch.tensor([g for ep in episodes for g in ep.grids], dtype=torch.long),
        query_ids=_pad_queries(query_rows, query_length),
        query_attention_mask=_pad_queries([m for ep in episodes for m in ep.query_mask], query_length),
        image_to_query_mapping=torch.tensor(
            [offsets[row] + q for row, ep in enumerate(episodes) for q in ep.mapping], dtype=torch.long
        ),
    )


# --------------------------------------------------------------------------------------------------
# Tool responses (shared by the loop and by training-data replay)
# --------------------------------------------------------------------------------------------------


@dataclass
class ToolResponse:
    """What answers one assistant turn's tool call."""

    ids: list[int]  # closes the assistant turn, the tool turn, then the next assistant header
    closing: int  # how many leading `ids` close the assistant turn
    crops: list  # regions_vilavt.Crop
    grids: list[list[int]]
    pixel_values: torch.Tensor | None
    query_ids: torch.Tensor | None
    query_mask: torch.Tensor | None
    trace: RoundTrace


def tool_response(
    episode: Episode, processor, turn_text: str, final: bool, max_regions: int | None = None, turn_closed: bool = False
) -> ToolResponse:
    """Parse an assistant turn's tool call, crop its regions from the originals and render the tool
    response with the processor's prompt templates. Problems with the call become an error text in the response.
    `turn_closed`: the turn already ends with the end-of-turn token (an unclosed call)."""
    step = parse_step(turn_text, max_regions)
    crops, notes, error, regions = [], [], step.error, []
    if step.tool_call is not None:
        image_processor = processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        try:
            crops = [
                episode.ledger.crop(region, processor.crop_max_pixels, processor.crop_min_pixels, factor)
                for region in step.tool_call.regions
            ]
        except RegionError as err:
            error = str(err)
    query_ids = query_mask = None
    if crops:
        encoding, truncated = processor.tokenize_queries([step.tool_call.query])
        query_ids, query_mask = encoding["query_ids"][0], encoding["query_attention_mask"][0]
        if truncated[0]:
            limit = processor.max_query_length
            notes.append(f"the query is longer than {limit} tokens; only its first {limit} were used")
        regions = [
            {"index": r.index, "bbox_2d": list(r.bbox), "source": c.entry.source, "box_in_original": list(c.pixel_box)}
            for r, c in zip(step.tool_call.regions, crops)
        ]
    message = tool_message([c.image for c in crops], len(episode.ledger), final, error, notes)
    closing = "\n" if turn_closed else TURN_END
    segment = closing + processor.apply_chat_template([message], add_generation_prompt=True)
    encoded = processor(text=[segment], images=[c.image for c in crops] or None, return_tensors="pt")
    closing_ids = processor.tokenizer.encode(closing, add_special_tokens=False)
    return ToolResponse(
        ids=encoded["input_ids"][0].tolist(),
        closing=len(closing_ids),
        crops=crops,
        grids=encoded["image_grid_thw"].tolist() if crops else [],
        pixel_values=encoded["pixel_values"] if crops else None,
        query_ids=query_ids,
        query_mask=query_mask,
        trace=RoundTrace(
            thought=step.thought,
            query=step.tool_call.query if step.tool_call else None,
            regions=regions,
            crops=[c.image for c in crops],
            crop_indices=[],
            error=error,
            notes=notes,
            generated_tokens=0,
            injected_tokens=0,
            seconds_decode=0.0,
            seconds_tool=0.0,
        ),
    )


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def pixels_to_images(pixel_values, grids, image_processor) -> list[Image.Image]:
    """Displayed images rebuilt from patch rows (undo normalisation and patchify) — the fallback source
    of crops when `generate` is not given the original images."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    patch, merge, temporal = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    images, start = [], 0
    for t, h, w in grids:
        rows = pixel_values[start : start + t * h * w].float().cpu()
        start += t * h * w
        x = rows[: h * w].view(h // merge, w // merge, merge, merge, 3, temporal, patch, patch)[..., 0, :, :]
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)
        array = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        images.append(Image.fromarray(array))
    return images


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
        self.output_logprobs = output_logprobs
        # Log-probs are those of the policy itself: softmax(logits / temperature), as a trainer scores them.
        self.temperature = float(generation_config.temperature or 1.0) if generation_config.do_sample else 1.0
        eos = generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.turn_end = eos if isinstance(eos, int) else (eos[0] if eos else None)
        self.pad_id = generation_config.pad_token_id if generation_config.pad_token_id is not None else 0
        self.device = model.device
        self.cache = None
        self.cache_rows: list[int] = []  # episode index of each cache row
        self.mask = None

    # ---- forwards -------------------------------------------------------------------------------

    def _forward(self, **inputs) -> torch.Tensor:
        outputs = self.model(**inputs, past_key_values=self.cache, use_cache=True, logits_to_keep=1, return_dict=True)
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
        if grids:
            positions, _ = self.model.model.get_rope_index(
                token_ids, self.model.model.mm_token_type_ids(token_ids), image_grid_thw=torch.tensor(grids)
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
            self.streamer.put(token_ids[0])

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

    def finish(self, ep: Episode, reason: str) -> None:
        ep.done = True
        turn = self.tokenizer.decode(ep.turn_ids, skip_special_tokens=True)
        step = parse_step(turn)
        ep.trace.final_turn = turn
        ep.trace.answer = step.answer
        # "answer" means an answer was given: a closing tag without an opening one is no answer.
        ep.trace.stop_reason = "no_answer" if reason == "answer" and step.answer is None else reason

    def prepare_tool_call(self, ep: Episode) -> dict | None:
        """Answer the turn's tool call (crops, or an error the model reads) and queue the response.
        Returns the crops to encode, or None (no crops, or the episode ended instead)."""
        started = time.perf_counter()
        if ep.rounds >= self.max_rounds:
            self.finish(ep, "max_rounds")
            return None
        turn_text = self.tokenizer.decode(ep.turn_ids, skip_special_tokens=True)
        response = tool_response(
            ep,
            self.processor,
            turn_text,
            final=ep.rounds + 1 >= self.max_rounds,
            max_regions=self.max_regions,
            turn_closed=ep.ids[-1] in self.eos_ids,
        )
        if response.trace.error is not None and self.processor.prompts.on_error == "end":
            # The authors' RL rollout: a failed call ends the trajectory, with no tool response.
            response.trace.generated_tokens = len(ep.turn_ids)
            if self.turn_end is not None and ep.ids[-1] not in self.eos_ids and ep.new_tokens < self.max_new_tokens:
                self.append(ep, [self.turn_end], sampled=False)  # close the turn, as the model would
            ep.rounds += 1
            ep.trace.rounds.append(response.trace)
            self.finish(ep, "tool_error")
            return None
        if ep.new_tokens + len(response.ids) > self.max_new_tokens:
            self.finish(ep, "max_new_tokens")
            return None
        ep.rounds += 1
        turn_tokens = len(ep.turn_ids)
        ep.add_tool_response(response)
        self.append(ep, response.ids, sampled=False, grids=response.grids)
        record = response.trace
        record.generated_tokens, record.injected_tokens = turn_tokens, len(response.ids)
        record.seconds_decode, record.seconds_tool = started - ep._turn_clock, time.perf_counter() - started
        ep.trace.rounds.append(record)
        ep.turn_start = len(ep.ids)
        if response.pixel_values is None:
            return None
        return {
            "pixel_values": response.pixel_values,
            "image_grid_thw": torch.tensor(response.grids, dtype=torch.long),
            "query_ids": response.query_ids,
            "query_attention_mask": response.query_mask,
        }

    def encode_crops(self, episodes: list[Episode], requests: dict[int, dict]) -> None:
        """Encode the new crops of all rows in one vision call (each row's crops grouped with its query)."""
        if not requests:
            return
        started = time.perf_counter()
        rows = list(requests)
        grids = torch.cat([requests[r]["image_grid_thw"] for r in rows])
        mapping = torch.cat(
            [torch.full((len(requests[r]["image_grid_thw"]),), i, dtype=torch.long) for i, r in enumerate(rows)]
        )
        with torch.no_grad():
            features = self.model.model.get_image_features(
                torch.cat([requests[r]["pixel_values"] for r in rows]).to(self.device),
                grids.to(self.device),
                query_ids=torch.stack([requests[r]["query_ids"] for r in rows]).to(self.device),
                query_attention_mask=torch.stack([requests[r]["query_attention_mask"] for r in rows]).to(self.device),
                image_to_query_mapping=mapping.to(self.device),
            ).pooler_output
        counts = [len(requests[r]["image_grid_thw"]) for r in rows]
        per_row = [torch.cat(features[sum(counts[:i]) : sum(counts[: i + 1])]) for i in range(len(rows))]
        elapsed = time.perf_counter() - started
        for r, row_features in zip(rows, per_row):
            episodes[r].pending_features = row_features
            episodes[r].trace.rounds[-1].seconds_tool += elapsed

    # ---- driver ---------------------------------------------------------------------------------

    def run(self, episodes: list[Episode]) -> list[Episode]:
        started = time.perf_counter()
        for ep in episodes:
            ep._turn_clock = started
        if self.streamer is not None:
            self.streamer.put(torch.tensor(episodes[0].ids))
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
                    episodes[r].logits.append(logits[r])
                self.append(episodes[r], [tokens[r]], sampled=True)
            history = self.history(episodes) if len(self.stopping_criteria) else None
            requests, leaving = {}, set()
            for r in logits:
                ep = episodes[r]
                reason = self.stop_reason(ep, tokens[r], r, history)
                if reason is None:
                    continue
                if reason == "eos" and TOOL_OPEN in self.tokenizer.decode(ep.turn_ids):
                    reason = "tool"  # an attempted call that never closed: the model reads why it failed
                if reason == "tool":
                    request = self.prepare_tool_call(ep)
                    if request is not None:
                        requests[r] = request
                    ep.waiting = not ep.done and not self.incremental
                elif reason == "eos":
                    self.finish(ep, "answer" if parse_step(self.tokenizer.decode(ep.turn_ids)).answer else "eos")
                else:
                    if reason == "answer" and self.turn_end is not None and ep.new_tokens < self.max_new_tokens:
                        self.append(ep, [self.turn_end], sampled=False)  # close the final turn, as the model would
                    self.finish(ep, reason)
                ep._turn_clock = time.perf_counter()
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
        elapsed = time.perf_counter() - started
        for ep in episodes:
            trace = ep.trace
            trace.generated_tokens = sum(ep.sampled)
            trace.injected_tokens = ep.new_tokens - trace.generated_tokens
            trace.seconds = elapsed
            trace.text = self.tokenizer.decode(ep.ids[ep.prompt_length :], skip_special_tokens=True)
        return episodes


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
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    if sum(per_row_images) != len(grids):
        raise ValueError(
            f"input_ids hold {sum(per_row_images)} images (<|vision_start|> tokens) but image_grid_thw has {len(grids)} rows"
        )
    pixel_chunks = list(pixel_values.cpu().split([t * h * w for t, h, w in grids])) if grids else []
    if images is not None:
        if len(images) != len(rows) or any(len(imgs) != n for imgs, n in zip(images, per_row_images)):
            raise ValueError(
                f"`images` must hold each row's original images: expected counts {per_row_images}, "
                f"got {[len(imgs) for imgs in images] if len(images) == len(rows) else len(images)} "
                f"for {len(rows)} rows"
            )
        originals = [open_image(image) for row in images for image in row]
    elif grids:
        logger.warning_once(
            "generate() got no original images (`images=`); crops are taken from the displayed images, "
            "at their lower resolution."
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
        ledger = ImageLedger(originals[start : start + count], [(w * patch, h * patch) for _, h, w in row_grids])
        episodes.append(
            Episode(
                ids,
                pixel_chunks[start : start + count],
                row_grids,
                [query_rows[q] for q in used],
                [mask_rows[q] for q in used],
                [""] * len(used),
                [used.index(q) for q in row_mapping] if row_mapping else [],
                ledger,
            )
        )
        start += count
    return episodes


__all__ = ["ChatSession", "Episode", "Trace", "RoundTrace", "ViLaVTGenerateOutput", "full_inputs", "episodes_from_inputs"]

"""Stage 0b of the tiny demo model: its LLM learns to ground (write the red frame's box) before SFT.

Qwen2.5-VL reads boxes off images from its pretraining; the demo's from-scratch LLM does not. Trained on
full trajectories right away, it learns the rest of the protocol and writes nearly the same box for every
image: a box's few digit tokens are a small part of a ~300-token conversation, and attention spread over
the system prompt gives the one image token under the frame a tiny share of the gradient. Whether SFT
escapes that is a matter of luck (the same recipe lands at ~90 % or ~25 % depending on the data order).

So the LLM (vision frozen) first trains on short sequences — the image's tokens, then the gold first
assistant turn (thought and tool call) — with the loss on that turn. Without the system prompt and the
question there are a dozen image tokens to attend to, and the grounding is learned in a few hundred steps.
"""

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .remote_code.processing_vilavt import TURN_END, open_image
from .remote_code.protocol_vilavt import render_tool_call
from .train.common import set_trainable
from .trajectories import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass
class GroundingExample:
    pixel_values: torch.Tensor  # [patches, C * T * P * P] of the one original image
    grid: list[int]  # its (t, h, w) patch grid
    ids: list[int]  # image span, then the first assistant turn
    labels: list[int]  # IGNORE_INDEX on the image span


def grounding_examples(rows: list[dict], processor, image_root) -> list[GroundingExample]:
    """One example per one-image trajectory whose first turn is a tool call (`single`, `nested`)."""
    vision_end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    examples = []
    for row in rows:
        first = (row.get("turns") or [{}])[0]
        if len(row["images"]) != 1 or "regions" not in first:
            continue
        shown = processor.fit_originals([open_image(Path(image_root) / row["images"][0])], row.get("max_pixels"))
        regions = [(r["index"], r["bbox_2d"]) for r in first["regions"]]
        text = f"<|vision_start|>{processor.image_token}<|vision_end|>"
        text += render_tool_call(regions, first["query"], first["thought"]) + TURN_END
        encoded = processor(text=[text], images=shown, return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        image_span = ids.index(vision_end) + 1
        labels = [IGNORE_INDEX] * image_span + ids[image_span:]
        examples.append(GroundingExample(encoded["pixel_values"], encoded["image_grid_thw"][0].tolist(), ids, labels))
    return examples


def _batch(examples: list[GroundingExample], processor) -> dict:
    length = max(len(e.ids) for e in examples)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([e.ids + [pad] * (length - len(e.ids)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (length - len(e.labels)) for e in examples])
    queries, _ = processor.tokenize_queries([""] * len(examples))  # originals: f0 = V(I, ∅)
    return dict(
        input_ids=input_ids,
        attention_mask=(torch.arange(length)[None] < torch.tensor([len(e.ids) for e in examples])[:, None]).long(),
        pixel_values=torch.cat([e.pixel_values for e in examples]),
        image_grid_thw=torch.tensor([e.grid for e in examples]),
        **queries,
        image_to_query_mapping=torch.arange(len(examples)),
        labels=labels,
    )


def turn_accuracy(model, processor, examples: list[GroundingExample]) -> float:
    """Share of examples whose whole first turn (thought, box digits, query) is the argmax, teacher-forced."""
    hits = 0
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            batch = _batch(examples[start : start + 32], processor)
            labels = batch.pop("labels")[:, 1:]
            predicted = model(**batch).logits[:, :-1].argmax(-1)
            hits += int(((predicted == labels) | (labels == IGNORE_INDEX)).all(-1).sum())
    return hits / len(examples)


def warm_up_grounding(
    model, processor, examples: list[GroundingExample], steps: int = 750, batch_size: int = 16, lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Train the LLM (the vision path stays frozen) on `examples` (the last 10 % held out); returns the
    held-out turn accuracy."""
    held_out = max(1, len(examples) // 10)
    train, test = examples[:-held_out], examples[-held_out:]
    states = {p: p.requires_grad for p in model.parameters()}
    set_trainable(model, {"llm": True})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 75)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        loss = model(**_batch(rng.sample(train, min(batch_size, len(train))), processor)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            logger.info("grounding warm-up step %d/%d: loss %.4f", step + 1, steps, loss.item())
    model.eval()
    for p, state in states.items():
        p.requires_grad_(state)
    result = {"turn": turn_accuracy(model, processor, test)}
    logger.info("grounding warm-up: %d examples, held-out %s", len(examples), result)
    return result

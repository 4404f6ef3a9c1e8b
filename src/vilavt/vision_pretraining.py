"""Stage 0 of the tiny demo model: pretrain its vision tower on the views of the synthetic zoom task.

Real ViLaVT starts from Qwen2.5-VL, whose vision encoder already sees where things are and what they look
like. A tiny model trained from scratch end to end on CPU never gets there in minutes: its image tokens
collapse into a constant that the LLM uses as an attention sink. So the demo first trains the vision
tower (ViT, merger, query path) on every view of the gold trajectories, as the model sees them (crops
encoded with their query), with throw-away heads on the merged tokens:

* *target*: which token holds the bar inside the red frame (a softmax over the view's tokens);
* *direction*: the bar's direction, from the tokens under its frame, in views where it is readable;
* *position*: each token's row and column (what a grounding model knows).

The grounding warm-up (`vilavt.grounding_warmup`), SFT and GRPO then train the LLM on top (the vision
tower frozen).
"""

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .remote_code.processing_vilavt import open_image
from .remote_code.protocol_vilavt import Region
from .remote_code.regions_vilavt import ImageLedger
from .synthetic import CELL, CURRICULUM, GLYPHS

logger = logging.getLogger(__name__)

MAX_GRID = 32  # position heads: rows / columns of tokens


@dataclass
class View:
    image: Image.Image  # as shown to the model
    query: str  # "" for an original (f0 = V(I, ∅))
    frame: tuple[float, float, float, float]  # the frame holding the bar, displayed pixels of this view
    label: int  # GLYPHS index where the bar is readable in this view, else -1
    tag: str  # e.g. "single/original", "nested/crop 2"


def _frame_in_view(frame, original: Image.Image, entry) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = entry.box  # normalised box of the view in its original
    sx, sy = entry.width / ((x2 - x1) * original.width), entry.height / ((y2 - y1) * original.height)
    ox, oy = x1 * original.width, y1 * original.height
    return ((frame[0] - ox) * sx, (frame[1] - oy) * sy, (frame[2] - ox) * sx, (frame[3] - oy) * sy)


def task_views(row: dict, processor, image_root) -> list[View]:
    """Every image of a task's gold trajectory as the model sees it: the originals, then each crop made
    with the inference cropping code. The bar is readable in a `direct` task's originals and in the
    last crop of each original."""
    originals = [open_image(Path(image_root) / name) for name in row["images"]]
    shown = processor.fit_originals(originals, row.get("max_pixels"))
    ledger = ImageLedger(originals, [image.size for image in shown])
    images, queries = list(shown), [""] * len(shown)
    for turn in row["turns"][:-1]:
        crops = [
            ledger.crop(Region(r["index"], tuple(r["bbox_2d"])), processor.crop_max_pixels, processor.crop_min_pixels,
                        processor.patch_factor)
            for r in turn["regions"]
        ]  # fmt: skip
        ledger.add(crops)
        images += [crop.image for crop in crops]
        queries += [turn["query"]] * len(crops)
    last = {entry.source: k for k, entry in enumerate(ledger.entries)}
    views = []
    for k, entry in enumerate(ledger.entries):
        readable = row["kind"] in CURRICULUM or (k >= len(originals) and last[entry.source] == k)
        label = GLYPHS.index(row["glyphs"][entry.source]) if readable else -1
        where = "original" if k < len(originals) else f"crop {k}"
        frame = _frame_in_view(row["frames"][entry.source], originals[entry.source], entry)
        views.append(View(images[k], queries[k], frame, label, f"{row['kind']}/{where}"))
    return views


class VisionProbe(torch.nn.Module):
    """The throw-away heads on the merged image tokens."""

    def __init__(self, hidden: int):
        super().__init__()
        self.target = torch.nn.Linear(hidden, 1)
        self.direction = torch.nn.Linear(hidden, len(GLYPHS))
        self.row = torch.nn.Linear(hidden, MAX_GRID)
        self.col = torch.nn.Linear(hidden, MAX_GRID)


def _token_targets(view: View, rows: int, cols: int):
    """(index of the token holding the bar's centre or -1 when it lies on a token border, mask of the
    tokens under the frame)."""
    x1, y1, x2, y2 = view.frame
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    on_border = min(cx % CELL, CELL - cx % CELL, cy % CELL, CELL - cy % CELL) < 2
    target = -1 if on_border else min(rows - 1, int(cy // CELL)) * cols + min(cols - 1, int(cx // CELL))
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    under = (c * CELL < x2) & ((c + 1) * CELL > x1) & (r * CELL < y2) & ((r + 1) * CELL > y1)
    return target, under.flatten()


def _probe_step(model, processor, probe: VisionProbe, views: list[View]):
    """Losses and accuracies of the heads on a batch of views."""
    images = [v.image for v in views]
    encoded = processor.image_processor(images=images, size=processor.size_keeping(images), return_tensors="pt")
    queries, _ = processor.tokenize_queries([v.query for v in views])
    features = model.model.get_image_features(
        encoded["pixel_values"],
        encoded["image_grid_thw"],
        **queries,
        image_to_query_mapping=torch.arange(len(views)),
    ).pooler_output
    merge = model.model.visual.spatial_merge_size
    losses, hits = {"target": [], "direction": [], "position": []}, {"target": [], "direction": [], "position": []}
    for view, tokens, (_, h, w) in zip(views, features, encoded["image_grid_thw"].tolist()):
        rows, cols = h // merge, w // merge
        target, under = _token_targets(view, rows, cols)
        if target >= 0:
            scores = probe.target(tokens).squeeze(-1)
            losses["target"].append(F.cross_entropy(scores[None], torch.tensor([target])))
            hits["target"].append(int(scores.argmax()) == target)
        if view.label >= 0:
            logits = probe.direction(tokens[under].mean(0))
            losses["direction"].append(F.cross_entropy(logits[None], torch.tensor([view.label])))
            hits["direction"].append(int(logits.argmax()) == view.label)
        grid_rows = torch.arange(rows).repeat_interleave(cols)
        grid_cols = torch.arange(cols).repeat(rows)
        row_logits, col_logits = probe.row(tokens), probe.col(tokens)
        losses["position"].append(F.cross_entropy(row_logits, grid_rows) + F.cross_entropy(col_logits, grid_cols))
        hits["position"] += ((row_logits.argmax(-1) == grid_rows) & (col_logits.argmax(-1) == grid_cols)).tolist()
    loss = sum(torch.stack(parts).mean() for parts in losses.values() if parts)
    return loss, hits


def vision_parameters(model) -> list[torch.nn.Parameter]:
    """The vision path: ViT with its query-aware blocks and merger, query encoder and projection."""
    inner = model.model
    return [*inner.visual.parameters(), *inner.text_encoder.parameters(), *inner.text_proj.parameters()]


def pretrain_vision(
    model, processor, views: list[View], steps: int = 400, batch_size: int = 32, lr: float = 1e-3, seed: int = 0
) -> dict:
    """Train the vision path on `views` (the last 10 % held out); returns held-out accuracies per head and,
    for the direction head, per view tag."""
    held_out = max(1, len(views) // 10)
    train, test = views[:-held_out], views[-held_out:]
    probe = VisionProbe(model.config.vision_config.out_hidden_size)
    optimizer = torch.optim.AdamW([*vision_parameters(model), *probe.parameters()], lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        loss, _ = _probe_step(model, processor, probe, rng.sample(train, min(batch_size, len(train))))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0:
            logger.info("vision pretraining step %d/%d: loss %.3f", step + 1, steps, loss.item())
    model.eval()
    hits, by_tag = {"target": [], "direction": [], "position": []}, {}
    with torch.no_grad():
        for start in range(0, len(test), 64):
            batch = test[start : start + 64]
            _, batch_hits = _probe_step(model, processor, probe, batch)
            for name, values in batch_hits.items():
                hits[name] += values
            readable = [v for v in batch if v.label >= 0]
            for view, hit in zip(readable, batch_hits["direction"]):
                by_tag.setdefault(view.tag, []).append(hit)
    result = {name: sum(values) / len(values) for name, values in hits.items() if values}
    result["direction_by_view"] = {tag: sum(values) / len(values) for tag, values in sorted(by_tag.items())}
    logger.info("vision pretraining: %d views, held-out %s", len(views), result)
    return result

"""Synthetic zoom tasks whose answer cannot be read at the first look but can after zooming in.

Every image is a large canvas (long side >= 1024 px, random aspect) with clutter, frames in other colours
and one red frame holding a bar that points one of four ways (vertical, horizontal, rising, falling).
Sizes are set in the pixels the model sees (ViLaVT's zoom shows a crop at most at 2x the pixel density of
the view it was picked from, REFERENCE.md §2.3, so each zoom doubles the detail):

* `single` — at the first look the bar is 2.4 px long, a blob whose colour is the same whichever way it
  points; one zoom on the red frame shows it at 4.8 px, enough to tell its direction. "Which way does
  the bar inside the red frame point?" (chance: 25 %).
* `multi`  — two such images (they share the pixel budget); "Do the bars inside the red frames of image
  0 and image 1 point the same way?" (yes / no). One tool call with a region in each image (encoded
  jointly with the query) answers it.
* `nested` — a big red frame with a small red frame in one of its corners; the bar is 1.2 px at the
  first look and 2.4 px after one zoom: only a zoom into the crop (a crop of a crop) reads it.
* `direct` (curriculum) — a `single` task shown at 4x the pixels, where the bar is readable at once:
  the gold trajectory answers without the tool (teaches reading and when a zoom is not needed).

The canvas's background is tinted like graph paper: its hue changes from left to right and its
brightness from top to bottom, so where something is shows in its surroundings.

Frames sit in the middle of one 28-pixel cell of the displayed image (one LLM image token), so the gold
box is that cell; a crop of a cell is shown at 56 x 56 pixels (2 x 2 tokens), and the small frame of a
nested task sits in the middle of one of those four tokens. Every task is deterministic in its seed and
comes with a gold trajectory in the `vilavt.trajectories` schema (thought, query, boxes in the displayed
pixels the model sees, answer), replayed for SFT.
"""

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .remote_code.processing_vilavt import displayed_size

logger = logging.getLogger(__name__)

KINDS = ("single", "multi", "nested")
CURRICULUM = ("direct",)
CELL = 28  # one LLM image token covers 28 x 28 displayed pixels
DIRECT_ZOOM = 2  # `direct` tasks show the originals at 2x the side (4x the pixels)

GLYPHS = ("vertical", "horizontal", "rising", "falling")  # which way the bar points
FRAME_COLOR = (220, 20, 20)
DECOY_COLORS = [(30, 90, 220), (20, 150, 60), (40, 40, 40)]


@dataclass(frozen=True)
class Spec:
    canvas: tuple[int, int]  # range of the long side, original pixels
    bar: float  # bar length, displayed pixels at the first look
    frame: float  # side of the frame holding the bar, displayed pixels at the first look
    decoys: int  # frames in other colours
    outer: float = 0.0  # nested: side of the big frame around it, displayed pixels at the first look


SPECS = {
    "single": Spec(canvas=(1024, 1536), bar=2.4, frame=10.0, decoys=3),
    "multi": Spec(canvas=(1024, 1536), bar=2.4, frame=10.0, decoys=2),
    "nested": Spec(canvas=(1536, 2560), bar=1.2, frame=5.0, decoys=3, outer=24.0),
}
SPECS["direct"] = SPECS["single"]


def draw_bar(draw: ImageDraw.ImageDraw, glyph: str, cx: float, cy: float, length: float, color=(10, 10, 10)) -> None:
    """A thick bar centred on (cx, cy) pointing `glyph`'s way; every direction has the same ink."""
    half, width = length / 2, max(2, round(0.3 * length))
    d = half / 2**0.5
    ends = {
        "vertical": (cx, cy - half, cx, cy + half),
        "horizontal": (cx - half, cy, cx + half, cy),
        "rising": (cx - d, cy + d, cx + d, cy - d),
        "falling": (cx - d, cy - d, cx + d, cy + d),
    }
    draw.line(ends[glyph], fill=color, width=width)


def draw_frame(draw: ImageDraw.ImageDraw, cx: float, cy: float, side: float, color) -> tuple[float, float, float, float]:
    """A white square with a `color` border (18 % of its side) centred on (cx, cy); returns its box."""
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    draw.rectangle(box, fill=(250, 250, 250), outline=color, width=max(2, round(0.18 * side)))
    return box


def clutter(draw, rng: random.Random, size: tuple[int, int], count: int) -> None:
    """Shapes and lines in colours far from the frame's red."""
    width, height = size
    for _ in range(count):
        color = (rng.randrange(0, 120), rng.randrange(60, 230), rng.randrange(60, 255))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(20, width / 6), rng.uniform(20, height / 6)
        shape = rng.choice(("rectangle", "ellipse", "line"))
        if shape == "line":
            draw.line((x, y, x + w, y + h), fill=color, width=rng.randrange(2, 8))
        else:
            getattr(draw, shape)((x, y, x + w, y + h), fill=color)


def tinted_background(width: int, height: int) -> Image.Image:
    """Hue from cyan to violet left to right, brightness from light to darker top to bottom (never red).
    Computed at 1/16 of the size and resized: the tint is smooth, and this is 5x faster."""
    w, h = max(2, width // 16), max(2, height // 16)
    hue = np.linspace(128, 200, w, dtype=np.float32)[None, :].repeat(h, 0)
    value = np.linspace(250, 170, h, dtype=np.float32)[:, None].repeat(w, 1)
    channels = [hue, np.full_like(hue, 70), value]
    small = Image.merge("HSV", [Image.fromarray(c.astype(np.uint8)) for c in channels]).convert("RGB")
    return small.resize((width, height), Image.Resampling.BILINEAR)


def canvas_size(rng: random.Random, spec: Spec, budget: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(canvas size, displayed size at `budget`): a random size and aspect, adjusted so that the displayed
    image keeps the canvas's aspect exactly (every displayed cell is a square of the canvas, so a crop of
    one cell is square)."""
    while True:
        long_side = rng.randrange(*spec.canvas)
        short_side = round(long_side * rng.uniform(0.6, 1.0))
        width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        shown = displayed_size(width, height, budget[0], budget[1], CELL)
        scale = ((width * height) / (shown[0] * shown[1])) ** 0.5
        canvas = (round(shown[0] * scale), round(shown[1] * scale))
        if max(canvas) >= spec.canvas[0] and displayed_size(*canvas, budget[0], budget[1], CELL) == shown:
            return canvas, shown


def scene(rng: random.Random, spec: Spec, glyph: str, budget: tuple[int, int]):
    """One image: returns (image, frame box in original pixels, gold boxes, displayed size).

    The frame holding the bar is centred in one cell of the displayed token grid (at `budget`), so a
    one-cell box zooms on it. Nested: a big frame fills that cell and the small one sits in the middle
    of one quarter of it, i.e. of one token of the 56 x 56 crop; the gold boxes are the cell, then that
    token of the crop.
    """
    (width, height), shown = canvas_size(rng, spec, budget)
    scale = width / shown[0]  # original pixels per displayed pixel (the same across and down)
    image = tinted_background(width, height)
    draw = ImageDraw.Draw(image)
    clutter(draw, rng, (width, height), rng.randrange(12, 24))
    cells = [(c, r) for c in range(shown[0] // CELL) for r in range(shown[1] // CELL)]
    target, *decoys = rng.sample(cells, 1 + spec.decoys)
    for cell in decoys:
        centre = ((cell[0] + 0.5) * CELL * scale, (cell[1] + 0.5) * CELL * scale)
        draw_frame(draw, *centre, spec.frame * scale, rng.choice(DECOY_COLORS))
        draw_bar(draw, rng.choice(GLYPHS), *centre, spec.bar * scale)
    cx, cy = (target[0] + 0.5) * CELL, (target[1] + 0.5) * CELL  # displayed pixels
    boxes = [[target[0] * CELL, target[1] * CELL, (target[0] + 1) * CELL, (target[1] + 1) * CELL]]
    if spec.outer:
        draw_frame(draw, cx * scale, cy * scale, spec.outer * scale, FRAME_COLOR)
        qx, qy = rng.randrange(2), rng.randrange(2)  # the quarter of the cell, i.e. the token of the crop
        cx, cy = (target[0] + qx / 2 + 0.25) * CELL, (target[1] + qy / 2 + 0.25) * CELL
        boxes.append([qx * CELL, qy * CELL, (qx + 1) * CELL, (qy + 1) * CELL])
    centre = (cx * scale, cy * scale)
    frame = draw_frame(draw, *centre, spec.frame * scale, FRAME_COLOR)
    draw_bar(draw, glyph, *centre, spec.bar * scale)
    return image, frame, boxes, shown


def make_task(seed: int, kind: str, processor, max_pixels: int | None = None) -> tuple[dict, list[Image.Image]]:
    """A task and its gold trajectory (`vilavt.trajectories` schema, image paths to be filled in).

    The scene is laid out for the processor's default budget; `max_pixels` shows the originals at another
    budget (an evaluation at another initial resolution: the gold answer holds, the gold boxes are for
    the default budget).
    """
    if kind not in KINDS + CURRICULUM:
        raise ValueError(f"kind must be one of {KINDS + CURRICULUM}, got {kind!r}")
    rng = random.Random(f"{kind}:{seed}")
    spec = SPECS[kind]
    count = 2 if kind == "multi" else 1
    if kind == "multi" and rng.random() < 0.5:
        glyphs = [rng.choice(GLYPHS)] * 2  # half the pairs point the same way
    else:
        glyphs = rng.sample(GLYPHS, count)
    scenes = [scene(rng, spec, glyph, processor.original_budget(count)) for glyph in glyphs]
    images = [image for image, _, _, _ in scenes]
    boxes = [gold for _, _, gold, _ in scenes]
    query = "the bar inside the red frame"
    question = "Which way does the bar inside the red frame point: vertical, horizontal, rising or falling?"
    answer, problem_type = glyphs[0], "free text"
    zoom = "The bar is too small to see. Zoom in on the red frame."
    if kind == "direct":
        max_pixels = DIRECT_ZOOM**2 * processor.max_pixels
        turns = [{"thought": f"The bar is {answer}.", "answer": answer}]
    elif kind == "single":
        turns = [
            {"thought": zoom, "query": query, "regions": [{"index": 0, "bbox_2d": boxes[0][0]}]},
            {"thought": f"The bar is {answer}.", "answer": answer},
        ]
    elif kind == "multi":
        question = "Do the bars inside the red frames of image 0 and image 1 point the same way?"
        answer, problem_type = ("yes" if glyphs[0] == glyphs[1] else "no"), "judgment"
        turns = [
            {"thought": "Both bars are too small to see. Zoom in on both red frames.", "query": "the bars inside the red frames",
             "regions": [{"index": 0, "bbox_2d": boxes[0][0]}, {"index": 1, "bbox_2d": boxes[1][0]}]},
            {"thought": f"The bars are {glyphs[0]} and {glyphs[1]}.", "answer": answer},
        ]  # fmt: skip
    else:
        turns = [
            {"thought": zoom, "query": query, "regions": [{"index": 0, "bbox_2d": boxes[0][0]}]},
            {"thought": "Still too small. Zoom in on the small red frame.", "query": query,
             "regions": [{"index": 1, "bbox_2d": boxes[0][1]}]},
            {"thought": f"The bar is {answer}.", "answer": answer},
        ]  # fmt: skip
    row = {
        "id": f"{kind}-{seed:06d}",
        "kind": kind,
        "question": question,
        "problem_type": problem_type,
        "answer": answer,
        "turns": turns,
        "original_sizes": [list(image.size) for image in images],
        "frames": [[round(v, 1) for v in frame] for _, frame, _, _ in scenes],  # the bar's frame, original pixels
        "glyphs": glyphs,
    }
    if max_pixels:
        row["max_pixels"] = max_pixels
    return row, images


def _write_one(job) -> str:
    out, seed, kind, processor = job
    row, images = make_task(seed, kind, processor)
    names = []
    for k, image in enumerate(images):
        name = f"images/{row['id']}-{k}.png"
        image.save(out / name, compress_level=1)
        names.append(name)
    row["images"] = names
    row["question_id"], row["category"] = row["id"], row["kind"]  # also a benchmark file (vilavt eval)
    return json.dumps(row)


def write_tasks(out, count: int, seed: int, kinds, processor, split: str = "train", workers: int = 1) -> Path:
    """Write `count` tasks (cycling through `kinds`, seeds `seed`, `seed + 1`, …) as PNGs plus `{split}.jsonl`;
    returns the JSONL path. `workers` > 1 draws them in parallel processes (same result)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed + i, kinds[i % len(kinds)], processor) for i in range(count)]
    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:
            lines = pool.map(_write_one, jobs, chunksize=32)
    else:
        lines = [_write_one(job) for job in jobs]
    path = out / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    logger.info("wrote %d tasks to %s", count, path)
    return path


TRAIN_SPLIT, RL_SPLIT = "train", "rl"  # the files examples/configs/*_tiny.yaml read (train.jsonl, rl.jsonl)
RL_SEED = 5_000_000  # GRPO's questions come from another seed range than the trajectories


def write_training_sets(out, n: int, processor, rl_n: int | None = None, seed: int = 0, workers: int = 1) -> dict:
    """The tiny training quickstart's data: `n` gold trajectories of every kind (SFT, `train.jsonl`) and `rl_n`
    (default `n`) single-image questions with answers (GRPO, `rl.jsonl`), images under `out/images`; seeds below
    10^7, so `vilavt synth-eval` stays held out. Returns {split: path}."""
    if n < 1 or (rl_n is not None and rl_n < 1):
        raise ValueError(f"the number of tasks must be at least 1, got {n if n < 1 else rl_n}")
    train = write_tasks(out, n, seed, [*KINDS, *CURRICULUM], processor, split=TRAIN_SPLIT, workers=workers)
    rl = write_tasks(out, n if rl_n is None else rl_n, RL_SEED + seed, ["single"], processor, split=RL_SPLIT, workers=workers)
    return {TRAIN_SPLIT: train, RL_SPLIT: rl}

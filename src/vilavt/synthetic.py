"""Synthetic zoom tasks whose answer cannot be read in the first look but can after zooming in.

* `single` — a large canvas (long side ≥ 1024 px, random aspect) with clutter, decoy frames in other
  colours and one small red frame holding a seven-segment digit; "What digit is inside the red frame?".
  The canvas's background is tinted like graph paper: its hue changes from left to right and its
  brightness from top to bottom, so where something is shows in its surroundings (a tiny model learns
  boxes from that in minutes; reading positions from rotary embeddings alone takes far more training).
  The digit is a few pixels tall at the initial pixel budget; one zoom on the frame makes it readable.
* `multi`  — two such images; "Is the digit in image 0 larger than the digit in image 1?". One tool call
  with a region in each image (the crops are encoded jointly) answers it.
* `nested` — a bigger canvas and a smaller digit: the first zoom is still too coarse, a zoom into the
  crop (a crop of a crop) reads it.

Every task is deterministic in its seed and comes with a gold trajectory (thought, query, boxes in the
displayed pixels the model sees, answer) in the `vilavt.trajectories` schema, replayed for SFT.
Every look is a small grid: originals are shown at about 112 x 112 (4 x 4 tokens of 28 pixels) and the
gold box is the token cell holding the frame; crops are shown at 224 x 224 and a box inside a crop is a
56-pixel block. So each zoom magnifies 8x (original -> crop) or 4x (crop -> crop).
"""

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .remote_code.processing_vilavt import displayed_size
from .remote_code.protocol_vilavt import Region
from .remote_code.regions_vilavt import ImageLedger

logger = logging.getLogger(__name__)

KINDS = ("single", "multi", "nested")
CELL = 28  # one LLM image token covers 28 x 28 displayed pixels

# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle).
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abfgcd"}
FRAME_COLOR = (220, 20, 20)
DECOY_COLORS = [(30, 90, 220), (20, 150, 60), (120, 60, 170), (230, 160, 20), (40, 40, 40)]


@dataclass(frozen=True)
class Spec:
    canvas: tuple[int, int]  # range of the long side, original pixels
    glyph: int  # digit height, original pixels
    frame: float  # frame side / digit height
    decoys: int  # frames in other colours


SPECS = {
    "single": Spec(canvas=(1024, 1536), glyph=28, frame=2.2, decoys=3),
    "multi": Spec(canvas=(1024, 1536), glyph=40, frame=2.2, decoys=2),
    "nested": Spec(canvas=(2400, 3200), glyph=12, frame=3.0, decoys=3),
}
INNER_CELL = 56  # a box inside a crop: a 56-pixel block of the (224-pixel) crop's grid


def draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: float, y: float, height: float, color) -> None:
    """A seven-segment digit whose top-left corner is (x, y)."""
    width, stroke = 0.6 * height, max(1.0, 0.16 * height)
    half = height / 2
    bars = {
        "a": (x, y, x + width, y + stroke),
        "g": (x, y + half - stroke / 2, x + width, y + half + stroke / 2),
        "d": (x, y + height - stroke, x + width, y + height),
        "f": (x, y, x + stroke, y + half),
        "b": (x + width - stroke, y, x + width, y + half),
        "e": (x, y + half, x + stroke, y + height),
        "c": (x + width - stroke, y + half, x + width, y + height),
    }
    for segment in SEGMENTS[digit]:
        draw.rectangle(bars[segment], fill=color)


def framed_digit(draw, digit: int, x: float, y: float, glyph: int, color, scale: float = 2.2):
    """A digit in a square frame (side `scale` x the digit's height) whose top-left corner is (x, y);
    returns the frame's box."""
    side = scale * glyph
    line = max(3, round(0.2 * glyph * scale / 2.2))
    draw.rectangle((x, y, x + side, y + side), fill=(250, 250, 250), outline=color, width=line)
    draw_digit(draw, digit, x + (side - 0.6 * glyph) / 2, y + (side - glyph) / 2, glyph, (10, 10, 10))
    return (x, y, x + side, y + side)


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
    """Hue from cyan to violet left to right, brightness from light to darker top to bottom (never red)."""
    hue = np.linspace(128, 200, width, dtype=np.float32)[None, :].repeat(height, 0)
    value = np.linspace(250, 170, height, dtype=np.float32)[:, None].repeat(width, 1)
    channels = [hue, np.full_like(hue, 70), value]
    return Image.merge("HSV", [Image.fromarray(c.astype(np.uint8)) for c in channels]).convert("RGB")


def canvas_size(rng: random.Random, spec: Spec) -> tuple[int, int]:
    long_side = rng.randrange(*spec.canvas)
    short_side = round(long_side * rng.uniform(0.6, 1.0))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def cell_box(box, width: int, height: int, cell: int = CELL) -> list[int]:
    """The grid cells (of a width x height displayed image) covering `box`."""
    x1, y1, x2, y2 = box
    return [
        max(0, math.floor(x1 / cell) * cell),
        max(0, math.floor(y1 / cell) * cell),
        min(width, math.ceil(x2 / cell) * cell),
        min(height, math.ceil(y2 / cell) * cell),
    ]


def scene(rng: random.Random, spec: Spec, digit: int, display_pixels: tuple[int, int], processor=None):
    """One image: returns (image, frame box in original pixels, displayed size).

    The red frame is placed inside a single cell of the displayed token grid, so a one-cell box zooms on
    it. With `processor` (nested tasks), it is placed inside one 56-pixel block of the crop that zoom
    shows (computed with the inference cropping code), so a second, one-block zoom reads it.
    """
    width, height = canvas_size(rng, spec)
    shown = displayed_size(width, height, display_pixels[0], display_pixels[1], CELL)
    sx, sy = shown[0] / width, shown[1] / height  # displayed pixels per original pixel
    image = tinted_background(width, height)
    draw = ImageDraw.Draw(image)
    clutter(draw, rng, (width, height), rng.randrange(12, 24))
    side = spec.frame * spec.glyph
    cells = [(c, r) for c in range(shown[0] // CELL) for r in range(shown[1] // CELL)]

    def corner(cell):
        slack = max(0.0, CELL - side * max(sx, sy) - 2)
        return (cell[0] * CELL + 1 + rng.uniform(0, slack)) / sx, (cell[1] * CELL + 1 + rng.uniform(0, slack)) / sy

    target = rng.choice(cells)
    if processor is None:
        x, y = corner(target)
    else:
        box = (target[0] * CELL, target[1] * CELL, (target[0] + 1) * CELL, (target[1] + 1) * CELL)
        crop = ImageLedger([image], [shown]).crop(
            Region(0, box), processor.crop_max_pixels, processor.crop_min_pixels, processor.patch_factor
        )
        x1, y1, x2, y2 = crop.pixel_box
        px, py = crop.entry.width / (x2 - x1), crop.entry.height / (y2 - y1)  # crop pixels per original pixel
        bx = rng.randrange(crop.entry.width // INNER_CELL) * INNER_CELL
        by = rng.randrange(crop.entry.height // INNER_CELL) * INNER_CELL
        slack = max(0.0, INNER_CELL - side * max(px, py) - 4)
        x = x1 + (bx + 2 + rng.uniform(0, slack)) / px
        y = y1 + (by + 2 + rng.uniform(0, slack)) / py
    taken = [target]
    for _ in range(spec.decoys):
        taken.append(rng.choice([cell for cell in cells if cell not in taken]))
        framed_digit(draw, rng.randrange(10), *corner(taken[-1]), spec.glyph, rng.choice(DECOY_COLORS), spec.frame)
    frame = framed_digit(draw, digit, x, y, spec.glyph, FRAME_COLOR, spec.frame)
    return image, frame, shown


def shown_box(box, original_size, shown_size):
    sx, sy = shown_size[0] / original_size[0], shown_size[1] / original_size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def make_task(seed: int, kind: str, processor, max_pixels: int | None = None) -> tuple[dict, list[Image.Image]]:
    """A task and its gold trajectory (`vilavt.trajectories` schema, image paths to be filled in), for the
    originals shown at the processor's budget or `max_pixels`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = random.Random(f"{kind}:{seed}")
    spec = SPECS[kind]
    count = 2 if kind == "multi" else 1
    budget = processor.original_budget(count, max_pixels)
    factor = processor.patch_factor
    digits = rng.sample(range(10), count)
    scenes = [scene(rng, spec, digit, budget, processor if kind == "nested" else None) for digit in digits]
    images = [image for image, _, _ in scenes]
    boxes = [cell_box(shown_box(frame, image.size, shown), *shown) for image, frame, shown in scenes]
    query = "the digit inside the red frame"
    if kind == "single":
        question = "What digit is inside the red frame?"
        answer, problem_type = str(digits[0]), "numerical"
        turns = [
            {"thought": "The digit is too small to read. Zoom in on the red frame.", "query": query,
             "regions": [{"index": 0, "bbox_2d": boxes[0]}]},
            {"thought": f"The digit is {answer}.", "answer": answer},
        ]  # fmt: skip
    elif kind == "multi":
        question = "Is the digit in image 0 larger than the digit in image 1?"
        answer, problem_type = ("yes" if digits[0] > digits[1] else "no"), "judgment"
        turns = [
            {"thought": "Both digits are too small to read. Zoom in on both red frames.", "query": "the digits inside the red frames",
             "regions": [{"index": 0, "bbox_2d": boxes[0]}, {"index": 1, "bbox_2d": boxes[1]}]},
            {"thought": f"The digits are {digits[0]} and {digits[1]}.", "answer": answer},
        ]  # fmt: skip
    else:
        question = "What digit is inside the red frame?"
        answer, problem_type = str(digits[0]), "numerical"
        # Where the frame lands in the first crop, through the same cropping code as inference.
        (image, frame, shown), = scenes
        ledger = ImageLedger([image], [shown])
        crop = ledger.crop(Region(0, tuple(boxes[0])), processor.crop_max_pixels, processor.crop_min_pixels, factor)
        x1, y1, x2, y2 = crop.entry.box
        crop_px = (crop.entry.width / ((x2 - x1) * image.width), crop.entry.height / ((y2 - y1) * image.height))
        frame_in_crop = (
            (frame[0] - x1 * image.width) * crop_px[0], (frame[1] - y1 * image.height) * crop_px[1],
            (frame[2] - x1 * image.width) * crop_px[0], (frame[3] - y1 * image.height) * crop_px[1],
        )  # fmt: skip
        inner = cell_box(frame_in_crop, crop.entry.width, crop.entry.height, INNER_CELL)
        turns = [
            {"thought": "The digit is too small to read. Zoom in on the red frame.", "query": query,
             "regions": [{"index": 0, "bbox_2d": boxes[0]}]},
            {"thought": "Still too small. Zoom in again.", "query": query, "regions": [{"index": 1, "bbox_2d": inner}]},
            {"thought": f"The digit is {answer}.", "answer": answer},
        ]  # fmt: skip
    row = {
        "id": f"{kind}-{seed:06d}",
        "kind": kind,
        "question": question,
        "problem_type": problem_type,
        "answer": answer,
        "turns": turns,
        "glyph_px": spec.glyph,
        "original_sizes": [list(image.size) for image in images],
        "frames": [[round(v, 1) for v in frame] for _, frame, _ in scenes],  # original pixels
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

"""Region geometry: from a box the model drew on a displayed image to a crop of the full-resolution
original, shown at the zoom the protocol allows — the authors' `zoomin` (REFERENCE.md §2.3).

Image indices are global within a conversation: originals first (video frames are originals), then
crops in creation order. A box on image k is in k's displayed pixels; k may itself be a crop, so
boxes are chained back to the source original through k's *float* normalised region (as the authors
do; a crop's pixel box is truncated, its region is not).

`plan_crop` is the geometry alone (pixel box, resize target, displayed size), `ImageLedger.crop` applies
it to the pixels. Our one deliberate difference: originals are EXIF-upright (the authors crop the file as
stored), so on a rotated photo the same box picks the same content, not the same stored pixels.
"""

import math
from dataclasses import dataclass

from PIL import Image

from .images_vilavt import DEFAULT_MIN_PIXELS, to_rgb
from .protocol_vilavt import Region

MAX_ASPECT_RATIO = 200


class RegionError(ValueError):
    """A region cannot be cropped; the message is fed back to the model."""


@dataclass
class ImageEntry:
    source: int  # index of the original image this one shows (itself for an original)
    box: tuple[float, float, float, float]  # normalised [x1, y1, x2, y2] of the source original it shows
    width: int  # displayed size
    height: int


@dataclass
class Crop:
    image: Image.Image  # displayed-size crop
    entry: ImageEntry
    pixel_box: tuple[int, int, int, int]  # the crop in the source original's full-resolution pixels


@dataclass
class CropPlan:
    box: tuple[float, float, float, float]  # the crop's normalised region in the source original
    pixel_box: tuple[int, int, int, int]  # int(box × original size): the crop in the original's pixels
    resized: tuple[int, int]  # the LANCZOS target (the pixel box's size when no resize is needed)
    size: tuple[int, int]  # displayed size after the final fit


def fetch_size(width: int, height: int, max_pixels, min_pixels: int = DEFAULT_MIN_PIXELS, factor: int = 28):
    """(width, height) qwen-vl-utils' `fetch_image` resizes an image to (its `smart_resize`, which the
    authors' crops go through): sides rounded to multiples of `factor` (at least one factor); above
    `max_pixels` scaled down and floored, below `min_pixels` scaled up and ceiled. A RegionError where it
    fails: a 0 side, an aspect ratio over 200, or a side floored to 0."""
    if min(width, height) <= 0:
        raise RegionError(f"the region is {width} x {height} pixels; it needs at least one pixel each way")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise RegionError(
            f"the region's aspect ratio {max(width, height) / min(width, height):.0f}:1 is too extreme "
            f"(max {MAX_ASPECT_RATIO}:1)"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise RegionError(f"the region is too thin to show within {max_pixels} pixels")
    return w_bar, h_bar


def plan_crop(view: ImageEntry, bbox, original_size: tuple[int, int], max_pixels, min_pixels: int = DEFAULT_MIN_PIXELS,
              factor: int = 28, name: str = "the image") -> CropPlan:  # fmt: skip
    """Where a box drawn on `view` lands in its original (`original_size` = W, H) and how it is shown.

    The box must lie in the view's displayed size (0 ≤ x1 < x2 ≤ w, 0 ≤ y1 < y2 ≤ h). Its normalised
    region is `n = o1 + (x / w)·(o2 − o1)` per coordinate, its pixel box `int(n · W)`. The crop is resized
    (LANCZOS) by `min(2·w / ((ox2 − ox1)·W), 1 / max(nx2 − nx1, 1e-6), 1 / max(ny2 − ny1, 1e-6))` — at most
    twice the pixel density of the view, never larger than the original — then fitted by `fetch_size`
    within the crop budget. A side that truncates to 0 is a RegionError (`name` names the view in messages).
    """
    x1, y1, x2, y2 = bbox
    if not 0 <= x1 < x2 <= view.width or not 0 <= y1 < y2 <= view.height:
        raise RegionError(
            f"bbox_2d [{x1}, {y1}, {x2}, {y2}] is outside {name}, which is {view.width} x {view.height} "
            f"(need 0 <= x1 < x2 <= {view.width} and 0 <= y1 < y2 <= {view.height})"
        )
    ox1, oy1, ox2, oy2 = view.box
    box = (
        ox1 + (x1 / view.width) * (ox2 - ox1),
        oy1 + (y1 / view.height) * (oy2 - oy1),
        ox1 + (x2 / view.width) * (ox2 - ox1),
        oy1 + (y2 / view.height) * (oy2 - oy1),
    )
    width, height = original_size
    pixel_box = (int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height))
    crop_width, crop_height = pixel_box[2] - pixel_box[0], pixel_box[3] - pixel_box[1]
    view_density = view.width / ((ox2 - ox1) * width)
    scale = min(2 * view_density, 1 / max(box[2] - box[0], 1e-6), 1 / max(box[3] - box[1], 1e-6))
    resized = (int(crop_width * scale), int(crop_height * scale))
    if min(crop_width, crop_height) <= 0:
        raise RegionError(
            f"bbox_2d [{x1}, {y1}, {x2}, {y2}] covers less than one pixel of the original image "
            f"(it maps to {crop_width} x {crop_height} pixels); draw a larger box"
        )
    if min(resized) <= 0:
        raise RegionError(
            f"bbox_2d [{x1}, {y1}, {x2}, {y2}] is too thin: its {crop_width} x {crop_height} pixels of the "
            f"original would be shown at {resized[0]} x {resized[1]}; draw a larger box"
        )
    return CropPlan(box, pixel_box, resized, fetch_size(*resized, max_pixels, min_pixels, factor))


class ImageLedger:
    """Every image of one conversation, by global index, with where it comes from.

    Args:
        originals: the full-resolution originals (upright; other modes than RGB are cropped in their own
            mode and converted afterwards, as the authors' crops are).
        displayed_sizes: (width, height) each original is shown at to the model.
    """

    def __init__(self, originals: list[Image.Image], displayed_sizes: list[tuple[int, int]]):
        if len(originals) != len(displayed_sizes):
            raise ValueError(f"{len(originals)} originals but {len(displayed_sizes)} displayed sizes")
        self.originals = list(originals)
        self.entries = [ImageEntry(i, (0.0, 0.0, 1.0, 1.0), w, h) for i, (w, h) in enumerate(displayed_sizes)]

    def __len__(self) -> int:
        return len(self.entries)

    def plan(self, region: Region, max_pixels, min_pixels: int = DEFAULT_MIN_PIXELS, factor: int = 28) -> CropPlan:
        """The geometry of cropping `region` (see `plan_crop`); a RegionError names what is wrong."""
        if not 0 <= region.index < len(self.entries):
            raise RegionError(
                f"image index {region.index} does not exist (valid indices: 0 to {len(self.entries) - 1})"
            )
        view = self.entries[region.index]
        original = self.originals[view.source].size
        return plan_crop(view, region.bbox, original, max_pixels, min_pixels, factor, f"image {region.index}")

    def crop(self, region: Region, max_pixels, min_pixels: int = DEFAULT_MIN_PIXELS, factor: int = 28) -> Crop:
        """Crop `region` from its source original and size it for display (see `plan_crop`)."""
        plan = self.plan(region, max_pixels, min_pixels, factor)
        source = self.entries[region.index].source
        image = self.originals[source].crop(plan.pixel_box).resize(plan.resized, Image.Resampling.LANCZOS)
        image = to_rgb(image)
        if image.size != plan.size:
            image = image.resize(plan.size, Image.Resampling.BICUBIC)  # fetch_image's PIL default
        return Crop(image, ImageEntry(source, plan.box, *plan.size), plan.pixel_box)

    def add(self, crops: list[Crop]) -> list[int]:
        """Register crops as new images; returns their global indices."""
        first = len(self.entries)
        self.entries += [crop.entry for crop in crops]
        return list(range(first, len(self.entries)))


__all__ = ["ImageLedger", "ImageEntry", "Crop", "CropPlan", "RegionError", "plan_crop", "fetch_size"]

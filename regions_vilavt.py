"""Region geometry: from a box the model drew on a displayed image to a crop of the full-resolution
original, shown at the zoom the protocol allows (REFERENCE.md §2.3).

Image indices are global within a conversation: originals first (video frames are originals), then
crops in creation order. A box on image k is in k's displayed pixels; k may itself be a crop, so
boxes are chained back to the source original through normalised coordinates.
"""

from dataclasses import dataclass

from PIL import Image

from .images_vilavt import DEFAULT_MIN_PIXELS, fit_image
from .protocol_vilavt import Region


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


class ImageLedger:
    """Every image of one conversation, by global index, with where it comes from.

    Args:
        originals: the full-resolution originals (upright RGB).
        displayed_sizes: (width, height) each original is shown at to the model.
    """

    def __init__(self, originals: list[Image.Image], displayed_sizes: list[tuple[int, int]]):
        if len(originals) != len(displayed_sizes):
            raise ValueError(f"{len(originals)} originals but {len(displayed_sizes)} displayed sizes")
        self.originals = list(originals)
        self.entries = [ImageEntry(i, (0.0, 0.0, 1.0, 1.0), w, h) for i, (w, h) in enumerate(displayed_sizes)]

    def __len__(self) -> int:
        return len(self.entries)

    def crop(self, region: Region, max_pixels: int, min_pixels: int = DEFAULT_MIN_PIXELS, factor: int = 28) -> Crop:
        """Crop `region` from its source original and size it for display.

        The crop is shown at most at 2x the pixel density of the view it was picked from and never
        larger than the original's full width/height, then fitted to patch multiples within
        [min_pixels, max_pixels].
        """
        if not 0 <= region.index < len(self.entries):
            raise RegionError(
                f"image index {region.index} does not exist (valid indices: 0 to {len(self.entries) - 1})"
            )
        view = self.entries[region.index]
        x1, y1, x2, y2 = region.bbox
        if not (0 <= x1 < x2 <= view.width and 0 <= y1 < y2 <= view.height):
            raise RegionError(
                f"bbox_2d [{x1}, {y1}, {x2}, {y2}] is outside image {region.index}, which is "
                f"{view.width} x {view.height} (need 0 <= x1 < x2 <= {view.width} and 0 <= y1 < y2 <= {view.height})"
            )
        original = self.originals[view.source]
        ox1, oy1, ox2, oy2 = view.box
        nx1, nx2 = ox1 + x1 / view.width * (ox2 - ox1), ox1 + x2 / view.width * (ox2 - ox1)
        ny1, ny2 = oy1 + y1 / view.height * (oy2 - oy1), oy1 + y2 / view.height * (oy2 - oy1)
        pixel_box = (
            int(nx1 * original.width),
            int(ny1 * original.height),
            int(nx2 * original.width),
            int(ny2 * original.height),
        )
        width, height = pixel_box[2] - pixel_box[0], pixel_box[3] - pixel_box[1]
        if width < 1 or height < 1:
            raise RegionError(
                f"bbox_2d [{x1}, {y1}, {x2}, {y2}] covers less than one pixel of the original image "
                f"(it maps to {width} x {height} pixels); draw a larger box"
            )
        # Zoom: at most 2x the density of the view the box was drawn on, never past the original's size.
        view_density = view.width / ((ox2 - ox1) * original.width)
        scale = min(2 * view_density, original.width / width, original.height / height)
        target = (max(1, int(width * scale)), max(1, int(height * scale)))
        if max(target) / min(target) > 200:
            raise RegionError(f"the region's aspect ratio {max(target) / min(target):.0f}:1 is too extreme (max 200:1)")
        image = original.crop(pixel_box).resize(target, Image.Resampling.LANCZOS)
        image = fit_image(image, max_pixels, min_pixels, factor)
        box = (
            pixel_box[0] / original.width,
            pixel_box[1] / original.height,
            pixel_box[2] / original.width,
            pixel_box[3] / original.height,
        )
        return Crop(image, ImageEntry(view.source, box, image.width, image.height), pixel_box)

    def add(self, crops: list[Crop]) -> list[int]:
        """Register crops as new images; returns their global indices."""
        first = len(self.entries)
        self.entries += [crop.entry for crop in crops]
        return list(range(first, len(self.entries)))


__all__ = ["ImageLedger", "ImageEntry", "Crop", "RegionError"]

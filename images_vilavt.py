"""Images as ViLaVT uses them: opening originals upright, and the displayed size an image is shown at.

Pixel budgets (REFERENCE.md §2.6): originals share `max_pixels`; each crop may use `crop_max_pixels`.
"""

import os
import warnings
from io import BytesIO

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

DEFAULT_MAX_PIXELS = 8192 * 28 * 28
DEFAULT_MIN_PIXELS = 4 * 28 * 28


class ImageLoadError(ValueError):
    """An image file could not be used; the message names the file and the reason."""


def open_image(source, *, convert: bool = True) -> Image.Image:
    """Open a path, bytes or PIL image as an upright (EXIF-transposed) RGB image.

    Missing, unreadable or corrupt files and images past PIL's decompression-bomb limit raise
    `ImageLoadError` naming the file.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(BytesIO(source) if isinstance(source, (bytes, bytearray)) else name)
                image.load()
        except FileNotFoundError:
            raise ImageLoadError(f"{name}: image file not found") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageLoadError(
                f"{name}: image is past PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS = "
                f"{Image.MAX_IMAGE_PIXELS}): {err}. Raise PIL.Image.MAX_IMAGE_PIXELS if you trust this file."
            ) from None
        except UnidentifiedImageError:
            raise ImageLoadError(f"{name}: not a readable image (unknown or corrupt format)") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"{name}: cannot read image ({err})") from None
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB") if convert and image.mode != "RGB" else image


def displayed_size(width: int, height: int, max_pixels: int, min_pixels: int = DEFAULT_MIN_PIXELS, factor: int = 28):
    """(width, height) an image is shown at: sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    height, width = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return width, height


def fit_image(image: Image.Image, max_pixels: int, min_pixels: int = DEFAULT_MIN_PIXELS, factor: int = 28):
    """Resize to the displayed size, aspect kept (qwen-vl-utils `fetch_image`; BICUBIC like PIL's default)."""
    width, height = displayed_size(image.width, image.height, max_pixels, min_pixels, factor)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


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


__all__ = ["ImageLoadError", "open_image", "displayed_size", "fit_image", "pixels_to_images", "DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS"]

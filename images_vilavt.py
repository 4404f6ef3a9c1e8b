"""Images as ViLaVT uses them: opening originals upright, and the displayed size an image is shown at.

Pixel budgets (REFERENCE.md §2.6): originals share `max_pixels`; each crop may use `crop_max_pixels`.

Every image the model sees goes through `prepare_image` first (files, URLs and data URIs through
`open_image`, PIL images handed to the processor directly too), so the encoded image and the original
that boxes are cropped from are the same picture: EXIF-upright, 8-bit RGB, at most 200:1.
"""

import base64
import binascii
import math
import os
import warnings
from io import BytesIO

import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from transformers.image_utils import load_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

DEFAULT_MAX_PIXELS = 8192 * 28 * 28
DEFAULT_MIN_PIXELS = 4 * 28 * 28
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer sides than 200x the shorter one
# Padding for images past MAX_ASPECT_RATIO: the image processor's mean colour (Qwen2-VL's CLIP mean), which
# normalises to zero.
PAD_COLOR = (123, 117, 104)
URL_TIMEOUT = 30.0  # seconds


class ImageLoadError(ValueError):
    """An image file could not be used; the message names the file and the reason."""


def _describe(source) -> str:
    """How an error message names an image: its path or URL (a data URI cut short), or what it is."""
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    name = os.fspath(source)
    return f"{name[:40]}… ({len(name)} characters)" if name.startswith("data:") and len(name) > 60 else name


def _read(source, name: str) -> Image.Image:
    """Decode a path, URL, data URI or bytes (not yet upright or converted)."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            return load_image(source, timeout=URL_TIMEOUT)  # transformers' loader: fetch, decode, EXIF, RGB
        except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise
        # The HTTP client's errors (connection, DNS, timeout) share no base class with OSError.
        except Exception as err:  # noqa: BLE001
            raise ImageLoadError(f"{name}: cannot download image ({type(err).__name__}: {err})") from None
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise ImageLoadError(f"{name}: only base64 data URIs are supported (data:image/...;base64,...)")
        try:
            source = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as err:
            raise ImageLoadError(f"{name}: the data URI is not valid base64 ({err})") from None
    image = Image.open(BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    image.load()
    return image


def open_image(source, *, convert: bool = True) -> Image.Image:
    """Open a path, `http(s)://` URL, base64 data URI, bytes or PIL image as `prepare_image` makes it.

    URLs go through transformers' `load_image` (which itself makes 8-bit RGB: a 16-bit image keeps its
    range only from a file, bytes or a data URI).

    Missing, unreadable or corrupt files, unreachable URLs and images past PIL's decompression-bomb limit
    raise `ImageLoadError` naming the file.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        name = _describe(source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = _read(source if isinstance(source, (bytes, bytearray, str)) else name, name)
        except ImageLoadError:
            raise
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
    return prepare_image(image, convert=convert)


def prepare_image(image: Image.Image, *, convert: bool = True) -> Image.Image:
    """The picture the model sees and crops come from, on every path:

    * upright: the EXIF orientation applied (the same image back when there is none to apply);
    * 16-bit (`I;16`), 32-bit integer (`I`) and float (`F`) images mapped from their own value range to
      8 bits, where PIL's conversion would clip every value above 255 to white;
    * RGB, transparency composited on white (`convert=False` keeps the mode);
    * at most 200:1: a longer image is padded at its bottom or right edge, so that every pixel keeps its
      coordinates (boxes and crops on it map to the file's own pixels).
    """
    name = _describe(image)
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1):
            image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            image = _to_8bit(image)
        if convert and image.mode != "RGB":
            image = to_rgb(image)
    except (OSError, ValueError) as err:
        raise ImageLoadError(f"{name}: cannot read image ({err})") from None
    return _pad_to_aspect_limit(image, name)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (as qwen-vl-utils and transformers' image processors do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def prepare_images(images, *, convert: bool = True):
    """`prepare_image` on every PIL image of an image argument (one image, a list, or per-sample lists);
    anything else (arrays, tensors) is left as it is."""
    if isinstance(images, Image.Image):
        return prepare_image(images, convert=convert)
    if isinstance(images, (list, tuple)):
        return [prepare_images(part, convert=convert) for part in images]
    return images


def _to_8bit(image: Image.Image) -> Image.Image:
    """8-bit grayscale, its smallest finite value black and its largest white (non-finite values clamp)."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # PIL knows each 16-bit layout's byte order
    dtype = torch.int32 if image.mode == "I" else torch.float32
    values = torch.frombuffer(bytearray(image.tobytes()), dtype=dtype).float()
    finite = values[values.isfinite()]
    low, high = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 1.0)
    if high <= low:  # a flat image: black at or below zero, white above
        low, high = min(low, 0.0), max(high, min(low, 0.0) + 1.0)
    scaled = ((values - low) * (255.0 / (high - low))).nan_to_num(0.0, posinf=255.0, neginf=0.0)
    pixels = scaled.clamp(0, 255).round().to(torch.uint8)
    return Image.frombytes("L", image.size, pixels.numpy().tobytes())  # (torch's own bytes() is per element)


def _pad_to_aspect_limit(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if max(width, height) <= MAX_ASPECT_RATIO * min(width, height):
        return image
    size = (max(width, math.ceil(height / MAX_ASPECT_RATIO)), max(height, math.ceil(width / MAX_ASPECT_RATIO)))
    if Image.MAX_IMAGE_PIXELS and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"{name}: a {width} x {height} image is past the {MAX_ASPECT_RATIO}:1 aspect ratio the model can "
            f"take, and padding it to {size[0]} x {size[1]} would pass PIL's decompression-bomb limit"
        )
    fill = PAD_COLOR if image.mode == "RGB" else 0
    padded = Image.new(image.mode, size, fill)
    padded.paste(image, (0, 0))
    return padded


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
    for t, h, w in grids.tolist() if torch.is_tensor(grids) else grids:
        rows = pixel_values[start : start + t * h * w].float().cpu()
        start += t * h * w
        x = rows[: h * w].view(h // merge, w // merge, merge, merge, 3, temporal, patch, patch)[..., 0, :, :]
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)
        array = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        images.append(Image.fromarray(array))
    return images


__all__ = [
    "ImageLoadError",
    "open_image",
    "prepare_image",
    "prepare_images",
    "displayed_size",
    "fit_image",
    "pixels_to_images",
    "to_rgb",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "MAX_ASPECT_RATIO",
]

"""Crop geometry: boxes chain back to the original's pixels, the 2x density rule, aspect extremes."""

import numpy as np
import pytest
from PIL import Image

from vilavt.remote_code.protocol_vilavt import Region
from vilavt.remote_code.regions_vilavt import ImageLedger, RegionError, fetch_size

BIG = 10_000_000  # pixel budget large enough not to interfere


def coordinate_image(width, height):
    """R = x / width, G = y / height (scaled to 0..255): a pixel's colour says where it is."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


def test_nested_zoom_maps_back_to_the_original_pixels():
    original = coordinate_image(1000, 800)
    ledger = ImageLedger([original], [(500, 400)])
    first = ledger.crop(Region(0, (100, 100, 200, 180)), BIG)
    assert first.pixel_box == (200, 200, 400, 360)
    ledger.add([first])
    w, h = first.image.size
    second = ledger.crop(Region(1, (0, 0, w / 2, h / 2)), BIG)
    assert second.pixel_box == (200, 200, 300, 280)
    assert second.entry.source == 0
    # The crop shows that part of the original: its centre pixel has the original's centre colour.
    cx, cy = (200 + 300) / 2, (200 + 280) / 2
    expected = original.getpixel((int(cx), int(cy)))
    got = second.image.getpixel((second.image.width // 2, second.image.height // 2))
    assert abs(got[0] - expected[0]) <= 3 and abs(got[1] - expected[1]) <= 3


def test_zoom_is_at_most_twice_the_density_of_the_view():
    # Shown at a quarter of its resolution: a 100 px box (400 source px) may be shown at 200 px.
    ledger = ImageLedger([coordinate_image(2000, 2000)], [(500, 500)])
    crop = ledger.crop(Region(0, (100, 100, 200, 200)), BIG)
    assert crop.pixel_box == (400, 400, 800, 800)
    assert crop.image.size == (196, 196)  # 200 px, fitted to multiples of 28
    # Shown at full resolution: the same box may be upsampled 2x.
    ledger = ImageLedger([coordinate_image(500, 500)], [(500, 500)])
    assert ledger.crop(Region(0, (100, 100, 200, 200)), BIG).image.size == (196, 196)
    ledger = ImageLedger([coordinate_image(500, 500)], [(500, 500)])
    assert ledger.crop(Region(0, (100, 100, 150, 150)), BIG).image.size == (112, 112)  # 50 px -> 100 px


def test_zoom_never_exceeds_the_original_size():
    ledger = ImageLedger([coordinate_image(300, 300)], [(300, 300)])
    crop = ledger.crop(Region(0, (0, 0, 300, 150)), BIG)  # 2x would be 600 wide: capped at 300
    assert crop.image.size == (308, 140)  # 300 x 150 rounded to multiples of 28


def test_pixel_budget_caps_the_crop():
    ledger = ImageLedger([coordinate_image(4000, 4000)], [(2000, 2000)])
    crop = ledger.crop(Region(0, (0, 0, 2000, 2000)), max_pixels=28 * 28 * 16)
    assert crop.image.width * crop.image.height <= 28 * 28 * 16


def test_aspect_extremes():
    ledger = ImageLedger([coordinate_image(1000, 1000)], [(1000, 1000)])
    thin = ledger.crop(Region(0, (0, 0, 1000, 8)), BIG)  # 125:1 is allowed
    assert thin.image.width % 28 == 0 and thin.image.height % 28 == 0
    assert thin.image.width / thin.image.height > 10
    with pytest.raises(RegionError, match="aspect ratio 500:1 is too extreme"):
        ledger.crop(Region(0, (0, 0, 1000, 2)), BIG)


@pytest.mark.parametrize(
    "region, message",
    [
        (Region(1, (0, 0, 10, 10)), "image index 1 does not exist"),
        (Region(0, (0, 0, 501, 10)), "is outside image 0, which is 500 x 400"),
        (Region(0, (-1, 0, 10, 10)), "is outside image 0"),
        (Region(0, (0, 0, 0.1, 10)), "covers less than one pixel of the original image"),
    ],
)
def test_region_errors(region, message):
    ledger = ImageLedger([coordinate_image(500, 400)], [(500, 400)])
    with pytest.raises(RegionError, match=message):
        ledger.crop(region, BIG)


def test_indices_are_global_originals_first():
    ledger = ImageLedger([coordinate_image(100, 100), coordinate_image(200, 100)], [(100, 100), (200, 100)])
    crops = [ledger.crop(Region(i, (0, 0, 50, 50)), BIG) for i in (0, 1)]
    assert ledger.add(crops) == [2, 3]
    assert [e.source for e in ledger.entries] == [0, 1, 0, 1]
    assert ledger.add([ledger.crop(Region(3, (0, 0, 20, 20)), BIG)]) == [4]
    assert ledger.entries[4].source == 1


def test_nested_crops_chain_through_the_float_region():
    """A crop's view is its float region, not its truncated pixel box: the next box lands where the authors' does."""
    ledger = ImageLedger([coordinate_image(1000, 1000)], [(300, 300)])
    first = ledger.crop(Region(0, (1, 1, 151, 151)), BIG)
    assert first.pixel_box == (3, 3, 503, 503)  # int(1 / 300 * 1000) = int(3.33)
    assert first.entry.box == (1 / 300, 1 / 300, 151 / 300, 151 / 300)
    ledger.add([first])
    assert first.image.size == (308, 308)
    second = ledger.crop(Region(1, (3, 3, 154, 154)), BIG)
    start = 1 / 300 + 3 / 308 * (151 / 300 - 1 / 300)
    assert second.entry.box[0] == start and second.pixel_box[:2] == (8, 8)  # 8.2; via the pixel box 3: 7.87
    assert second.pixel_box == (int(start * 1000), int(start * 1000), 253, 253)


def test_the_size_cap_uses_the_float_region():
    # Shown at 10x the original's density, the 2x rule does not bind; the cap 1 / (nx2 - nx1) does.
    ledger = ImageLedger([coordinate_image(100, 100)], [(1000, 1000)])
    plan = ledger.plan(Region(0, (0, 0, 333, 333)), BIG)
    assert plan.pixel_box == (0, 0, 33, 33)
    assert plan.resized == (99, 99)  # int(33 / 0.333); the original's 100 / 33 would give 100


def test_a_region_shown_at_zero_pixels_fails():
    # Shown at a tenth of its resolution (2x density = 0.2): 4 original rows become 0.8 -> 0.
    ledger = ImageLedger([coordinate_image(4000, 4000)], [(400, 400)])
    with pytest.raises(RegionError, match="too thin: its 2000 x 4 pixels of the original would be shown at 400 x 0"):
        ledger.crop(Region(0, (0, 0, 200, 0.4)), BIG)


def test_the_final_fit_is_qwen_vl_utils_smart_resize():
    # A thin crop keeps one factor of height (qwen-vl-utils rounds each side to at least 28).
    assert fetch_size(1000, 10, BIG) == (1008, 28)
    assert fetch_size(100, 100, BIG, min_pixels=28 * 28 * 16) == (112, 112)  # ceiled up to the minimum
    with pytest.raises(RegionError, match="too thin to show"):
        fetch_size(5000, 30, 28 * 28)  # floored to 0 rows within the budget


def test_rgba_originals_are_composited_on_white():
    rgba = Image.new("RGBA", (200, 200), (255, 0, 0, 0))  # fully transparent red
    ledger = ImageLedger([rgba], [(200, 200)])
    crop = ledger.crop(Region(0, (50, 50, 150, 150)), BIG)
    assert crop.image.mode == "RGB" and crop.image.getpixel((10, 10)) == (255, 255, 255)

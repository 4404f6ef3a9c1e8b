"""Crop geometry: boxes chain back to the original's pixels, the 2x density rule, aspect extremes."""

import numpy as np
import pytest
from PIL import Image

from vilavt.remote_code.protocol_vilavt import Region
from vilavt.remote_code.regions_vilavt import ImageLedger, RegionError

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

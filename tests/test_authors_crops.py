"""Crop geometry against the authors' `zoomin` + qwen-vl-utils `fetch_image` (2,050 golden calls, chained up to
two crops deep), and tool-call payloads against their parser (tests/fixtures/authors-behaviour/crops/)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vilavt.remote_code.protocol_vilavt import Region, parse_step
from vilavt.remote_code.regions_vilavt import Crop, ImageEntry, ImageLedger, RegionError

FIXTURES = Path(__file__).parent / "fixtures" / "authors-behaviour" / "crops"


def read(name: str) -> list[dict]:
    with gzip.open(FIXTURES / name, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


GOLDEN = read("golden.jsonl.gz")
VALIDATION = read("validation.jsonl.gz")


def chains() -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for row in GOLDEN:
        grouped.setdefault(row["chain"], []).append(row)
    return grouped


def run_chain(rows: list[dict], pixels: bool = False) -> list:
    """Each call of a chain through one ledger: depth 0 boxes on the original (shown at the authors'
    displayed size), deeper ones on the previous crop. Returns per row (box, target, final, region) or the
    RegionError. Without `pixels` the crops are planned only (originals are 1-bit stand-ins of the right size)."""
    first = rows[0]
    assert first["depth"] == 0
    size = tuple(first["original_size"])
    original = coordinate_image(*size) if pixels else Image.new("1", size)
    ledger = ImageLedger([original], [tuple(first["displayed_size_of_view"])])
    results = []
    for row in rows:
        index = len(ledger) - 1
        view = ledger.entries[index]
        # The view the authors' box refers to is ours, bit for bit: chained through the float region.
        assert [view.width, view.height] == row["displayed_size_of_view"]
        assert list(view.box) == row.get("view_region_normalised", [0.0, 0.0, 1.0, 1.0])
        region = Region(index, tuple(row["bbox_2d"]))
        try:
            plan = ledger.plan(region, row["max_pixels"])
        except RegionError as err:
            results.append(err)
            break
        if pixels:
            crop = ledger.crop(region, row["max_pixels"])
            assert crop.image.size == plan.size and crop.image.mode == "RGB"
        else:
            crop = Crop(None, ImageEntry(0, plan.box, *plan.size), plan.pixel_box)
        assert crop.pixel_box == plan.pixel_box and crop.entry.box == plan.box
        ledger.add([crop])
        results.append((list(plan.pixel_box), list(plan.resized), list(plan.size), list(plan.box)))
    return results


def coordinate_image(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


def test_the_fixture_is_complete():
    assert len(GOLDEN) == 2050 and len(VALIDATION) == 260
    assert sum("authors_error" in row for row in GOLDEN) == 72


def test_every_call_matches_the_authors_geometry():
    """Box in original pixels, LANCZOS target and final size equal on every successful call (and the next
    call's view is the crop we made); every call the authors failed fails here too."""
    checked = failed = 0
    for rows in chains().values():
        results = run_chain(rows)
        assert len(results) == len(rows)  # a failed call ends its chain, in the fixture and here
        for row, result in zip(rows, results):
            if "authors_error" in row:
                assert isinstance(result, RegionError), (row, result)
                failed += 1
                continue
            box, target, final, region = result
            assert box == row["authors_box_in_original_pixels"], row
            assert target == row["authors_intermediate_size"], row
            assert final == row["authors_final_size"], row
            if "authors_region_normalised" in row:
                assert region == row["authors_region_normalised"]
            checked += 1
    assert (checked, failed) == (1978, 72)


@pytest.mark.parametrize("error, count", [
    ("bbox_x_invalid", 22), ("bbox_y_invalid", 2), ("lanczos_target_has_zero_side", 15), ("zero_size_crop", 4),
    ("aspect_ratio_over_200", 29),
])  # fmt: skip
def test_failures_by_kind(error, count):
    """Each kind of failure the authors hit, with a message for the model saying why."""
    messages = {
        "bbox_x_invalid": "is outside image", "bbox_y_invalid": "is outside image",
        "lanczos_target_has_zero_side": "draw a larger box", "zero_size_crop": "covers less than one pixel",
        "aspect_ratio_over_200": "is too extreme",
    }  # fmt: skip
    seen = 0
    for rows in chains().values():
        last = rows[-1]
        if last.get("authors_error", "").startswith(error):
            result = run_chain(rows)[-1]
            assert isinstance(result, RegionError) and messages[error] in str(result)
            seen += 1
    assert seen == count


def test_crops_with_pixels_follow_the_plan():
    """The ledger's real crops (PIL crop, LANCZOS, fit) have the planned sizes, on the chains with small originals."""
    small = [rows for rows in chains().values() if np.prod(rows[0]["original_size"]) < 400_000][:25]
    assert len(small) == 25
    for rows in small:
        for row, result in zip(rows, run_chain(rows, pixels=True)):
            if "authors_error" not in row:
                assert result[2] == row["authors_final_size"]


# ---- tool-call payloads: the authors' parser + zoomin against ours ------------------------------------------

# Deliberate differences of today's `protocol_vilavt.parse_tool_call` (the authors' zoomin runs `str()` on the
# query and takes a bool as an index; numeric-string coordinates both read), by case: (authors accept, we accept).
DIFFERENT = {
    "empty query": (True, False, 8),
    "whitespace query": (True, False, 4),
    "query not a string": (True, False, 11),
    "query as list": (True, False, 14),
    "empty region list": (True, False, 7),  # theirs succeeds with no crop
    "index as bool false": (True, False, 16),
    "index true": (True, False, 8),  # True is index 1 for them (7 more rows: out of range for both)
    "index as float 0.0": (False, True, 4),  # we take an integral float; their list lookup fails
}


def ours_on(row) -> tuple[bool, list | None]:
    step = parse_step(row["assistant_text"])
    if step.tool_call is None:
        return False, None
    # The fixture keeps the displayed sizes only: the originals are taken at that size (regions do not depend on it).
    sizes = [tuple(size) for size in row["displayed_sizes"]]
    ledger = ImageLedger([Image.new("1", size) for size in sizes], sizes)
    try:
        plans = [ledger.plan(region, row["max_pixels"]) for region in step.tool_call.regions]
    except RegionError:
        return False, None
    return True, [list(plan.box) for plan in plans]


def test_tool_call_payloads_against_the_authors():
    differences: dict[str, int] = {}
    same = 0
    for row in VALIDATION:
        accepted, regions = ours_on(row)
        if accepted == row["authors_ok"]:
            same += 1
            if accepted:
                assert regions == [crop["region_normalised"] for crop in row["authors_crops"]]
            continue
        authors_ok, ours_ok, _ = DIFFERENT[row["case"]]
        assert (row["authors_ok"], accepted) == (authors_ok, ours_ok), row
        differences[row["case"]] = differences.get(row["case"], 0) + 1
    assert differences == {case: count for case, (_, _, count) in DIFFERENT.items()}
    assert same == 260 - sum(differences.values()) == 188

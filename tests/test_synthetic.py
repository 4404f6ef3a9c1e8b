"""The synthetic zoom task: deterministic, honest (unreadable at the first look, readable after the gold
zoom), and its gold trajectories replay through the real chatting loop to the gold answer."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import LogitsProcessorList

from vilavt import tiny_vilavt
from vilavt.remote_code.processing_vilavt import displayed_size
from vilavt.remote_code.protocol_vilavt import Region
from vilavt.remote_code.regions_vilavt import ImageLedger
from vilavt.scripted import ScriptedPolicy
from vilavt.synthetic import KINDS, make_task, write_tasks
from vilavt.trajectories import build_episode, runs_of_model_turns


@pytest.fixture(scope="module")
def demo():
    return tiny_vilavt(seed=0, preset="demo")


@pytest.mark.parametrize("kind", KINDS)
def test_tasks_are_deterministic(demo, kind):
    _, processor = demo
    (row_a, images_a), (row_b, images_b) = make_task(7, kind, processor), make_task(7, kind, processor)
    assert row_a == row_b
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images_a, images_b))
    assert make_task(8, kind, processor)[0] != row_a


@pytest.mark.parametrize("kind", KINDS)
def test_glyphs_are_unreadable_at_the_initial_budget_and_readable_after_the_gold_zoom(demo, kind):
    _, processor = demo
    for seed in range(5):
        row, images = make_task(seed, kind, processor)
        budget, smallest = processor.original_budget(len(images))
        for image, frame in zip(images, row["frames"]):
            assert max(image.size) >= 1024
            shown = displayed_size(*image.size, budget, smallest, processor.patch_factor)
            # The digit is a few displayed pixels tall: too small for a 14-pixel patch to resolve.
            assert row["glyph_px"] * shown[1] / image.height <= 3.5
        # Follow the gold boxes with the inference cropping code: the digit ends up large enough to read.
        ledger = ImageLedger(images, [displayed_size(*im.size, budget, smallest, processor.patch_factor) for im in images])
        scale = [ledger.entries[i].height / images[i].height for i in range(len(images))]
        for turn in row["turns"][:-1]:
            crops = [ledger.crop(Region(r["index"], tuple(r["bbox_2d"])), processor.crop_max_pixels,
                                 processor.crop_min_pixels, processor.patch_factor) for r in turn["regions"]]  # fmt: skip
            for crop, frame in zip(crops, row["frames"][: len(crops)] if kind == "multi" else [row["frames"][0]]):
                x1, y1, x2, y2 = crop.pixel_box  # the crop holds the whole frame
                assert x1 <= frame[0] and y1 <= frame[1] and frame[2] <= x2 and frame[3] <= y2
                scale.append(crop.entry.height / (y2 - y1))
            ledger.add(crops)
        assert row["glyph_px"] * scale[-1] >= 14


def test_written_tasks_are_a_trajectory_file_and_a_benchmark_file(demo, tmp_path):
    _, processor = demo
    path = write_tasks(tmp_path, 6, 100, list(KINDS), processor)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in rows] == list(KINDS) * 2
    assert all((tmp_path / name).exists() for r in rows for name in r["images"])
    from vilavt.benchmarks import load_benchmark

    items = load_benchmark(path)
    assert [i.category for i in items] == list(KINDS) * 2 and [i.answer for i in items] == [r["answer"] for r in rows]


@pytest.mark.parametrize("kind", KINDS)
def test_gold_trajectories_replay_through_the_loop_to_the_gold_answer(demo, kind, tmp_path):
    model, processor = demo
    path = write_tasks(tmp_path, 1, 200, [kind], processor)
    row = json.loads(path.read_text())
    episode = build_episode(row, processor, model.config, image_root=tmp_path)
    turns = [processor.tokenizer.decode(episode.ids[i:j]).removesuffix("<|im_end|>\n") for i, j in runs_of_model_turns(episode)]
    images = [Image.open(tmp_path / name).convert("RGB") for name in row["images"]]
    messages = [{"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": row["question"]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    output = model.generate(
        **inputs, images=[images], processor=processor, return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [turns])]),
    )  # fmt: skip
    trace = output.traces[0]
    assert trace.answer == row["answer"] and trace.stop_reason == "answer"
    assert len(trace.rounds) == len(row["turns"]) - 1 and all(r.error is None for r in trace.rounds)
    live = output.episodes[0]
    assert live.ids == episode.ids[: len(live.ids)]

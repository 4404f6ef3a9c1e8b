"""The synthetic zoom task: deterministic, honest (unreadable at the first look, readable after the gold
zoom), and its gold trajectories replay through the real chatting loop to the gold answer."""

import json

import numpy as np
import pytest
import torch
from conftest import replay_live
from PIL import Image

from vilavt import tiny_vilavt
from vilavt.remote_code.processing_vilavt import displayed_size
from vilavt.remote_code.protocol_vilavt import Region
from vilavt.remote_code.regions_vilavt import ImageLedger
from vilavt.synthetic import KINDS, make_task, write_tasks
from vilavt.trajectories import build_episode, load_trajectories


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


def bar_size(image: Image.Image, frame) -> int:
    """The larger side, in pixels of `image`, of the dark bar inside `frame` (measured on the pixels)."""
    inside = np.asarray(image.crop(tuple(round(v) for v in frame)).convert("L")) < 60
    ys, xs = np.nonzero(inside)
    return max(xs.max() - xs.min(), ys.max() - ys.min()) + 1


@pytest.mark.parametrize("kind", KINDS)
def test_bars_are_unreadable_at_the_first_look_and_readable_after_the_gold_zooms(demo, kind):
    """Each zoom shows at most 2x the detail of the view it was picked from (REFERENCE.md §2.3): the bar
    (2.4 px nominal; measured on the pixels, so with its width and anti-aliasing) is at most 3 pixels as
    first encoded — a blob, whichever way it points — and at least 4 after the gold zooms (nested: still
    at most 3 after the first)."""
    _, processor = demo
    for seed in range(8):
        row, images = make_task(seed, kind, processor)
        budget, smallest = processor.original_budget(len(images))
        shown = [displayed_size(*image.size, budget, smallest, processor.patch_factor) for image in images]
        ledger = ImageLedger(images, shown)
        for image, frame, size in zip(images, row["frames"], shown):
            assert max(image.size) >= 1024
            assert bar_size(image, frame) * size[0] / image.width <= 3
        zooms = []  # (source original, displayed pixels per original pixel) of each crop, in order
        for turn in row["turns"][:-1]:
            crops = [ledger.crop(Region(r["index"], tuple(r["bbox_2d"])), processor.crop_max_pixels,
                                 processor.crop_min_pixels, processor.patch_factor) for r in turn["regions"]]  # fmt: skip
            for crop in crops:
                x1, y1, x2, y2 = crop.pixel_box
                frame = row["frames"][crop.entry.source]
                assert x1 <= frame[0] and y1 <= frame[1] and frame[2] <= x2 and frame[3] <= y2  # the whole frame
                zooms.append((crop.entry.source, crop.image.width / (x2 - x1)))
            ledger.add(crops)
        last = dict(zooms)  # the last crop of each original
        assert sorted(last) == list(range(len(images)))
        for source, scale in last.items():
            assert bar_size(images[source], row["frames"][source]) * scale >= 4
        if kind == "nested":
            source, scale = zooms[0]
            assert bar_size(images[source], row["frames"][source]) * scale <= 3


def test_written_tasks_are_a_trajectory_file_and_a_benchmark_file(demo, tmp_path):
    _, processor = demo
    path = write_tasks(tmp_path, 6, 100, list(KINDS), processor)
    rows = load_trajectories(path)
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
    episode, output = replay_live(model, processor, row, tmp_path)
    trace = output.traces[0]
    assert trace.answer == row["answer"] and trace.stop_reason == "answer"
    assert len(trace.rounds) == len(row["turns"]) - 1 and all(r.error is None for r in trace.rounds)
    live = output.episodes[0]
    assert live.ids == episode.ids[: len(live.ids)]


def test_task_views_are_what_the_model_sees(demo, tmp_path):
    from vilavt.synthetic import CURRICULUM, GLYPHS
    from vilavt.vision_pretraining import task_views

    model, processor = demo
    path = write_tasks(tmp_path, 4, 300, list(KINDS + CURRICULUM), processor)
    rows = load_trajectories(path)
    views = [task_views(row, processor, tmp_path) for row in rows]
    # single: original + crop; multi: 2 originals + 2 crops; nested: original + crop + crop of the crop; direct: original
    assert [len(v) for v in views] == [2, 4, 3, 1]
    labels = [[GLYPHS[v.label] if v.label >= 0 else None for v in task] for task in views]
    assert labels == [[None, rows[0]["answer"]], [None, None, *rows[1]["glyphs"]], [None, None, rows[2]["answer"]], [rows[3]["answer"]]]
    for task, row in zip(views, rows):
        episode = build_episode(row, processor, model.config, image_root=tmp_path)
        assert [v.image.size for v in task] == [(int(g[2]) * 14, int(g[1]) * 14) for g in episode.grids]
        assert [bool(v.query) for v in task] == [k >= len(row["images"]) for k in range(len(task))]
        for view in task:  # the frame is inside the view; in every crop it sits in the middle
            x1, y1, x2, y2 = view.frame
            assert 0 <= x1 < x2 <= view.image.width and 0 <= y1 < y2 <= view.image.height
            if view.query:
                assert abs((x1 + x2) / 2 - view.image.width / 2) < 15 and abs((y1 + y2) / 2 - view.image.height / 2) < 15


def test_vision_pretraining_learns_where_the_bar_is_and_which_way_it_points(tmp_path):
    import torch

    from vilavt.vision_pretraining import task_views, pretrain_vision, vision_parameters

    torch.manual_seed(0)
    model, processor = tiny_vilavt(seed=1, preset="demo")
    path = write_tasks(tmp_path, 200, 400, ["single", "multi"], processor)
    views = [v for row in load_trajectories(path) for v in task_views(row, processor, tmp_path)]
    before = [p.detach().clone() for p in vision_parameters(model)]
    result = pretrain_vision(model, processor, views, steps=250, batch_size=16)  # held out: the last 60 views
    assert result["target"] >= 0.8  # chance: about 1 in 12 tokens
    assert result["direction"] >= 0.8  # chance: 0.25
    assert result["position"] >= 0.9
    assert any(not torch.equal(a, b) for a, b in zip(before, vision_parameters(model)))


def test_grounding_examples_are_the_start_of_the_replayed_trajectory(demo, tmp_path):
    from vilavt.grounding_warmup import grounding_examples
    from vilavt.trajectories import IGNORE_INDEX

    model, processor = demo
    path = write_tasks(tmp_path, 4, 500, ["single", "multi", "nested", "direct"], processor)
    rows = load_trajectories(path)
    examples = grounding_examples(rows, processor, tmp_path)
    assert len(examples) == 2  # multi has two images, direct answers at once
    tokenizer = processor.tokenizer
    for row, example in zip([rows[0], rows[2]], examples):
        episode = build_episode(row, processor, model.config, image_root=tmp_path)
        start = episode.ids.index(tokenizer.convert_tokens_to_ids("<|vision_start|>"))
        image_span = episode.ids[start : episode.ids.index(tokenizer.convert_tokens_to_ids("<|vision_end|>")) + 1]
        first_turn = episode.ids[episode.prompt_length :][: len(example.ids) - len(image_span)]
        assert example.ids == image_span + first_turn
        assert all(episode.sampled[episode.prompt_length : episode.prompt_length + len(first_turn)])
        assert tokenizer.decode(first_turn).endswith("</tool><|im_end|>\n")
        assert example.labels == [IGNORE_INDEX] * len(image_span) + first_turn
        assert torch.equal(example.pixel_values, episode.pixel_rows[0]) and example.grid == episode.grids[0].tolist()


def test_grounding_warm_up_trains_the_llm_only(tmp_path):
    from vilavt.grounding_warmup import grounding_examples, turn_accuracy, warm_up_grounding
    from vilavt.vision_pretraining import vision_parameters

    torch.manual_seed(0)
    model, processor = tiny_vilavt(seed=2, preset="demo")
    path = write_tasks(tmp_path, 16, 600, ["single"], processor)
    examples = grounding_examples(load_trajectories(path), processor, tmp_path)
    vision = [p.detach().clone() for p in vision_parameters(model)]
    head = model.lm_head.weight.detach().clone()
    flags = [p.requires_grad for p in model.parameters()]
    before = turn_accuracy(model, processor, examples[:-1])
    result = warm_up_grounding(model, processor, examples, steps=200, batch_size=8, lr=3e-3)
    assert result["turn"] == turn_accuracy(model, processor, examples[-1:])  # the held-out 10 %: the last one
    assert before == 0.0 and turn_accuracy(model, processor, examples[:-1]) >= 0.5  # fits its 15 training turns
    assert all(torch.equal(a, b) for a, b in zip(vision, vision_parameters(model)))
    assert not torch.equal(head, model.lm_head.weight)
    assert [p.requires_grad for p in model.parameters()] == flags

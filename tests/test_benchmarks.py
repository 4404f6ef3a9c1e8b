"""The benchmark harness (`vilavt eval`): reading the paper's benchmark files, the questions the model is
asked, the reference's metrics, summaries, and resumable batched runs on the tiny model."""

import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from transformers import LogitsProcessorList

from vilavt.benchmarks import (
    MULTIPLE_CHOICE_INSTRUCTION,
    NUMBER_INSTRUCTION,
    BenchmarkError,
    Item,
    append_results,
    build_question,
    dry_run,
    load_benchmark,
    read_results,
    replace_image_tags,
    run_eval,
    score_benchmark_answer,
    summarize,
)
from vilavt.cli import main
from vilavt.scripted import ScriptedPolicy, answer_text

SAMPLES = Path(__file__).parent / "fixtures" / "benchmarks"
SAMPLE_FILES = sorted(SAMPLES.glob("*.json"))


def raw_items(path) -> list[dict]:
    return json.loads(Path(path).read_text())


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ---- reading the paper's benchmark files ------------------------------------------------------------


def test_all_seven_sample_benchmarks_are_present():
    assert len(SAMPLE_FILES) == 7


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_every_sample_item_becomes_a_question(path):
    records, items = raw_items(path), load_benchmark(path)
    assert len(items) == len(records)
    assert len({item.id for item in items}) == len(items)
    for record, item in zip(records, items):
        assert item.id == str(record["question_id"])
        assert item.benchmark == path.stem
        assert item.images == record["images"]
        assert item.options == record.get("options")
        assert item.answer == record["answer"]
        assert item.problem_type == "multiple choice"
        assert item.category == str(
            next(record[f] for f in ("category", "original_question_type", "task") if f in record)
        )
        assert "<image>" not in item.question
        if record.get("options") is not None:
            assert "\n" + "\n".join(record["options"]) in item.question
        if path.stem == "ERQA":  # its questions carry their own instruction (the reference adds none)
            assert MULTIPLE_CHOICE_INSTRUCTION not in item.question
            assert [int(n) for n in re.findall(r"\[image (\d+)\]", item.question)] == list(range(len(item.images)))
        else:
            assert item.question.endswith("\n" + MULTIPLE_CHOICE_INSTRUCTION)


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_dry_run_reports_no_errors_on_the_samples(path, tmp_path, capsys):
    assert main(["eval", "--benchmark", str(path), "--image-root", str(tmp_path / "nowhere"), "--dry-run"]) == 0
    report = last_json_line(capsys.readouterr().out)
    records = raw_items(path)
    assert report == {
        "items": len(records),
        "parsed": len(records),
        "missing_images": sum(len(r["images"]) for r in records),
        "errors": 0,
    }


def test_dry_run_counts_only_the_images_that_are_missing(tmp_path):
    path = SAMPLES / "ERQA.json"
    present = [p for r in raw_items(path)[:4] for p in r["images"]]  # 1 + 1 + 1 + 2 images
    for name in present:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    report = dry_run(path, tmp_path)
    assert report["missing_images"] == 19 - len(present) == 14
    assert report["parsed"] == 12


def test_erqa_image_tags_become_image_references():
    question = "Which object is closest to where frame 1 is taken from?<image>frame 1<image>frame 2<image>frame 3"
    assert replace_image_tags(question) == (
        "Which object is closest to where frame 1 is taken from? [image 0] frame 1 [image 1] frame 2 [image 2] frame 3"
    )
    assert replace_image_tags("<image><image>Compare them.") == "[image 0] [image 1] Compare them."
    assert replace_image_tags("No tags here.") == "No tags here."


def benchmark_file(tmp_path, records, name="mini.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def mc(question_id, images=("a.png",), **fields):
    record = dict(question_id=question_id, question=f"Question {question_id}?", answer="A",
                  problem_type="multiple choice", options=["A. yes", "B. no"], images=list(images))
    record.update(fields)
    return record


def test_image_tags_must_match_the_images(tmp_path):
    path = benchmark_file(tmp_path, [mc(7, images=["a.png"], question="<image><image>Same?")], "ERQA.json")
    expected = r"ERQA.json: item 0 \(question_id 7\) the question has 2 <image> tags but 1 images"
    with pytest.raises(BenchmarkError, match=expected):
        load_benchmark(path)


def test_visual_indices_that_disagree_with_the_tags_are_logged(tmp_path, caplog):
    record = mc(1, images=["a.png", "b.png"], question="Left<image>right<image>?", visual_indices=[0, 9])
    with caplog.at_level(logging.WARNING, logger="vilavt.benchmarks"):
        (item,) = load_benchmark(benchmark_file(tmp_path, [record]))
    assert "visual_indices [0, 9]" in caplog.text and "[4, 9]" in caplog.text
    assert item.question.startswith("Left [image 0] right [image 1] ?")


def test_question_building_by_problem_type():
    options = ["A. x", "B. y"]
    assert build_question("Q?", "multiple choice", options) == f"Q?\nA. x\nB. y\n{MULTIPLE_CHOICE_INSTRUCTION}"
    assert build_question("Q? A. x B. y", "multiple choice", None) == f"Q? A. x B. y\n{MULTIPLE_CHOICE_INSTRUCTION}"
    assert build_question("Q?", "multiple choice", ["A. x"], instruction=False) == "Q?\nA. x"
    assert build_question("How far?", "regression") == f"How far?\n{NUMBER_INSTRUCTION}"
    assert build_question("How many?", "numerical", ["ignored"]) == f"How many?\n{NUMBER_INSTRUCTION}"
    assert build_question("Move?", "vci") == "Move?"


def test_other_schemas_images_absent_single_path_frames_and_categories(tmp_path):
    records = [
        dict(question_id="t", question="Text only?", answer="yes", problem_type="judgment"),
        dict(question_id="s", question="One?", answer="3", problem_type="numerical", image="one.png", task="count"),
        dict(question_id="v", question="Size?", answer="2.5", problem_type="regression",
             images=[f"f/{i:02d}.jpg" for i in range(32)], original_question_type="room_size_estimation_hard"),
        dict(question_id="v", question="Move?", answer="move_right:1", problem_type="vci", images=["x.png"]),
    ]
    items = load_benchmark(benchmark_file(tmp_path, records, "vsibench_32frame.json"))
    assert [len(item.images) for item in items] == [0, 1, 32, 1]
    assert [item.category for item in items] == ["all", "count", "room_size_estimation", "all"]
    assert [item.id for item in items] == ["t", "s", "v", "v#3"]  # a repeated id stays unique
    assert items[1].question == f"One?\n{NUMBER_INSTRUCTION}"


# ---- bad input ----------------------------------------------------------------------------------------


def test_unknown_problem_type_is_named(tmp_path, capsys):
    path = benchmark_file(tmp_path, [mc(1), mc(2, problem_type="essay"), mc(3)])
    with pytest.raises(BenchmarkError, match=r"item 1 \(question_id 2\) .*unknown problem_type 'essay'"):
        load_benchmark(path)
    assert main(["eval", "--benchmark", str(path), "--image-root", str(tmp_path), "--dry-run"]) == 0
    assert last_json_line(capsys.readouterr().out) == {"items": 3, "parsed": 2, "missing_images": 2, "errors": 1}
    with pytest.raises(ValueError, match="unknown problem_type 'essay'"):
        score_benchmark_answer("A", "A", "essay")


def test_corrupt_json_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"question_id": 1,\n   "question": "Q?" "answer": "A"}\n]\n')
    with pytest.raises(BenchmarkError, match=r"broken.json: invalid JSON at line 3, column 21"):
        load_benchmark(path)
    assert main(["eval", "--benchmark", str(path), "--image-root", str(tmp_path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"vilavt eval: error: {path}: invalid JSON at line 3, column 21: Expecting ',' delimiter\n"


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"question": "caf\xe9?"}]'.encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 18, line 1\)"),
        (b"[\n" + bytes(range(128, 256)), r"not UTF-8 text \(byte 0x80 at offset 2, line 2\)"),
        ("[]".encode("utf-16"), r"not UTF-8 text \(byte 0xff at offset 0, line 1\)"),
        (b"\x00\x01" * 8, r"invalid JSON at line 1, column 1"),
        (b"[" * 100_000, r"JSON nested too deeply|invalid JSON"),
        (b"[1, 2]", r"item 0 is (int|list), not an object"),  # (.jsonl: the line is item 0)
        (b'"items"', r"expected a JSON list of objects \(one per question\), got str|item 0 is str"),
    ],
    ids=["latin-1", "binary", "utf-16", "nul-bytes", "deep", "numbers", "a-string"],
)
def test_a_file_that_is_not_a_utf8_json_list_is_named(tmp_path, content, message):
    for name in ("bench.json", "bench.jsonl"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(BenchmarkError, match=rf"^{re.escape(str(path))}: ({message})"):
            load_benchmark(path)
        with pytest.raises(BenchmarkError, match=message):
            dry_run(path, tmp_path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([mc(1, question="Caf\u00e9?")]).encode())
    assert load_benchmark(path)[0].question.startswith("Caf\u00e9?")


WRONG_TYPES = [
    ("answer", ["A"]), ("answer", {"text": "A"}), ("answer", True), ("answer", ""), ("answer", float("nan")),
    ("question", 7), ("question", ["Q?"]), ("question", "  "), ("problem_type", 3), ("problem_type", ["numerical"]),
    ("options", "A. yes B. no"), ("options", [1, 2]), ("options", {"A": "yes"}), ("images", 3), ("images", [1]),
    ("images", [""]), ("images", {"a": "b.png"}), ("image", 5), ("question_id", 1.5), ("question_id", [1]),
    ("question_id", True), ("category", {"name": "x"}), ("category", [1]), ("num_images", "1"), ("num_images", -1),
    ("visual_indices", "0"), ("visual_indices", [0.5]),
]  # fmt: skip


@pytest.mark.parametrize("field, value", WRONG_TYPES, ids=[f"{f}={json.dumps(v)}" for f, v in WRONG_TYPES])
def test_fields_of_the_wrong_type_are_named_at_load_time(tmp_path, field, value):
    record = mc(2, images=["a.png"])
    record.pop("images") if field == "image" else None
    record[field] = value
    path = benchmark_file(tmp_path, [mc(1), record, mc(3)])
    label = r"item 1 \(question_id 2\)" if field != "question_id" else r"item 1 \(question_id .*\)"
    with pytest.raises(BenchmarkError, match=rf"^{re.escape(str(path))}: {label} `{field}` must be "):
        load_benchmark(path)
    assert dry_run(path, tmp_path)["errors"] == 1 and dry_run(path, tmp_path)["parsed"] == 2


def test_numbers_and_ids_of_the_right_types_are_accepted(tmp_path):
    records = [
        dict(question_id=7, question="How many?", answer=3, problem_type="numerical", category=2),
        dict(question_id="x", question="How far?", answer=2.5, problem_type="regression", options=None, images=None,
             image="one.png", num_images=1, visual_indices=None),
        mc(9, options=[]),
    ]  # fmt: skip
    items = load_benchmark(benchmark_file(tmp_path, records))
    assert [(i.id, i.answer, i.category, i.images) for i in items] == [
        ("7", "3", "2", []), ("x", "2.5", "all", ["one.png"]), ("9", "A", "all", ["a.png"]),
    ]
    assert score_benchmark_answer("3", items[0].answer, items[0].problem_type) == 1.0


def test_corrupt_jsonl_line_is_named(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(mc(1)) + "\n" + json.dumps(mc(2)) + "\n{oops\n")
    with pytest.raises(BenchmarkError, match=r"items.jsonl: invalid JSON at line 3, column 2"):
        load_benchmark(path)
    path.write_text(json.dumps(mc(1)) + "\n\n" + json.dumps(mc(2)) + "\n")
    assert [item.id for item in load_benchmark(path)] == ["1", "2"]


def test_a_benchmark_must_be_a_list_of_items(tmp_path):
    with pytest.raises(BenchmarkError, match="expected a JSON list"):
        load_benchmark(benchmark_file(tmp_path, {"items": []}))


# ---- metrics --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, gold, kind, score",
    [
        ("B", "B", "multiple choice", 1.0),
        ("b", "B. red", "multiple choice", 1.0),  # first letters, case-insensitive
        ("A. right", "A. right", "multiple choice", 1.0),
        ("right", "A. right", "multiple choice", 0.0),
        ("<think>hmm</think><answer> C </answer>", "C", "multiple choice", 1.0),
        ("", "A", "multiple choice", 0.0),  # the reference crashes here
        ("   ", "A", "multiple choice", 0.0),
        (None, "A", "multiple choice", 0.0),  # no <answer> in the generation
        ("3", "3", "numerical", 1.0),
        ("3.0", "3", "numerical", 0.0),  # one has a decimal point, the other not
        ("3.14159", "3.14", "numerical", 1.0),  # equal after rounding to 2 decimals
        ("3.146", "3.14", "numerical", 0.0),
        ("1,000", "1000", "numerical", 0.0),  # a comma counts as a separator
        ("1,000", "1,000", "numerical", 1.0),
        ("seven", "7", "numerical", 0.0),
        ("10", "10", "regression", 1.0),
        ("15", "10", "regression", 0.1),  # 50 % off: only θ = .50, which the ≤ of the evaluation counts
        ("9.3", "10", "regression", 0.9),
        ("12.2 m", "10", "regression", 0.0),  # the whole answer must be a number
        ("move_right:1,move_forward:2", "move_right:1,move_forward:2", "vci", 1.0),
        ("move_forward:2,move_right:1", "move_right:1,move_forward:2", "vci", 1.0),
        ("move_forward:2, move_right:1", "move_right:1,move_forward:2", "vci", 0.8),  # " move_right" is no action
        ("move_right:2,move_left:1,move_forward:2", "move_right:1,move_forward:2", "vci", 1.0),  # net right = 1
        ("move_forward:2", "move_right:1,move_forward:2", "vci", 0.8),  # right/left pair wrong, 4 pairs right
        ("move_forward:3,move_right:1", "move_right:1,move_forward:2", "vci", (1 + 0.1 + 1 + 1 + 1) / 5),
        ("rotate_up:10", "rotate_down:10", "vci", 0.8),  # net +10 vs -10
        ("turn left", "move_right:1", "vci", 0.0),
        ("", "move_right:1", "vci", 0.0),
        ("Yes.", "yes", "judgment", 1.0),  # the rewards' metric
        ("Multiple Choice", "m", " Multiple Choice", 1.0),  # another spelling gets its metric (the authors': 0)
    ],
)
def test_metrics(prediction, gold, kind, score):
    assert score_benchmark_answer(prediction, gold, kind) == pytest.approx(score)


def item(id, category, benchmark="bench"):
    return Item(id=id, benchmark=benchmark, images=[], question="Q?", answer="A", problem_type="multiple choice",
                category=category, options=None)


def records_of(scores: dict) -> dict:
    return {key: {"id": key[0], "sample": key[1], "score": s, "answer": "A", "rounds": 1, "error": None}
            for key, s in scores.items()}


def test_summary_averages_samples_then_items():
    items = [item("1", "x"), item("2", "x"), item("3", "y")]
    records = records_of({("1", 0): 1.0, ("1", 1): 0.0, ("2", 0): 1.0, ("2", 1): 1.0, ("3", 0): 0.0, ("3", 1): 0.0})
    records[("3", 1)]["error"] = "b.png: image file not found"
    summary = summarize(items, records, avg_k=2)
    assert summary["accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert summary["categories"] == {"x": {"accuracy": 0.75, "items": 2}, "y": {"accuracy": 0.0, "items": 1}}
    assert summary["errors"] == 1 and summary["samples"] == 5 and summary["pending"] == 0
    assert summary["error_items"] == [{"id": "3", "sample": 1, "error": "b.png: image file not found"}]
    only_first = summarize(items, records, avg_k=1)
    assert only_first["accuracy"] == pytest.approx(2 / 3)


def test_vsi_and_spar_overall_is_the_mean_of_type_means():
    vsi = [item("1", "object_counting", "vsibench_32frame"), item("2", "object_counting", "vsibench_32frame"),
           item("3", "object_counting", "vsibench_32frame"), item("4", "route_planning", "vsibench_32frame")]
    records = records_of({("1", 0): 1.0, ("2", 0): 1.0, ("3", 0): 1.0, ("4", 0): 0.0})
    assert summarize(vsi, records)["accuracy"] == pytest.approx(0.5)  # not 3/4
    # A type outside VSI-Bench's table is counted but left out of its overall, as in the authors' script.
    other = summarize(vsi + [item("5", "obj_count", "vsibench_32frame")], {**records, **records_of({("5", 0): 0.0})})
    assert other["accuracy"] == pytest.approx(0.5) and other["vsi"]["left_out"] == ["obj_count"]
    assert other["vsi"]["count"] == 5 and other["mean"] == pytest.approx(3 / 5)
    assert summarize([item(i.id, i.category, "other") for i in vsi], records)["accuracy"] == pytest.approx(0.75)
    spar = [item("1", "depth_prediction_oc", "spar_bench"), item("2", "distance_infer_center_oo", "spar_bench"),
            item("3", "view_change_infer", "spar_bench"), item("4", "obj_spatial_relation_oo", "spar_bench")]
    records = records_of({("1", 0): 1.0, ("2", 0): 0.0, ("3", 0): 0.5, ("4", 0): 1.0})
    summary = summarize(spar, records)
    assert summary["levels"] == {"Low": 1.0, "High": 0.5, "Medium": 0.5}
    assert summary["accuracy"] == pytest.approx(0.625)


# ---- running the tiny model -----------------------------------------------------------------------------


def picture(path, size, color, seed):
    image = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(image)
    for k in range(4):
        x, y = (seed * 37 + k * 53) % (size[0] - 20), (seed * 29 + k * 41) % (size[1] - 20)
        draw.rectangle((x, y, x + 20, y + 16), fill=((seed * 80) % 255, (k * 60) % 255, 120))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def small_benchmark(tmp_path, count=5, missing=()) -> Path:
    """`count` items (item k asks "question-k"), PNG images under tmp_path/images; item 1 has two images."""
    records = []
    for k in range(count):
        names = [f"img/{k}_{j}.png" for j in range(2 if k == 1 else 1)]
        for j, name in enumerate(names):
            if k not in missing:
                picture(tmp_path / "images" / name, (120 + 30 * k, 90 + 20 * j), "white", k + j)
        records.append(dict(question_id=f"q{k}", question=f"question-{k}: which colour?", answer="AB"[k % 2],
                            options=["A. red", "B. blue"], problem_type="multiple choice", images=names,
                            category="even" if k % 2 == 0 else "odd"))
    return benchmark_file(tmp_path, records, "mini.json")


def scripted_answers(model, monkeypatch, answers: dict[str, str]) -> list[list[str]]:
    """Make `model.generate` answer question-k with answers[k] (a ScriptedPolicy per call); returns the
    list of questions each call generated for."""
    calls, generate = [], model.generate

    def wrapped(**kwargs):
        processor = kwargs["processor"]
        prompts = processor.tokenizer.batch_decode(kwargs["input_ids"])
        keys = [re.search(r"question-(\d+)", prompt).group(1) for prompt in prompts]
        calls.append(keys)
        policy = ScriptedPolicy(processor.tokenizer, [[answer_text(answers[k])] for k in keys])
        return generate(**kwargs, logits_processor=LogitsProcessorList([policy]))

    monkeypatch.setattr(model, "generate", wrapped)
    return calls


def result_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_scores_come_from_the_models_answers_in_batches(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    path = small_benchmark(tmp_path, count=5)
    calls = scripted_answers(model, monkeypatch, {"0": "A", "1": "A", "2": "C", "3": "B", "4": "A"})
    out = tmp_path / "results.jsonl"
    summary = run_eval(path, tmp_path / "images", model, processor, batch_size=2, max_rounds=2, out_path=out,
                       progress=False, max_new_tokens=40)
    assert calls == [["0", "1"], ["2", "3"], ["4"]]
    lines = result_lines(out)
    assert [(r["id"], r["sample"], r["answer"], r["score"]) for r in lines] == [
        ("q0", 0, "A", 1.0), ("q1", 0, "A", 0.0), ("q2", 0, "C", 0.0), ("q3", 0, "B", 1.0), ("q4", 0, "A", 1.0),
    ]
    assert all(r["stop_reason"] == "answer" and r["rounds"] == 0 and r["error"] is None for r in lines)
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["categories"] == {"even": {"accuracy": pytest.approx(2 / 3), "items": 3},
                                     "odd": {"accuracy": 0.5, "items": 2}}


def test_the_metric_scores_the_final_response_as_the_authors(tiny, tmp_path, monkeypatch):
    """By default the metric reads the final turn (its <answer> content: no \\boxed{} unwrapping, as the authors'
    script on their vLLM evaluator's responses); `prediction="answer"` scores the extracted answer instead."""
    model, processor = tiny
    path = small_benchmark(tmp_path, count=2)  # golds: A, B
    scripted_answers(model, monkeypatch, {"0": "\\boxed{A}", "1": "B"})
    kwargs = dict(batch_size=2, max_rounds=1, progress=False, max_new_tokens=60)
    run_eval(path, tmp_path / "images", model, processor, out_path=tmp_path / "response.jsonl", **kwargs)
    lines = result_lines(tmp_path / "response.jsonl")
    assert [(r["answer"], r["score"]) for r in lines] == [("A", 0.0), ("B", 1.0)]
    assert lines[0]["response"].endswith("<answer>\\boxed{A}</answer>")
    run_eval(path, tmp_path / "images", model, processor, out_path=tmp_path / "answer.jsonl", prediction="answer",
             **kwargs)  # fmt: skip
    assert [r["score"] for r in result_lines(tmp_path / "answer.jsonl")] == [1.0, 1.0]


def test_an_interrupted_run_resumes_without_redoing_items(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    path = small_benchmark(tmp_path, count=5)
    calls = scripted_answers(model, monkeypatch, dict.fromkeys("01234", "A"))
    out = tmp_path / "results.jsonl"
    kwargs = dict(batch_size=2, max_rounds=1, avg_k=2, out_path=out, progress=False, max_new_tokens=40)
    run_eval(path, tmp_path / "images", model, processor, limit=2, **kwargs)
    assert calls == [["0", "0"], ["1", "1"]]  # an item's samples share a batch
    with out.open("a") as f:
        f.write('{"benchmark": "mini", "id": "q2", "sam')  # a write cut short
    calls.clear()
    summary = run_eval(path, tmp_path / "images", model, processor, **kwargs)
    assert calls == [["2", "2"], ["3", "3"], ["4", "4"]]
    assert summary["samples"] == 10 and summary["accuracy"] == pytest.approx(3 / 5)
    assert len(read_results(out, "mini")) == 10
    calls.clear()
    run_eval(path, tmp_path / "images", model, processor, **kwargs)
    assert calls == []


def test_a_missing_image_is_recorded_and_the_run_goes_on(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    path = small_benchmark(tmp_path, count=4, missing={1})
    calls = scripted_answers(model, monkeypatch, dict.fromkeys("0123", "A"))
    out = tmp_path / "results.jsonl"
    summary = run_eval(path, tmp_path / "images", model, processor, batch_size=2, out_path=out, progress=False,
                       max_new_tokens=40)
    assert calls == [["0"], ["2", "3"]]
    failed = [r for r in result_lines(out) if r["error"]]
    assert len(failed) == 1 and failed[0]["id"] == "q1" and failed[0]["score"] == 0.0
    assert "img/1_0.png" in failed[0]["error"] and "not found" in failed[0]["error"]
    assert summary["errors"] == 1 and summary["samples"] == 3
    assert summary["accuracy"] == pytest.approx(2 / 4)  # a failed item scores 0
    # Once the images are there, a rerun tries only the failed item again.
    for j in range(2):
        picture(tmp_path / "images" / f"img/1_{j}.png", (100, 80), "white", j)
    calls.clear()
    summary = run_eval(path, tmp_path / "images", model, processor, batch_size=2, out_path=out, progress=False,
                       max_new_tokens=40)
    assert calls == [["1"]] and summary["errors"] == 0 and summary["accuracy"] == pytest.approx(2 / 4)


def record_line(id, sample=0, response="A") -> bytes:
    record = dict(benchmark="mini", id=id, sample=sample, answer="A", response=response, gold="A", score=1.0,
                  rounds=1, stop_reason="answer", error=None)  # fmt: skip
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def test_a_results_line_cut_anywhere_is_skipped_then_cut_off(tmp_path):
    """Every cut of a line holding 2-, 3- and 4-byte characters (inside a character too): the complete lines
    are read, the cut one is skipped, and the next append leaves only valid JSON lines."""
    done = record_line("q0") + record_line("q1")
    cut = record_line("q2", response="caf\u00e9 \u65e5\u672c \U0001f642 done")
    assert len(cut) > len(cut.decode()) + 6  # multi-byte characters
    for end in range(1, len(cut) - 1):  # without its newline and closing brace a record is never complete
        path = tmp_path / f"cut-{end}.jsonl"
        path.write_bytes(done + cut[:end])
        assert set(read_results(path, "mini")) == {("q0", 0), ("q1", 0)}
        append_results(path, [json.loads(record_line("q2", response="again"))])
        lines = path.read_bytes().decode("utf-8").splitlines()
        assert [json.loads(line)["id"] for line in lines] == ["q0", "q1", "q2"]
        assert read_results(path, "mini")[("q2", 0)]["response"] == "again"


def test_a_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(record_line("q0") + record_line("q1", response="\u65e5\u672c")[:-1])
    append_results(path, [json.loads(record_line("q2"))])
    assert [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()] == ["q0", "q1", "q2"]


def test_unreadable_lines_inside_the_file_are_skipped(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    lines = [record_line("q0"), record_line("q1")[:30] + "\u65e5".encode()[:2] + b"\n", b"\xff\xfe\n", b"[1, 2]\n",
             b'{"benchmark": "mini", "id": "q2", "sample": "0", "score": 1.0}\n',
             b'{"benchmark": "mini", "id": "q3", "sample": 0, "score": "high"}\n', record_line("q4"), b"[" * 50_000 + b"\n"]
    path.write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING, logger="vilavt.benchmarks"):
        assert set(read_results(path, "mini")) == {("q0", 0), ("q4", 0)}
    assert caplog.text.count("unreadable result line skipped") == 6


def test_a_rerun_after_a_write_cut_inside_a_character_resumes(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    path = small_benchmark(tmp_path, count=3)
    calls = scripted_answers(model, monkeypatch, dict.fromkeys("012", "A"))
    out = tmp_path / "results.jsonl"
    kwargs = dict(batch_size=1, max_rounds=1, out_path=out, progress=False, max_new_tokens=40)
    run_eval(path, tmp_path / "images", model, processor, limit=2, **kwargs)
    record = json.loads(out.read_text().splitlines()[-1]) | {"id": "q2", "response": "r\u00e9ponse \u65e5\u672c"}
    line = json.dumps(record, ensure_ascii=False).encode("utf-8")
    cut = line.index("\u65e5".encode()) + 1  # inside the 3-byte character
    with out.open("ab") as f:
        f.write(line[:cut])
    calls.clear()
    summary = run_eval(path, tmp_path / "images", model, processor, **kwargs)
    assert calls == [["2"]] and summary["samples"] == 3 and summary["errors"] == 0
    assert [r["id"] for r in result_lines(out)] == ["q0", "q1", "q2"]  # every line is valid JSON again
    calls.clear()
    run_eval(path, tmp_path / "images", model, processor, **kwargs)
    assert calls == []


def test_results_of_another_benchmark_are_refused(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps({"benchmark": "ERQA", "id": "1", "sample": 0, "score": 1.0}) + "\n")
    with pytest.raises(BenchmarkError, match="results of benchmark 'ERQA', not 'mini'"):
        read_results(out, "mini")


def test_vilavt_eval_end_to_end_on_the_tiny_model(tmp_path, capsys):
    path = small_benchmark(tmp_path, count=3)
    out = tmp_path / "results.jsonl"
    argv = ["--benchmark", str(path), "--image-root", str(tmp_path / "images"), "--model", "tiny:0",
            "--batch-size", "2", "--max-rounds", "2", "--max-new-tokens", "40", "--out", str(out), "--no-progress"]
    assert main(["eval", *argv]) == 0
    printed = capsys.readouterr().out
    summary = last_json_line(printed)
    assert summary["items"] == 3 and summary["samples"] == 3 and summary["errors"] == 0
    assert set(summary["categories"]) == {"even", "odd"}
    assert re.search(r"^overall \(mean over items, Avg@1\)\s+3\s+\d+\.\d\d$", printed, re.MULTILINE)
    lines = result_lines(out)
    assert [r["id"] for r in lines] == ["q0", "q1", "q2"]
    for record in lines:
        fields = {"benchmark", "id", "sample", "answer", "response", "gold", "score", "rounds", "stop_reason", "error"}
        assert set(record) == fields
        assert record["stop_reason"] in {"answer", "no_answer", "eos", "max_new_tokens", "max_rounds"}
        assert 0 <= record["rounds"] <= 2 and record["error"] is None  # the --max-rounds budget
    assert summary["accuracy"] == sum(r["score"] for r in lines) / 3


def test_eval_needs_a_model_unless_dry_run(tmp_path):
    with pytest.raises(SystemExit):
        main(["eval", "--benchmark", str(SAMPLES / "ERQA.json"), "--image-root", str(tmp_path)])

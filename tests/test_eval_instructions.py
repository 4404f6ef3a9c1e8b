"""The instruction after a benchmark question is this project's wording by default and replaceable (e.g. by the
wording of the reference's evaluator, to reproduce its numbers): `build_question(instructions=)`,
`load_benchmark` / `run_eval(instructions=)`, `vilavt eval --instructions FILE.json`."""

import json

import pytest

import vilavt.benchmarks as benchmarks
from vilavt.cli import main
from vilavt.benchmarks import (
    INSTRUCTIONS,
    BenchmarkError,
    build_question,
    load_benchmark,
    load_instructions,
)

OURS = {"multiple choice": "Pick one letter, please.", "regression": "A number, please."}


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def items_file(tmp_path, name="mini.json"):
    records = [
        dict(question_id=1, question="Which?", answer="A", problem_type="multiple choice", options=["A. x", "B. y"]),
        dict(question_id=2, question="How far?", answer="2.5", problem_type="regression"),
        dict(question_id=3, question="How many?", answer="3", problem_type="numerical"),
    ]
    return write(tmp_path / name, records)


def test_build_question_uses_the_given_instructions():
    assert build_question("Q?", "multiple choice", ["A. x"], instructions=OURS) == "Q?\nA. x\nPick one letter, please."
    assert build_question("How far?", "regression", instructions=OURS) == "How far?\nA number, please."
    assert build_question("How many?", "numerical", instructions=OURS) == "How many?"  # a type it lacks: none
    assert build_question("Q?", "multiple choice", instructions={"multiple choice": ""}) == "Q?"
    assert build_question("Q?", "multiple choice", instruction=False, instructions=OURS) == "Q?"
    assert build_question("Q?", "multiple choice") == "Q?\n" + INSTRUCTIONS["multiple choice"]


def test_load_benchmark_applies_them_but_not_to_erqa(tmp_path):
    questions = [item.question for item in load_benchmark(items_file(tmp_path), OURS)]
    assert questions == ["Which?\nA. x\nB. y\nPick one letter, please.", "How far?\nA number, please.", "How many?"]
    assert [item.question for item in load_benchmark(items_file(tmp_path, "ERQA.json"), OURS)][0] == "Which?\nA. x\nB. y"


def test_instructions_files(tmp_path):
    path = write(tmp_path / "i.json", {"Multiple Choice": "Letter.", "numerical": "Number."})
    assert load_instructions(path) == {"multiple choice": "Letter.", "numerical": "Number."}
    bad = {
        "broken.json": ("{", r"broken\.json: not a readable JSON instructions file"),
        "list.json": ('["Letter."]', r"list\.json: expected a JSON object of problem type -> instruction text"),
        "number.json": ('{"numerical": 3}', r"number\.json: expected a JSON object"),
        "unknown.json": ('{"essay": "Write."}', r"unknown\.json: unknown problem_type 'essay'"),
    }
    for name, (text, message) in bad.items():
        with pytest.raises(BenchmarkError, match=message):
            load_instructions(write(tmp_path / name, text))
    with pytest.raises(BenchmarkError, match=r"missing\.json: not a readable JSON"):
        load_instructions(tmp_path / "missing.json")


def test_vilavt_eval_asks_with_the_file_s_instructions(tmp_path, monkeypatch, capsys):
    """`--instructions` reaches the questions the model is asked (through `run_eval`); a bad file is a
    one-line error before any model loads."""
    asked = []

    def fake_batch(model, processor, batch, *args, **kwargs):
        asked.extend(item.question for item, _ in batch)
        return [dict(benchmark=item.benchmark, id=item.id, sample=sample, answer=item.answer, response=item.answer,
                     gold=item.answer, score=1.0, rounds=0, stop_reason="answer", error=None)
                for item, sample in batch]  # fmt: skip

    monkeypatch.setattr(benchmarks, "evaluate_batch", fake_batch)
    path, instructions = items_file(tmp_path), write(tmp_path / "i.json", OURS)
    argv = ["--benchmark", str(path), "--image-root", str(tmp_path), "--model", "tiny", "--no-progress",
            "--out", str(tmp_path / "out.jsonl")]  # fmt: skip
    assert main(["eval", *argv, "--instructions", str(instructions)]) == 0
    assert asked == ["Which?\nA. x\nB. y\nPick one letter, please.", "How far?\nA number, please.", "How many?"]
    capsys.readouterr()
    assert main(["eval", *argv, "--dry-run", "--instructions", str(write(tmp_path / "bad.json", "[1]"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vilavt eval: error: ") and "bad.json" in err and "\n" not in err

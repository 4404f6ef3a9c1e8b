"""The GRPO reward against the authors' own scorer (`gcot_compute_score`) on 3,076 golden conversations
(tests/fixtures/authors-behaviour/reward/README.md): equal on every row with the authors' options; with our
defaults, the rows that differ are exactly those of the documented options, by class and count."""

import gzip
import json
from pathlib import Path

import pytest

from vilavt.rewards import (
    AUTHORS,
    DEFAULTS,
    extract_answer,
    make_vilavt_reward,
    problem_kind,
    score_conversation,
    turn_accuracy,
)

FIXTURES = Path(__file__).parent / "fixtures" / "authors-behaviour" / "reward"
PREFIX = (FIXTURES / "prompt_prefix.txt").read_text()
TOOL_TURNS = json.loads((FIXTURES / "tool_response_turns.json").read_text())
with gzip.open(FIXTURES / "golden.jsonl.gz", "rt", encoding="utf-8") as lines:
    ROWS = [json.loads(line) for line in lines]


def expand(completion: str) -> str:
    """The completion as the authors' scorer saw it after the prompt (tool-response markers expanded)."""
    return completion.replace("<<TOOL_TURN_FINAL>>", TOOL_TURNS["<<TOOL_TURN_FINAL>>"]).replace(
        "<<TOOL_TURN>>", TOOL_TURNS["<<TOOL_TURN>>"]
    )


def authors(row) -> tuple:
    return row["authors_score"], row["authors_format"], row["authors_accuracy"]


def ours(row, prompt_text=None, **options) -> tuple:
    parts = score_conversation(expand(row["completion"]), row["ground_truth"], row["problem_type"],
                               prompt_text=prompt_text, **options)  # fmt: skip
    return parts.overall, parts.format, parts.accuracy


def differing(**options) -> list[int]:
    return [i for i, row in enumerate(ROWS) if ours(row, **options) != authors(row)]


def test_the_fixture_is_complete():
    assert len(ROWS) == 3076
    assert not any("authors_error" in row for row in ROWS)
    assert sum(row.get("authors_scored_role") == "user" for row in ROWS) == 330


@pytest.mark.parametrize("with_prompt", [True, False], ids=["prompt+completion", "completion only"])
def test_authors_options_reproduce_every_row(with_prompt):
    """Overall, format and accuracy equal the authors' floats exactly (MRA's float32 noise included),
    whether the reward sees the whole conversation or, as in our trainer, only the completion."""
    prompt = PREFIX if with_prompt else None
    assert [i for i, row in enumerate(ROWS) if ours(row, prompt, **AUTHORS) != authors(row)] == []


def test_the_trl_callable_with_authors_options_matches_overall():
    reward = make_vilavt_reward(**AUTHORS)
    got = reward([expand(r["completion"]) for r in ROWS], answer=[r["ground_truth"] for r in ROWS],
                 problem_type=[r["problem_type"] for r in ROWS], trainer_state=None)  # fmt: skip
    assert got == [r["authors_score"] for r in ROWS]


def test_extracted_answers_are_the_authors():
    """On assistant-scored rows, our extraction (first <answer>, else the whole text; last \\boxed{}) gives
    the string the authors compared."""
    from vilavt.rewards import conversation_turns, unwrap_boxed

    for row in ROWS:
        if "authors_extracted" not in row:
            continue
        last = conversation_turns(expand(row["completion"]))[-1]
        assert last.role == "assistant"
        assert unwrap_boxed(extract_answer(last.content)) == row["authors_extracted"]


# Each option's class: which rows it changes and how (the option alone, the others as the authors').
OPTION_CLASSES = {
    # A call our tool rejects (index as a string) earns no format credit; bbox numbers as strings it runs.
    "tool_format": (90, {"tool index as string": 90}),
    # No <answer> in the scored turn: no answer (the authors score the whole text).
    "answer_tag": (94, {"boxed in text": 38, "bare text": 34, "unclosed answer": 12, "answer without tags": 10}),
    # free text / free-form answers equal after normalisation score 1 (the authors: 0 for these types).
    "free_text": (165, None),
}


@pytest.mark.parametrize("option", list(OPTION_CLASSES))
def test_each_option_changes_exactly_its_class(option):
    count, by_structure = OPTION_CLASSES[option]
    rows = differing(**{**AUTHORS, option: DEFAULTS[option]})
    assert len(rows) == count
    if by_structure is not None:
        found: dict[str, int] = {}
        for i in rows:
            found[ROWS[i]["structure"]] = found.get(ROWS[i]["structure"], 0) + 1
        assert found == by_structure
    for i in rows:
        row = ROWS[i]
        overall, fmt, accuracy = ours(row, **{**AUTHORS, option: DEFAULTS[option]})
        if option == "tool_format":  # only format changes, and only from pass to fail
            assert (row["authors_format"], fmt, accuracy) == (1.0, 0.0, row["authors_accuracy"])
        elif option == "answer_tag":  # the authors' credit came from their whole-text fallback
            assert (fmt, accuracy) == (row["authors_format"], 0.0) and row["authors_accuracy"] > 0
            assert "</answer>" not in row["completion"].rsplit("<|im_start|>assistant", 1)[-1]
        else:
            assert problem_kind(row["problem_type"]) == "free text"
            assert (fmt, accuracy, row["authors_accuracy"]) == (row["authors_format"], 1.0, 0.0)


def test_defaults_differ_only_on_the_option_classes():
    union = set()
    for option in OPTION_CLASSES:
        union |= set(differing(**{**AUTHORS, option: DEFAULTS[option]}))
    rows = differing(**DEFAULTS)
    assert len(rows) == 339 and set(rows) <= union
    # The reward itself (overall) moves on 297 of them.
    assert sum(ours(ROWS[i])[0] != ROWS[i]["authors_score"] for i in rows) == 297


# ---- behaviour the rows exercise, spelled out --------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, gold, kind, accuracy",
    [
        ("3.6", "2.4", "numerical", 0.10000000149011612),  # exactly 50 % off lands inside θ = .5 in float32
        ("15", "10", "regression", 0.0),  # exactly 50 % off lands outside
        ("11.2", "10", "numerical", 0.800000011920929),  # MRA partial credit for numerical answers too
        ("\\boxed{2} or \\boxed{3}", "3", "numerical", 1.0),  # the last box
        ("$0.5$", "0.5", "math", 0.0),  # math_verify on raw strings: only equal text
        (" \\frac{1}{2}", "\\frac{1}{2} ", "math", 1.0),
        ("yes or no", "no", "judgment", 1.0),  # both contain "no"
        ("Answer: A", "A", "multiple choice", 1.0),  # first characters
        ("a", "(A)", "multiple choice", 0.0),
        ("blue bus", "a blue bus.", "free text", 1.0),
        ("blue bus", "a blue bus.", "free-form", 1.0),
    ],
)
def test_answer_rules(prediction, gold, kind, accuracy):
    assert turn_accuracy(f"<answer>{prediction}</answer>", gold, kind) == accuracy


def test_problem_types_are_lower_cased_and_unknown_ones_rejected():
    assert problem_kind(" Multiple Choice ") == "multiple choice"
    assert problem_kind("Free-Form") == "free text"
    with pytest.raises(ValueError, match=r"^unknown problem_type 'essay'; known: multiple choice, .*math") as err:
        problem_kind("essay")
    assert "\n" not in str(err.value)

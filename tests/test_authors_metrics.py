"""Benchmark metrics against the authors' evaluation scripts (`cal_metrics.reward_fn` per item; their mean, VSI
and SPAR tables in aggregate) on 2,800 golden responses over 10 benchmarks
(tests/fixtures/authors-behaviour/metrics/)."""

import gzip
import json
from pathlib import Path

import pytest

from vilavt.benchmarks import Item, category_of, format_table, score_benchmark_answer, summarize

FIXTURES = Path(__file__).parent / "fixtures" / "authors-behaviour" / "metrics"
with gzip.open(FIXTURES / "golden.jsonl.gz", "rt", encoding="utf-8") as lines:
    ROWS = [json.loads(line) for line in lines]
AGGREGATES = json.loads((FIXTURES / "aggregates.json").read_text())
BENCHMARKS = list(AGGREGATES)


def score(row) -> float:
    return score_benchmark_answer(row["prediction"], row["answer"], row["problem_type"])


def test_every_item_scores_as_the_authors():
    """Equal floats on every row the authors scored; the 167 rows their script crashes on (empty
    multiple-choice answers: IndexError, which loses the whole run) score 0."""
    crashed = [row for row in ROWS if "authors_error" in row]
    assert len(ROWS) == 2800 and len(crashed) == 167
    assert {row["authors_error"] for row in crashed} == {"IndexError"}
    assert {row["problem_type"] for row in crashed} == {"multiple choice"}
    assert all(score(row) == 0.0 for row in crashed)
    assert [(row["benchmark"], row["question_id"]) for row in ROWS
            if "authors_error" not in row and score(row) != row["authors_score"]] == []  # fmt: skip


def test_scores_by_problem_type_and_variant():
    """Spot checks of the rules the rows exercise (the full comparison is above)."""
    by = {(r["problem_type"], r["variant"], r["prediction"], r["answer"]): r.get("authors_score") for r in ROWS}
    assert by[("multiple choice", "boxed (bare)", "\\boxed{B}", "B")] == 0.0  # no \boxed{} unwrapping
    assert score_benchmark_answer("Answer: A", "A", "multiple choice") == 1.0
    assert score_benchmark_answer("3", "3.0", "numerical") == 0.0  # one has a decimal point
    assert score_benchmark_answer("3.504", "3.5", "numerical") == 1.0  # equal at 2 decimals
    assert score_benchmark_answer("15", "10", "regression") == pytest.approx(0.1)  # <= at θ = .5
    assert score_benchmark_answer("move_right:1", "Move_Right:1", "vci") == pytest.approx(0.8)  # keys are exact
    assert score_benchmark_answer("A", "A", "Multiple Choice", other_types="zero") == 0.0  # exact type names
    assert score_benchmark_answer("A", "A", "Multiple Choice") == 1.0  # ours: the metric of its canonical type
    assert score_benchmark_answer("yes", "Yes", "judgment", other_types="zero") == 0.0
    assert score_benchmark_answer("<answer>yes</answer>", "Yes", "judgment") == 1.0
    with pytest.raises(ValueError, match="unknown problem_type 'essay'"):
        score_benchmark_answer("A", "A", "essay")


def summary_of(benchmark: str) -> dict:
    """Our summary over the rows the authors' tables cover (their script crashes on the others)."""
    items, records = [], {}
    for row in ROWS:
        if row["benchmark"] != benchmark or "authors_error" in row:
            continue
        item = Item(id=str(row["question_id"]), benchmark=benchmark, images=[], question="", answer=row["answer"],
                    problem_type=row["problem_type"], category=category_of(row, benchmark), options=None)  # fmt: skip
        items.append(item)
        records[(item.id, 0)] = {"id": item.id, "sample": 0, "score": score(row), "answer": "", "error": None}
    return summarize(items, records)


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_aggregates_equal_the_authors(benchmark):
    expected, summary = AGGREGATES[benchmark], summary_of(benchmark)
    assert summary["items_scored"] == expected["n_rows"] - len(expected["excluded_rows"])
    assert summary["mean"] == expected["mean"]
    if "vsi_types" in expected:
        table = summary["vsi"]
        assert table["types"] == expected["vsi_types"]
        assert list(table["types"]) == list(expected["vsi_types"])
        assert (table["overall"], table["count"]) == (expected["vsi_overall"], expected["vsi_overall_count"])
        assert table["left_out"] == expected["vsi_merged_types_not_in_table"]
        assert summary["accuracy"] == expected["vsi_overall"]
    elif "spar_levels" in expected:
        table = summary["spar"]
        assert table["levels"] == expected["spar_levels"]
        assert (table["overall"], table["count"]) == (expected["spar_overall"], expected["spar_overall_count"])
        other = expected.get("spar_other_group_not_in_overall", {"count": 0, "types": []})
        assert table["other"] == other
        assert summary["accuracy"] == expected["spar_overall"]
        assert summary["levels"] == {level: entry["score"] for level, entry in expected["spar_levels"].items()}
    else:
        assert summary["accuracy"] == expected["mean"]
    table_text = format_table(summary)
    assert f"{100 * summary['accuracy']:.2f}" in table_text.splitlines()[-1]


def test_crash_rows_count_against_the_benchmark_in_a_run():
    """Our crash fix: a run keeps the empty answers (scored 0) in the mean instead of losing the run."""
    for benchmark, expected in AGGREGATES.items():
        rows = [row for row in ROWS if row["benchmark"] == benchmark]
        excluded = [row["question_id"] for row in rows if "authors_error" in row]
        assert excluded == expected["excluded_rows"]
        total = sum(score(row) for row in rows)
        assert total / len(rows) == pytest.approx(expected["mean"] * (len(rows) - len(excluded)) / len(rows))

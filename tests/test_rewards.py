"""Rewards as TRL callables: format, accuracy per problem type, the paper's combination."""

import pytest

from vilavt.rewards import (
    accuracy_reward,
    assistant_turns,
    format_reward,
    make_vilavt_reward,
    mean_relative_accuracy,
    score_answer,
    vilavt_reward,
)

TOOL = '<think>look</think><tool>{"region": [{"index": 0, "bbox_2d": [0, 0, 9, 9]}], "query": "q"}</tool>'
TOOL_RESPONSE = "<|im_end|>\n<|im_start|>user\n<tool_response>...</tool_response><|im_end|>\n<|im_start|>assistant\n"


def multi_turn(*turns):
    return TOOL_RESPONSE.join(turns)


@pytest.mark.parametrize(
    "prediction, gold, kind, score",
    [
        ("B", "B", "multiple choice", 1.0),
        ("(b) the red one", "B. red", "Multiple Choice", 1.0),
        ("B.", "A", "multiple choice", 0.0),
        ("", "A", "multiple choice", 0.0),  # empty answer: no crash, no credit
        ("Yes, it is.", "yes", "judgment", 1.0),
        ("no", "Yes", "judgment", 0.0),
        ("yes or no", "yes", "judgment", 0.0),  # ambiguous
        ("1,024", "1024", "numerical", 1.0),
        ("3.14", "3.15", "numerical", 0.0),
        ("about seven", "7", "numerical", 0.0),
        ("10", "10", "regression", 1.0),
        ("12.2", "10", "regression", 0.6),  # 22 % off: within 1-θ for θ = .50 … .75
        ("30", "10", "regression", 0.0),
        ("The Red  Square.", "red square", "free text", 1.0),
    ],
)
def test_score_answer(prediction, gold, kind, score):
    assert score_answer(prediction, gold, kind) == pytest.approx(score)


def test_mra():
    assert mean_relative_accuracy(10, 10) == 1.0
    assert mean_relative_accuracy(9.3, 10) == pytest.approx(0.9)  # 7 % off: every θ but .95
    assert mean_relative_accuracy(16, 10) == 0.0
    for pred in (10.5, 11, 12.5, 14.9):
        assert mean_relative_accuracy(pred, 10) <= mean_relative_accuracy(pred, 10, inclusive=True)


def test_unknown_problem_type_names_it():
    with pytest.raises(ValueError, match="unknown problem_type 'essay'"):
        score_answer("x", "y", "essay")


def test_assistant_turns_of_a_multi_turn_completion():
    completion = multi_turn(TOOL, "<think>ok</think><answer>B</answer>")
    assert assistant_turns(completion) == [TOOL, "<think>ok</think><answer>B</answer>"]
    conversational = [{"role": "assistant", "content": TOOL}, {"role": "tool", "content": "x"},
                      {"role": "assistant", "content": "<think>ok</think><answer>B</answer>"}]
    assert assistant_turns(conversational) == assistant_turns(completion)


def test_format_reward_checks_every_turn():
    good = multi_turn(TOOL, "<think>ok</think><answer>B</answer>")
    bad_tool = multi_turn('<think>x</think><tool>{"region": []}</tool>', "<think>ok</think><answer>B</answer>")
    no_think = multi_turn(TOOL, "<answer>B</answer>")
    assert format_reward([good, bad_tool, no_think, "", "<think>a</think><answer>B"]) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_accuracy_reads_the_final_answer_only():
    early = multi_turn("<think>x</think><answer>B</answer>", "<think>y</think><answer>C</answer>")
    assert accuracy_reward([early], answer=["C"], problem_type=["multiple choice"]) == [1.0]
    # No <answer> at all: no credit (the reference's whole-text fallback would match "<" against a letter).
    assert accuracy_reward(["<think>B</think>"], answer=["B"], problem_type=["multiple choice"]) == [0.0]


def test_vilavt_reward_combination():
    right = multi_turn(TOOL, "<think>ok</think><answer>B</answer>")
    right_bad_format = multi_turn(TOOL, "<answer>B</answer>")
    wrong = multi_turn(TOOL, "<think>ok</think><answer>A</answer>")
    regression = "<think>t</think><answer>12.2</answer>"
    kwargs = dict(answer=["B", "B", "B", "10"], problem_type=["multiple choice"] * 3 + ["regression"])
    completions = [right, right_bad_format, wrong, regression]
    assert vilavt_reward(completions, **kwargs) == pytest.approx([1.0, 0.5, 0.0, 0.5 * 0.6 + 0.5])
    weighted = make_vilavt_reward(acc_weight=0.8, format_weight=0.2)
    assert weighted(completions, **kwargs) == pytest.approx([1.0, 0.8, 0.0, 0.8 * 0.6 + 0.2])
    assert weighted.__name__ == "vilavt_reward"

"""Rewards as TRL callables: format, accuracy per problem type, the paper's combination, and the completion text
our GRPO trainer passes (the authors' golden conversations are in test_authors_reward.py)."""

import pytest

from vilavt.rewards import (
    AUTHORS,
    accuracy_reward,
    assistant_turns,
    format_reward,
    make_vilavt_reward,
    mean_relative_accuracy,
    score_answer,
    turn_format_ok,
    vilavt_reward,
)
from vilavt.train.grpo import completion_text_reward

TOOL = '<think>look</think><tool>{"region": [{"index": 0, "bbox_2d": [0, 0, 9, 9]}], "query": "q"}</tool>'
TOOL_RESPONSE = "<|im_end|>\n<|im_start|>user\n<tool_response>...</tool_response><|im_end|>\n<|im_start|>assistant\n"


def multi_turn(*turns, closed=True):
    """A rollout's completion text: turns joined by tool responses; the last closed unless cut by the budget."""
    return TOOL_RESPONSE.join(turns) + ("<|im_end|>" if closed else "")


@pytest.mark.parametrize(
    "prediction, gold, kind, score",
    [
        ("B", "B", "multiple choice", 1.0),
        ("b) the red one", "B. red", "Multiple Choice", 1.0),  # first characters, case-insensitive
        ("(b)", "B", "multiple choice", 0.0),  # "(" is not "B"
        ("B.", "A", "multiple choice", 0.0),
        ("", "A", "multiple choice", 0.0),  # empty answer: no crash, no credit
        ("Yes, it is.", "yes", "judgment", 1.0),
        ("no", "Yes", "judgment", 0.0),
        ("yes or no", "yes", "judgment", 1.0),  # the authors' rule: both contain "yes"
        ("1,024", "1024", "numerical", 1.0),
        ("3.14", "3.15", "numerical", 1.0),  # numerical answers get MRA credit (0.3 % off)
        ("about seven", "7", "numerical", 0.0),
        ("10", "10", "regression", 1.0),
        ("12.2", "10", "regression", 0.6),  # 22 % off: within 1-θ for θ = .50 … .75
        ("30", "10", "regression", 0.0),
        ("x^2", "x^2", "math", 1.0),
        ("The Red  Square.", "red square", "free text", 1.0),
        ("The Red  Square.", "<answer>red square</answer>", "free-form", 1.0),  # the gold's tags are read too
    ],
)
def test_score_answer(prediction, gold, kind, score):
    assert score_answer(prediction, gold, kind) == pytest.approx(score)


def test_free_text_as_the_authors():
    assert score_answer("red square", "red square", "free text", free_text="zero") == 0.0


def test_mra():
    assert mean_relative_accuracy(10, 10) == 1.0
    assert mean_relative_accuracy(9.3, 10) == pytest.approx(0.9)  # 7 % off: every θ but .95
    assert mean_relative_accuracy(16, 10) == 0.0
    for pred in (10.5, 11, 12.5, 14.9):
        assert mean_relative_accuracy(pred, 10) <= mean_relative_accuracy(pred, 10, inclusive=True)
    # At the boundary, float32 decides: 50 % off is inside θ = .5 for 2.4 -> 3.6 but not for 10 -> 15.
    assert mean_relative_accuracy(3.6, 2.4) == pytest.approx(0.1)
    assert mean_relative_accuracy(15, 10) == 0.0
    assert mean_relative_accuracy(15, 10, inclusive=True) == pytest.approx(0.1)


def test_unknown_problem_type_names_it():
    with pytest.raises(ValueError, match="unknown problem_type 'essay'"):
        score_answer("x", "y", "essay")
    with pytest.raises(ValueError, match="unknown problem_type 'essay'"):
        vilavt_reward(["<think>a</think><answer>B</answer><|im_end|>"], answer=["B"], problem_type=["essay"])


def test_assistant_turns_of_a_multi_turn_completion():
    answer = "<think>ok</think><answer>B</answer>"
    assert assistant_turns(multi_turn(TOOL, answer)) == [TOOL, answer]
    # A last turn without its <|im_end|> is invisible, as in the authors' parse ...
    assert assistant_turns(multi_turn(TOOL, answer, closed=False)) == [TOOL]
    # ... unless the rollout's stop reason says the authors' rollout would have closed it.
    assert assistant_turns(multi_turn(TOOL, answer, closed=False), stop_reason="answer") == [TOOL, answer]
    assert assistant_turns(multi_turn(TOOL, answer, closed=False), stop_reason="max_new_tokens") == [TOOL]
    conversational = [{"role": "assistant", "content": TOOL}, {"role": "tool", "content": "x"},
                      {"role": "assistant", "content": answer}]
    assert assistant_turns(conversational) == [TOOL, answer]


def test_format_reward_checks_every_turn():
    good = multi_turn(TOOL, "<think>ok</think><answer>B</answer>")
    bad_tool = multi_turn('<think>x</think><tool>{"region": []}</tool>', "<think>ok</think><answer>B</answer>")
    no_think = multi_turn(TOOL, "<answer>B</answer>")
    unclosed_answer = multi_turn("<think>a</think><answer>B")
    assert format_reward([good, bad_tool, no_think, unclosed_answer]) == [1.0, 0.0, 0.0, 0.0]
    # No closed turn: nothing to judge (the authors' reward then scores accuracy 0, so the reward is 0).
    assert format_reward(["", "<think>a</think><answer>B"]) == [1.0, 1.0]


def call(index=0, box=(0, 0, 9, 9), query='"q"') -> str:
    payload = f'{{"region": [{{"index": {index}, "bbox_2d": {list(box)}}}], "query": {query}}}'
    return f"<think>a</think><tool>{payload}</tool>"


@pytest.mark.parametrize(
    "turn, authors, executable",
    [
        (TOOL, True, True),
        (call(index='"0"'), True, False),
        (call(box=("10", "20", "300", "40")).replace("'", '"'), True, True),  # strings: as text / as numbers
        (call(box=("9", "0", "10", "5")).replace("'", '"'), False, False),  # "9" > "10" as text
        (call(box=(1, "2", 3, 4)).replace("'", '"'), False, False),  # a number against a string
        (call(query='" "'), False, False),
        ("<think>a<think>b</think></think><answer>C</answer>", True, True),  # nesting is allowed
        ("<think>a</think></think><think><answer>C</answer>", False, False),
        ("<think>a</think><tool>{bad}</tool><answer>C</answer>", False, False),  # <tool> wins over <answer>
        (call() + "<answer>C", True, True),  # an unclosed <answer> after a valid call goes unnoticed
        ("<think>a</think><answer></answer>", True, True),
        ("<think>a</think>just text", True, True),
    ],
)
def test_turn_format(turn, authors, executable):
    assert turn_format_ok(turn, tool_format="authors") is authors
    assert turn_format_ok(turn) is executable


def test_accuracy_reads_the_last_turn():
    early = multi_turn("<think>x</think><answer>B</answer>", "<think>y</think><answer>C</answer>")
    assert accuracy_reward([early], answer=["C"], problem_type=["multiple choice"]) == [1.0]
    # No <answer>: no credit by default; the authors score the whole text ("B" alone matches gold B).
    bare = multi_turn("B")
    assert accuracy_reward([bare], answer=["B"], problem_type=["multiple choice"]) == [0.0]
    assert accuracy_reward([bare], answer=["B"], problem_type=["multiple choice"], answer_tag="optional") == [1.0]
    # Ending on a tool response (the last answer cut by the budget): the tool response is scored -> 0.
    cut = multi_turn("<think>x</think><answer>B</answer>", TOOL, closed=False)
    assert accuracy_reward([cut], answer=["B"], problem_type=["multiple choice"]) == [0.0]


def test_vilavt_reward_combination():
    right = multi_turn(TOOL, "<think>ok</think><answer>B</answer>")
    right_bad_format = multi_turn(TOOL, "<answer>B</answer>")
    wrong = multi_turn(TOOL, "<think>ok</think><answer>A</answer>")
    regression = multi_turn("<think>t</think><answer>12.2</answer>")
    kwargs = dict(answer=["B", "B", "B", "10"], problem_type=["multiple choice"] * 3 + ["regression"])
    completions = [right, right_bad_format, wrong, regression]
    assert vilavt_reward(completions, **kwargs) == pytest.approx([1.0, 0.5, 0.0, 0.5 * 0.6 + 0.5])
    weighted = make_vilavt_reward(acc_weight=0.8, format_weight=0.2)
    assert weighted(completions, **kwargs) == pytest.approx([1.0, 0.8, 0.0, 0.8 * 0.6 + 0.2])
    assert weighted.__name__ == "vilavt_reward"
    with pytest.raises(ValueError, match="tool_format must be one of"):
        make_vilavt_reward(tool_format="lenient")


def test_the_trainer_call_scores_the_rollout_text():
    """What GRPOTrainer passes: TRL's decoded completions (markers stripped), the rollout's `completion_text`
    and `stop_reason`, dataset columns and TRL's own keywords."""
    reward = completion_text_reward(make_vilavt_reward(**AUTHORS))
    texts = [multi_turn(TOOL, "<think>ok</think><answer>B</answer>", closed=False)] * 3
    got = reward(
        prompts=["q"] * 3, completions=["stripped"] * 3, completion_ids=[[1]] * 3, completion_text=texts,
        stop_reason=["answer", "max_new_tokens", "max_turn_tokens"], answer=["B"] * 3,
        problem_type=["multiple choice"] * 3, image_paths=[["a.png"]] * 3, trainer_state=None,
        log_extra=None, log_metric=None,
    )  # fmt: skip
    # Closed by the authors' template unless the total budget cut it (then the tool response is the last turn).
    assert got == [1.0, 0.0, 1.0]

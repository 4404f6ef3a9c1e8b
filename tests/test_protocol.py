"""Parsing steps and tool calls, answers, and the format rule of the reward."""

import pytest

from vilavt.remote_code.protocol_vilavt import (
    ToolCallError,
    extract_answer,
    format_ok,
    parse_step,
    parse_tool_call,
)


def test_parse_a_tool_step():
    step = parse_step('<think>look closer</think><tool> {"region": [{"index": 1, "bbox_2d": [1, 2, 30.5, 40]}], "query": " sign "} </tool>')
    assert step.thought == "look closer" and step.error is None and step.answer is None
    assert step.tool_call.query == "sign"
    assert (step.tool_call.regions[0].index, step.tool_call.regions[0].bbox) == (1, (1, 2, 30.5, 40))


def test_tool_wins_over_answer():
    step = parse_step('<think>x</think><tool>{"region": [{"index": 0, "bbox_2d": [0, 0, 1, 1]}], "query": "q"}</tool><answer>A</answer>')
    assert step.tool_call is not None and step.answer is None


@pytest.mark.parametrize(
    "payload, message",
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"region": [], "query": "q"}', '"region" must be a non-empty list'),
        ('{"region": [3], "query": "q"}', "region 0 must be an object"),
        ('{"region": [{"index": "a", "bbox_2d": [0, 0, 1, 1]}], "query": "q"}', '"index" must be an integer, got "a"'),
        ('{"region": [{"index": 1.5, "bbox_2d": [0, 0, 1, 1]}], "query": "q"}', '"index" must be an integer'),
        ('{"region": [{"index": true, "bbox_2d": [0, 0, 1, 1]}], "query": "q"}', '"index" must be an integer'),
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, 1]}], "query": "q"}', "must be a list of 4 numbers"),
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, "1", 1]}], "query": "q"}', "must be a list of 4 numbers"),
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, 1, 1]}], "query": 3}', '"query" must be a non-empty string'),
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, 1, 1]}]', "not valid JSON (Expecting ',' delimiter at line 1"),
    ],
)
def test_tool_call_validation(payload, message):
    with pytest.raises(ToolCallError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_tool_call(payload)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<think>x</think><answer> B </answer>", "B"),
        ("<answer>\\boxed{42}</answer>", "42"),
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("<answer></answer>", ""),
        ("no tags here", None),
        ("<answer>unclosed", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "turn, ok",
    [
        ("<think>a</think><answer>B</answer>", True),
        ('<think>a</think><tool>{"region": [{"index": 0, "bbox_2d": [0, 0, 5, 5]}], "query": "q"}</tool>', True),
        ("<think>a</think>plain text", True),
        ("<answer>B</answer>", False),  # no thinking
        ("<think>a<think>b</think></think><answer>B</answer>", False),  # nested
        ("<think>a</think></think><answer>B</answer>", False),  # unbalanced
        ("</think>a<think><answer>B</answer>", False),  # closed before opened
        ('<think>a</think><tool>{"region": [{"index": 0, "bbox_2d": [5, 0, 5, 5]}], "query": "q"}</tool>', False),
        ("<think>a</think><tool>{}</tool>", False),
        ("<think>a</think><answer>B", False),
    ],
)
def test_format_rule(turn, ok):
    assert format_ok(turn) is ok

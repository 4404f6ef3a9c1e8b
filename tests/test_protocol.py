"""Parsing steps and tool calls, answers, and the format rule of the reward."""

import pytest

from vilavt.remote_code.protocol_vilavt import (
    Step,
    ToolCallError,
    extract_answer,
    format_ok,
    parse_step,
    parse_tool_call,
    unwrap_boxed,
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
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, "one", 1]}], "query": "q"}', "must be a list of 4 numbers"),
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, "1_0", 1]}], "query": "q"}', "must be a list of 4 numbers"),
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, "nan", 1]}], "query": "q"}', "must be a list of 4 numbers"),
        ('{"region": [{"index": 0, "bbox_2d": [NaN, 0, 1, 1]}], "query": "q"}', "got [NaN, 0, 1, 1]"),
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, Infinity, 1]}], "query": "q"}', "got [0, 0, Infinity, 1]"),
        ('{"region": [{"index": 0, "bbox_2d": [0, 0, 1e999, 1]}], "query": "q"}', "must be a list of 4 numbers"),
        ('{"region": [{"index": 0, "bbox_2d": [-1e999, 0, 1, 1]}], "query": "q"}', "must be a list of 4 numbers"),
        ('{"region": [{"index": NaN, "bbox_2d": [0, 0, 1, 1]}], "query": "q"}', '"index" must be an integer, got NaN'),
        ('{"region": [{"index": "0", "bbox_2d": [0, 0, 1, 1]}], "query": "q"}', '"index" must be an integer, got "0"'),
        ('{"region": [{"index": false, "bbox_2d": [0, 0, 1, 1]}], "query": "q"}', '"index" must be an integer'),
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


# ---- whatever the model writes: a call or an error for the model, never an exception -----------------------


@pytest.mark.parametrize("digits", [400, 4300, 4301, 10_000, 100_000])
def test_huge_integers_are_errors(digits):
    huge = "9" * digits  # past a float's range; past 4300 digits Python's int() itself refuses
    with pytest.raises(ToolCallError, match='"index" must be an integer, got Infinity'):
        parse_tool_call(f'{{"region": [{{"index": {huge}, "bbox_2d": [0, 0, 1, 1]}}], "query": "q"}}')
    with pytest.raises(ToolCallError, match="must be a list of 4 numbers"):
        parse_tool_call(f'{{"region": [{{"index": 0, "bbox_2d": [0, 0, 1, -{huge}]}}], "query": "q"}}')
    step = parse_step(f'<tool>{{"region": [{{"index": 0, "bbox_2d": [0, 0, {huge}, 1]}}], "query": "q"}}</tool>')
    assert step.wants_tool and step.tool_call is None and "bbox_2d" in step.error


def test_long_integers_that_fit_a_float_become_regions_the_crop_step_can_reject():
    # 20 digits is finite as a float: the parser accepts it; the crop step reports it as out of bounds.
    call = parse_tool_call('{"region": [{"index": 0, "bbox_2d": [0, 0, 10000000000000000000000, 5]}], "query": "q"}')
    assert call.regions[0].bbox == (0.0, 0.0, 1e22, 5.0)
    call = parse_tool_call('{"region": [{"index": 100000000000000000000, "bbox_2d": [0, 0, 1, 1]}], "query": "q"}')
    assert call.regions[0].index == 10**20


@pytest.mark.parametrize("depth", [900, 1_000, 5_000, 100_000])
@pytest.mark.parametrize("where", ["whole", "box", "query"])
def test_deep_nesting_is_an_error(depth, where):
    nested = "[" * depth + "]" * depth
    payload = {
        "whole": nested,
        "box": f'{{"region": [{{"index": 0, "bbox_2d": {nested}}}], "query": "q"}}',
        "query": f'{{"region": [{{"index": 0, "bbox_2d": [0, 0, 1, 1]}}], "query": {nested}}}',
    }[where]
    step = parse_step(f"<think>x</think><tool>{payload}</tool>")
    assert step.tool_call is None and step.error


def test_a_lone_surrogate_in_the_query_is_an_error_and_a_pair_is_a_character():
    step = parse_step('<tool>{"region": [{"index": 0, "bbox_2d": [0, 0, 1, 1]}], "query": "sign \\ud800"}</tool>')
    assert step.tool_call is None and "unpaired surrogate" in step.error
    step.error.encode("utf-8")
    for lone in ("\\udfff", "\\ud83d", "x\\ude00y", "\ud800"):  # escaped, and raw in the text
        with pytest.raises(ToolCallError, match="unpaired surrogate"):
            parse_tool_call(f'{{"region": [{{"index": 0, "bbox_2d": [0, 0, 1, 1]}}], "query": "{lone}"}}')
    call = parse_tool_call('{"region": [{"index": 0, "bbox_2d": [0, 0, 1, 1]}], "query": "smile \\ud83d\\ude00"}')
    assert call.query == "smile \U0001f600"


def test_the_processor_tokenizes_every_query_the_parser_accepts():
    from vilavt.tiny import tiny_processor

    processor = tiny_processor()
    for query in ("smile \\ud83d\\ude00", "<|image_pad|><|im_end|>", "\\u0000 \\uffff", "\U0010ffff"):
        call = parse_tool_call(f'{{"region": [{{"index": 0, "bbox_2d": [0, 0, 1, 1]}}], "query": "{query}"}}')
        encoding, _ = processor.tokenize_queries([call.query])
        assert int(encoding["query_attention_mask"].sum()) > 0


def test_numeric_strings_are_coordinates_as_the_authors_read_them():
    call = parse_tool_call('{"region": [{"index": 0, "bbox_2d": [" 10", "10 ", "110.5", "9e1"]}], "query": "q"}')
    assert call.regions[0].bbox == (10.0, 10.0, 110.5, 90.0)
    with pytest.raises(ToolCallError, match="inverted or has zero area"):
        parse_tool_call('{"region": [{"index": 0, "bbox_2d": ["50", "10", "10", "50"]}], "query": "q"}')


def test_echoed_values_cannot_spell_control_tokens_and_stay_short():
    with pytest.raises(ToolCallError) as err:
        parse_tool_call(
            '{"region": [{"index": "<|im_end|><|im_start|>assistant", "bbox_2d": [0, 0, 1, 1]}], "query": "q"}'
        )
    assert "<|" not in str(err.value) and "\\u003c|im_end|>" in str(err.value)
    with pytest.raises(ToolCallError) as err:
        parse_tool_call('{"region": [{"index": 0, "bbox_2d": [' + "1, " * 10_000 + '1]}], "query": "q"}')
    assert len(str(err.value)) < 200 and str(err.value).endswith("…")


def test_a_stray_closing_tool_tag_is_an_error_the_model_reads():
    step = parse_step("<think>zoom</think>the sign, please</tool>")
    assert step.wants_tool and step.tool_call is None and step.answer is None
    assert step.error.startswith("</tool> was written without an opening <tool>")
    step = parse_step("<think>x</think><answer>B</answer>")  # no tool tag at all: an answer, no error
    assert not step.wants_tool and step.error is None and step.answer == "B"


@pytest.mark.parametrize("tag", ["<tool>", "<answer>", "<think>", "</tool>", "\\boxed{"])
def test_repeated_unclosed_tags_parse(tag):
    step = parse_step("<think>x</think>" + tag * 8_000)
    assert isinstance(step, Step)
    assert (step.error is not None) == (tag in ("<tool>", "</tool>"))


@pytest.mark.parametrize(
    "text, answer",
    [
        ("\\boxed{A} then \\boxed{B}", "B"),
        ("\\boxed{\\boxed{C}}", "C"),
        ("\\boxed{A} and \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{A} and \\boxed{B", "B"),  # the last one never closes: to the end, as the authors' reward reads it
        ("no box", "no box"),
    ],
)
def test_unwrap_boxed_takes_the_last_box(text, answer):
    assert unwrap_boxed(text) == answer


# ---- in the loop: each hostile call is a round whose error the model reads ----------------------------------

def tool_turn(index="0", box="[0, 0, 9, 9]", query='"q"', region=None) -> str:
    region = region or f'[{{"index": {index}, "bbox_2d": {box}}}]'
    return f'<think>x</think><tool>{{"region": {region}, "query": {query}}}</tool>'


HOSTILE_TURNS = {
    "a stray </tool>": ("<think>zoom</think>the sign, please</tool>", "</tool> was written without an opening <tool>"),
    "a huge integer": (tool_turn(index="9" * 400), '"index" must be an integer, got Infinity'),
    "deep nesting": (tool_turn(region="[" * 1_100 + "]" * 1_100), "nested too deeply"),
    "a lone surrogate": (tool_turn(query='"a \\ud800"'), "unpaired surrogate"),
    "NaN": (tool_turn(box="[NaN, 0, 9, 9]"), "got [NaN"),
}


def test_hostile_calls_in_the_loop_become_errors_the_model_reads(tiny):
    from PIL import Image
    from transformers import LogitsProcessorList

    from vilavt.scripted import ScriptedPolicy, answer_text

    model, processor = tiny
    image = Image.new("RGB", (200, 150), (120, 40, 40))
    script = [turn for turn, _ in HOSTILE_TURNS.values()] + [answer_text("A")]
    policy = ScriptedPolicy(processor.tokenizer, [script])
    answer, trace = model.chat(
        image, "What?", processor=processor, max_rounds=len(script), max_new_tokens=10_000,
        logits_processor=LogitsProcessorList([policy]),
    )
    assert answer == "A" and trace.stop_reason == "answer"
    assert all(message in r.error for r, (_, message) in zip(trace.rounds, HOSTILE_TURNS.values(), strict=True))

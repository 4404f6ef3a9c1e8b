"""Fuzzing the protocol parser: whatever a model writes, a turn parses to a Step (its tool call, or an error the
model reads), never to an exception, and in time linear in its length."""

import functools
import gc
import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vilavt.remote_code.protocol_vilavt import (
    Step,
    ToolCall,
    ToolCallError,
    extract_answer,
    format_ok,
    parse_step,
    parse_tool_call,
    unwrap_boxed,
)

TAGS = ["<think>", "</think>", "<tool>", "</tool>", "<answer>", "</answer>", "\\boxed{", "{", "}", "[", "]", '"']
SPECIAL_TOKENS = [
    "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_end|>", "<|im_start|>assistant\n",
    "<|endoftext|>", "<|box_start|>", "<tool_response>", "</tool_response>",
]  # fmt: skip
NUMBER_LITERALS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "0.0", "1E+308",
                   '"nan"', '"inf"', '"-Infinity"', '" 10 "', '"1_0"', '"\u0663"', "true", "null"]  # fmt: skip

# Any code points, and random UTF-16 code units: lone surrogates (1 unit in 32), pairs, the whole BMP.
any_unicode = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=16),
    st.binary(max_size=32).map(lambda b: b[: len(b) // 2 * 2].decode("utf-16-le", "surrogatepass")),
)
huge_int = st.integers(16, 6000).map(lambda n: "9" * n)
huge_literal = st.one_of(
    huge_int,
    huge_int.map(lambda d: "-" + d),
    st.tuples(huge_int, st.integers(0, 50)).map(lambda t: f"{t[0]}.{'5' * t[1]}e{len(t[0])}"),
    st.integers(300, 100_000).map(lambda e: f"1e{e}"),
    st.integers(300, 100_000).map(lambda e: f"1e-{e}"),
)
number_literal = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(NUMBER_LITERALS),
    huge_literal,
)


NESTING = {"[": "]", '{"a": ': "}", '{"region": ': "}", '{"region": [{"index": ': "}]}"}
deep_nesting = st.tuples(st.integers(500, 5000), st.sampled_from(sorted(NESTING)), st.booleans()).map(
    lambda t: t[1] * t[0] + "0" + (NESTING[t[1]] * t[0] if t[2] else "")
)


def json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


query_text = st.one_of(
    st.text(max_size=12).map(json_string),
    any_unicode.map(json_string),  # raw surrogates inside the JSON string
    st.sampled_from(SPECIAL_TOKENS).map(json_string),
    st.lists(st.sampled_from(["a", " ", "\\ud83d\\ude00", "\\n", "\\ud800", "\\udfff", "\\udc00x"]), max_size=6).map(
        lambda parts: '"' + "".join(parts) + '"'  # JSON escapes, lone surrogates among them
    ),
)
hostile = st.one_of(number_literal, query_text, deep_nesting, st.sampled_from(["[]", "{}", "[0, 0, 1, 1]", '""']))


def region_from(seed: int) -> tuple[str, list[str]]:
    """A valid region from one number (one draw instead of five keeps 10,000 examples fast)."""
    index, x, y, w, h = (
        seed % 4,
        seed // 4 % 100,
        seed // 400 % 100,
        seed // 40_000 % 99 + 1,
        seed // 4_000_000 % 99 + 1,
    )
    return str(index), [str(x), str(y), str(x + w), str(y + h)]


clean_region = st.integers(0, 4 * 10**8).map(region_from)


HOSTILE_VALUES = st.sampled_from([0, 0, 0, 1, 1, 2, 3])
REGION_COUNT = st.sampled_from([1, 1, 1, 2, 3, 0])
CLEAN_QUERY = st.sampled_from(
    ["what is written here?", "the red frame", "Wie spät ist es?", "標識の文字", "a\\u00e9"]
).map(lambda q: f'"{q}"')


@st.composite
def tool_payload(draw) -> str:
    """A tool call as a model might write it: valid, or valid with up to three hostile values spliced in."""
    regions = [draw(clean_region) for _ in range(draw(REGION_COUNT))]
    query = draw(st.one_of(CLEAN_QUERY, query_text))
    slots = 1 + 5 * len(regions)  # the query, then each region's index and 4 coordinates
    for _ in range(draw(HOSTILE_VALUES)):
        slot, value = draw(st.integers(0, slots - 1)), draw(hostile)
        if slot == 0:
            query = value
        else:
            region, position = divmod(slot - 1, 5)
            if position == 0:
                regions[region] = (value, regions[region][1])
            else:
                regions[region][1][position - 1] = value
    if regions and draw(st.integers(0, 9)) == 0:  # a box of 3 or 5 numbers
        box = regions[0][1]
        box[:] = box[:3] if draw(st.booleans()) else [*box, "7"]
    parts = [f'{{"index": {index}, "bbox_2d": [{", ".join(box)}]}}' for index, box in regions]
    return f'{{"region": [{", ".join(parts)}], "query": {query}}}'


EDIT_CHARACTERS = st.sampled_from(TAGS + SPECIAL_TOKENS + ["'", ",", ":", "\\"])


@st.composite
def near_valid(draw) -> str:
    """A call with one edit: a character dropped, doubled or replaced, or the text cut short."""
    payload = draw(tool_payload())
    at = draw(st.integers(0, len(payload)))
    edit = draw(st.integers(0, 3))
    if edit == 0:
        return payload[:at] + payload[at + 1 :]
    if edit == 1:
        return payload[:at] + payload[at : at + 1] * 2 + payload[at + 1 :]
    if edit == 2:
        return payload[:at] + draw(EDIT_CHARACTERS) + payload[at + 1 :]
    return payload[:at]


repeated_tags = st.tuples(st.sampled_from(TAGS), st.integers(1, 3000)).map(lambda t: t[0] * t[1])
fragment = st.one_of(
    st.sampled_from(TAGS),
    st.sampled_from(SPECIAL_TOKENS),
    any_unicode,
    tool_payload(),
    near_valid(),
    huge_literal,
    deep_nesting,
    repeated_tags,
    st.sampled_from(["A", "Yes", "3.5", "\\boxed{B}", "\\boxed{\\frac{1}{2}", " ", "\n"]),
)
thought = st.one_of(st.sampled_from(["", "look closer", "the sign is small"]), any_unicode)
body = st.one_of(tool_payload(), near_valid(), st.lists(fragment, max_size=3).map("".join))
opening = st.sampled_from(["<tool>", "<tool>", "<answer>", "", "<think>"])
closing = st.sampled_from(["</tool>", "</tool>", "", "</answer>", "<|im_end|>"])
free_form = st.lists(fragment, max_size=4).map("".join)


@st.composite
def turn(draw) -> str:
    """A whole turn: a tool call (valid or with hostile values), the protocol's shape around other parts,
    or free-form fragments."""
    shape = draw(st.integers(0, 4))
    if shape <= 1:
        return f"<think>{draw(thought)}</think><tool>{draw(tool_payload())}</tool>"
    if shape <= 3:
        return f"<think>{draw(thought)}</think>{draw(opening)}{draw(body)}{draw(closing)}"
    return draw(free_form)


@functools.cache
def query_processor():
    from vilavt.tiny import tiny_processor

    return tiny_processor()


def query_tokenizes(query: str) -> None:
    """An accepted query goes through the processor's query tokenizer (what crashed on surrogates)."""
    encoding, _ = query_processor().tokenize_queries([query])
    assert encoding["query_ids"].shape[0] == 1


def check_turn(text: str) -> Step:
    step = parse_step(text, max_regions=4)
    assert isinstance(step, Step) and step.text is text
    if step.wants_tool:  # a tool call or an error, never both or neither
        assert (step.tool_call is None) != (step.error is None), step
        assert step.answer is None
    else:
        assert step.tool_call is None and step.error is None
    if step.error is not None:
        assert isinstance(step.error, str) and step.error and "\n" not in step.error
        step.error.encode("utf-8")  # the message is tokenised into the tool response
        assert "<|" not in step.error, step.error  # echoed values cannot spell a control token
        assert len(step.error) < 400
    if step.tool_call is not None:
        check_call(step.tool_call)
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    assert isinstance(unwrap_boxed(text), str)
    assert isinstance(format_ok(text), bool)
    return step


def check_call(call: ToolCall) -> None:
    assert call.regions and call.query == call.query.strip() and call.query
    call.query.encode("utf-8")
    for region in call.regions:
        assert type(region.index) is int
        x1, y1, x2, y2 = region.bbox
        assert all(type(v) in (int, float) and math.isfinite(v) for v in region.bbox) and x1 < x2 and y1 < y2
    query_tokenizes(call.query)


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same turns on every run: CI stays reproducible
        database=None,
        suppress_health_check=list(HealthCheck),
    )


TURNS_PER_EXAMPLE = 4  # a few turns per example: Hypothesis' per-example overhead dominates the parsing


def test_ten_thousand_generated_turns_parse_to_a_step_or_an_error():
    counts = {"turns": 0, "calls": 0, "errors": 0}

    @fuzz(2_650)
    @given(st.lists(turn(), min_size=TURNS_PER_EXAMPLE, max_size=TURNS_PER_EXAMPLE))
    def run(texts):
        for text in texts:
            counts["turns"] += 1
            step = check_turn(text)
            counts["calls"] += step.tool_call is not None
            counts["errors"] += step.error is not None

    run()
    assert counts["turns"] >= 10_000
    # The generator reaches both outcomes often, not just the error path.
    assert counts["calls"] >= 200 and counts["errors"] >= 2_000, counts


def test_payloads_give_a_tool_call_or_a_tool_call_error():
    outcomes = {"call": 0, "error": 0}

    @fuzz(2_000)
    @given(st.one_of(tool_payload(), near_valid(), deep_nesting, huge_literal, any_unicode))
    def run(payload):
        try:
            call = parse_tool_call(payload, max_regions=4)
        except ToolCallError as err:
            outcomes["error"] += 1
            assert "<|" not in str(err)
        else:
            outcomes["call"] += 1
            check_call(call)

    run()
    assert outcomes["call"] >= 50 and outcomes["error"] >= 500, outcomes


# ---- linear time ------------------------------------------------------------------------------------------


def parse_everything(text: str) -> None:
    parse_step(text)
    extract_answer(text)
    format_ok(text)
    unwrap_boxed(text)


def call_text(index: str, box: str, regions: int = 1) -> str:
    region = f'{{"index": {index}, "bbox_2d": {box}}}'
    return f'<tool>{{"region": [{", ".join([region] * regions)}], "query": "q"}}</tool>'


FAMILIES = {
    **{f"repeated {tag}": (lambda n, tag=tag: tag * n) for tag in TAGS + ["<tool><answer>", "<think><tool>"]},
    "unclosed call of nested braces": lambda n: "<think>a</think><tool>" + '{"region": [' * n,
    "deep nesting in a closed call": lambda n: "<think>a</think><tool>" + "[" * n + "]" * n + "</tool>",
    "a huge integer": lambda n: call_text("7" * n, "[0, 0, 1, 1]"),
    "a huge coordinate": lambda n: call_text("0", "[0, 0, 1." + "3" * n + "1, 1]"),
    "many regions": lambda n: call_text("0", "[0, 0, 1, 1]", regions=n // 8),
    "boxed inside boxed": lambda n: "<answer>" + "\\boxed{" * n + "}" * n + "</answer>",
    "answers without an end": lambda n: "<answer>\\boxed{A " * n,
}  # fmt: skip


def fastest(text: str, repeats: int = 9) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        parse_everything(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("family", FAMILIES)
def test_parsing_time_grows_linearly(family):
    """8x the repetitions cost about 8x the time; the quadratic parser took 64x (1.5 s at 8,000 tags).
    Best of a few tries, garbage collection off: the machine is shared and a pause is not the parser's."""
    make = FAMILIES[family]
    small, large = make(2_000), make(16_000)
    assert len(large) >= 7 * len(small)
    fastest(small)  # warm-up
    ratios = []
    gc.disable()
    try:
        for _ in range(3):
            ratios.append(fastest(large) / max(fastest(small), 1e-6))
            if ratios[-1] < 24:
                break
    finally:
        gc.enable()
    assert min(ratios) < 24, f"{family}: 16k vs 2k repetitions took {min(ratios):.1f}x the time"

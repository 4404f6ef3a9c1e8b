"""The ViLaVT interaction protocol (REFERENCE.md §2.1-2.5, §4.4): what a step looks like, how a tool call
is validated, how tool responses are phrased and how the answer is read.

A step:   <think>…</think><tool>{"region": [{"index": i, "bbox_2d": [x1, y1, x2, y2]}, …], "query": "…"}</tool>
the end:  <think>…</think><answer>…</answer>

Prompt text is checkpoint data (prompts_vilavt.py); so are the tool messages the processor renders.
"""

import json
import math
import re
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool>", "</tool>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Numbers in a tool call: JSON's grammar (ASCII digits only), also accepted inside strings ("10", " 110.5").
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_EXACT_INT_DIGITS = 15  # longer integer literals are read as floats: no 4300-digit limit, no int -> float overflow
_SHOWN_CHARS = 80  # how much of a bad value an error message echoes


class ToolCallError(ValueError):
    """A tool call the model wrote cannot be executed; the message is fed back to the model."""


@dataclass
class Region:
    index: int
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in displayed pixels of image `index`


@dataclass
class ToolCall:
    regions: list[Region]
    query: str


@dataclass
class Step:
    """One assistant turn, parsed."""

    text: str
    thought: str | None = None
    tool_call: ToolCall | None = None
    answer: str | None = None
    error: str | None = None  # why the turn's tool call (a <tool> block, or a stray </tool>) could not be used
    notes: list[str] = field(default_factory=list)

    @property
    def wants_tool(self) -> bool:
        """The turn tried to call the tool (the loop stops at `</tool>` too, so a stray one counts)."""
        return TOOL_OPEN in self.text or TOOL_CLOSE in self.text


def _block(text: str, open_tag: str, close_tag: str) -> str | None:
    """The content of the first `open_tag`…`close_tag`, or None. Two `str.find`s: linear, where a lazy
    regex rescans the rest of the text from every unclosed opening tag (quadratic)."""
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    return None if end < 0 else text[start:end]


def _show(value) -> str:
    """A bad value as the error message quotes it: JSON, cut short, with `<` escaped so that a spelled-out
    control token (`<|im_end|>`) in the model's text never reaches the tokenizer whole."""
    try:
        shown = json.dumps(value)
    except (ValueError, RecursionError):
        shown = type(value).__name__
    if len(shown) > _SHOWN_CHARS:
        shown = shown[: _SHOWN_CHARS - 1] + "…"
    return shown.replace("<", "\\u003c")


def _parse_int(literal: str):
    # Exact ints up to 15 digits; longer ones become floats (inf past 1e308), rejected later as out of range.
    return int(literal) if len(literal) <= _EXACT_INT_DIGITS else float(literal)


def _coordinate(value) -> int | float | None:
    """A finite coordinate from a JSON number (kept as written: int or float) or a numeric string (as the
    authors' `float()` reads it), else None."""
    if isinstance(value, str) and len(value) <= _SHOWN_CHARS and _NUMBER_RE.fullmatch(value.strip()):
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return value if math.isfinite(value) else None


def parse_tool_call(payload: str, max_regions: int | None = None) -> ToolCall:
    """Validate the JSON inside <tool>…</tool>; raises ToolCallError with a message for the model.

    Never raises anything else, whatever the payload: huge or non-finite numbers, deep nesting and
    unpaired surrogates are errors like any other, and the time is linear in the payload's length."""
    try:
        call = json.loads(payload.strip(), parse_int=_parse_int)
    except json.JSONDecodeError as err:
        raise ToolCallError(
            f"the tool call is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except RecursionError:
        raise ToolCallError("the tool call is nested too deeply to be read") from None
    if not isinstance(call, dict):
        raise ToolCallError('the tool call must be a JSON object with keys "region" and "query"')
    for key in ("region", "query"):
        if key not in call:
            raise ToolCallError(f'the tool call is missing the key "{key}"')
    regions = call["region"]
    if not isinstance(regions, list) or not regions:
        raise ToolCallError('"region" must be a non-empty list of {"index": int, "bbox_2d": [x1, y1, x2, y2]}')
    if max_regions is not None and len(regions) > max_regions:
        raise ToolCallError(f"too many regions: {len(regions)} (at most {max_regions} per call)")
    parsed = []
    for i, region in enumerate(regions):
        where = f"region {i}"
        if not isinstance(region, dict):
            raise ToolCallError(f'{where} must be an object with "index" and "bbox_2d"')
        for key in ("index", "bbox_2d"):
            if key not in region:
                raise ToolCallError(f'{where} is missing the key "{key}"')
        index, box = region["index"], region["bbox_2d"]
        if (
            not isinstance(index, (int, float))
            or isinstance(index, bool)
            or not math.isfinite(index)
            or int(index) != index
        ):
            raise ToolCallError(f'{where}: "index" must be an integer, got {_show(index)}')
        coordinates = [_coordinate(v) for v in box] if isinstance(box, list) and len(box) == 4 else None
        if coordinates is None or None in coordinates:
            raise ToolCallError(f'{where}: "bbox_2d" must be a list of 4 numbers [x1, y1, x2, y2], got {_show(box)}')
        x1, y1, x2, y2 = coordinates
        if not (x1 < x2 and y1 < y2):
            raise ToolCallError(
                f"{where}: bbox_2d {_show(box)} is inverted or has zero area (need x1 < x2 and y1 < y2)"
            )
        parsed.append(Region(int(index), (x1, y1, x2, y2)))
    query = call["query"]
    if not isinstance(query, str) or not query.strip():
        raise ToolCallError('"query" must be a non-empty string')
    if _SURROGATE_RE.search(query):  # "\ud800" alone decodes to a str no tokenizer can encode
        raise ToolCallError(
            '"query" holds an unpaired surrogate escape (\\ud800 to \\udfff): write the character itself'
        )
    return ToolCall(parsed, query.strip())


def parse_step(text: str, max_regions: int | None = None) -> Step:
    """Read a turn: a tool call (the first <tool>…</tool>; its errors are kept, not raised), else an answer.

    A `</tool>` with no `<tool>` before it is a failed call (the loop stops there as at any call): the
    Step's `error` says what was wrong. Never raises; linear in the length of `text`."""
    thought = _block(text, THINK_OPEN, THINK_CLOSE)
    step = Step(text=text, thought=thought.strip() if thought is not None else None)
    opened = text.find(TOOL_OPEN)
    if opened >= 0:
        payload = _block(text[opened:], TOOL_OPEN, TOOL_CLOSE)
        if payload is None:
            step.error = "the <tool> block is not closed with </tool>"
        else:
            try:
                step.tool_call = parse_tool_call(payload, max_regions)
            except ToolCallError as err:
                step.error = str(err)
        return step
    if TOOL_CLOSE in text:
        step.error = (
            "</tool> was written without an opening <tool>; a tool call is "
            '<tool>{"region": [{"index": i, "bbox_2d": [x1, y1, x2, y2]}], "query": "..."}</tool>'
        )
        return step
    step.answer = extract_answer(text)
    return step


def unwrap_boxed(text: str) -> str:
    r"""The content of the last `\boxed{…}` (braces balanced, or to the end if it never closes), or `text`
    unchanged — the authors' reward and evaluator read the last one. Linear time."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return text
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return text[begin:]


def extract_answer(text: str) -> str | None:
    r"""The content of the first <answer>…</answer>, stripped and `\boxed{}`-unwrapped; None without one."""
    answer = _block(text, ANSWER_OPEN, ANSWER_CLOSE)
    return unwrap_boxed(answer.strip()).strip() if answer is not None else None


def format_ok(turn: str) -> bool:
    """The format rule of the reward (REFERENCE.md §4.4) for one assistant turn: balanced, nested
    <think> tags; a valid first tool call if <tool> appears; a closed <answer> if <answer> appears."""
    opens, closes = turn.count(THINK_OPEN), turn.count(THINK_CLOSE)
    if opens == 0 or opens != closes:
        return False
    depth = 0
    for tag in re.findall(r"</?think>", turn):
        depth += 1 if tag == THINK_OPEN else -1
        if depth not in (0, 1):
            return False
    if TOOL_OPEN in turn:
        payload = _block(turn, TOOL_OPEN, TOOL_CLOSE)
        if payload is None:
            return False
        try:
            parse_tool_call(payload)
        except ToolCallError:
            return False
    if ANSWER_OPEN in turn and _block(turn, ANSWER_OPEN, ANSWER_CLOSE) is None:
        return False
    return True


# ---- assistant turns ----------------------------------------------------------------------------------


def render_tool_call(regions, query: str, thought: str) -> str:
    """An assistant turn calling the tool; `regions` = [(image index, [x1, y1, x2, y2]), …]."""
    payload = {"region": [{"index": int(i), "bbox_2d": list(box)} for i, box in regions], "query": query}
    return f"{THINK_OPEN}{thought}{THINK_CLOSE}{TOOL_OPEN}{json.dumps(payload)}{TOOL_CLOSE}"


def render_answer(answer: str, thought: str) -> str:
    return f"{THINK_OPEN}{thought}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


__all__ = [
    "Region",
    "ToolCall",
    "Step",
    "ToolCallError",
    "parse_tool_call",
    "parse_step",
    "extract_answer",
    "unwrap_boxed",
    "format_ok",
    "render_tool_call",
    "render_answer",
]

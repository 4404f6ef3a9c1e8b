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

_TOOL_RE = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


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
    error: str | None = None  # why a <tool> block could not be used
    notes: list[str] = field(default_factory=list)

    @property
    def wants_tool(self) -> bool:
        return TOOL_OPEN in self.text


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_tool_call(payload: str, max_regions: int | None = None) -> ToolCall:
    """Validate the JSON inside <tool>…</tool>; raises ToolCallError with a message for the model."""
    try:
        call = json.loads(payload.strip())
    except json.JSONDecodeError as err:
        raise ToolCallError(f"the tool call is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})")
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
        if not _number(index) or int(index) != index:
            raise ToolCallError(f'{where}: "index" must be an integer, got {json.dumps(index)}')
        if not isinstance(box, list) or len(box) != 4 or not all(_number(v) for v in box):
            raise ToolCallError(f'{where}: "bbox_2d" must be a list of 4 numbers [x1, y1, x2, y2], got {json.dumps(box)}')
        x1, y1, x2, y2 = box
        if not (x1 < x2 and y1 < y2):
            raise ToolCallError(
                f"{where}: bbox_2d {json.dumps(box)} is inverted or has zero area (need x1 < x2 and y1 < y2)"
            )
        parsed.append(Region(int(index), (x1, y1, x2, y2)))
    query = call["query"]
    if not isinstance(query, str) or not query.strip():
        raise ToolCallError('"query" must be a non-empty string')
    return ToolCall(parsed, query.strip())


def parse_step(text: str, max_regions: int | None = None) -> Step:
    """Read a turn: a tool call (the first <tool>…</tool>; its errors are kept, not raised), else an answer."""
    think = _THINK_RE.search(text)
    step = Step(text=text, thought=think.group(1).strip() if think else None)
    if TOOL_OPEN in text:
        match = _TOOL_RE.search(text)
        if match is None:
            step.error = "the <tool> block is not closed with </tool>"
        else:
            try:
                step.tool_call = parse_tool_call(match.group(1), max_regions)
            except ToolCallError as err:
                step.error = str(err)
        return step
    step.answer = extract_answer(text)
    return step


def unwrap_boxed(text: str) -> str:
    r"""The content of the first `\boxed{…}` (braces balanced), or `text` unchanged."""
    start = text.find("\\boxed{")
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
    return text


def extract_answer(text: str) -> str | None:
    r"""The content of the first <answer>…</answer>, stripped and `\boxed{}`-unwrapped; None without one."""
    match = _ANSWER_RE.search(text)
    return unwrap_boxed(match.group(1).strip()).strip() if match else None


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
        match = _TOOL_RE.search(turn)
        if match is None:
            return False
        try:
            parse_tool_call(match.group(1))
        except ToolCallError:
            return False
    if ANSWER_OPEN in turn and _ANSWER_RE.search(turn) is None:
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

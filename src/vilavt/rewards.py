"""The GRPO reward as the authors compute it (REFERENCE.md §4.4), as plain TRL reward callables.

The authors score the whole decoded conversation (prompt included): it is split into turns at
`<|im_start|>…<|im_end|>` (a turn without its `<|im_end|>`, e.g. cut by the length budget, is invisible);
the format reward judges every assistant turn; the accuracy reward reads the *last parsed turn, whatever
its role*; `overall = 0.5 * accuracy + 0.5 * format` if accuracy > 0, else 0. Our rollouts give the
reward the completion (everything after the prompt's `<|im_start|>assistant\\n`, turn markers kept), which
parses to the same turns after the prompt's own (see `conversation_turns`).

A reward callable takes `completions` (strings, or TRL conversational completions) plus dataset columns
and rollout fields as keyword arguments and returns one float per completion:

* `format_reward`   — 1 if every assistant turn passes the format check (`turn_format_ok`), else 0;
* `accuracy_reward` — the last turn's answer scored for its `problem_type` (`turn_accuracy`);
* `vilavt_reward`   — `acc_weight * acc + format_weight * format` if acc > 0, else 0
                      (`make_vilavt_reward` builds one with other weights or options).

Where we deliberately differ from the authors, a keyword restores their behaviour (`AUTHORS` holds them all):

* `tool_format="executable"` (authors: "authors") — a turn's tool call earns format credit only if our
  tool would run it (`protocol_vilavt.parse_tool_call`: numbers or numeric strings, an integer index): our rollouts feed a
  failed call's error back to the model instead of ending the episode, which is what made such a call
  cost the authors' model its whole reward.
* `answer_tag="required"` (authors: "optional") — a turn without `<answer>…</answer>` has no answer; the
  authors score its whole text, which pays for bare text and for yes/no words anywhere in the reasoning
  (REFERENCE.md §6.9).
* `free_text="match"` (authors: "zero") — `free text` answers score 1 when equal after normalisation
  (case, punctuation, articles); the authors score every type but the five below 0, which gives such rows
  no learning signal (the shipped demo trains on free-text answers).

Kinds (`problem_kind`, lower-cased and stripped as the authors do): multiple choice (first characters,
case-insensitive), judgment (both contain the word yes, or both the word no), numerical and regression
(float32 MRA with strict `<`), math (`math_verify.verify` on two raw strings, which compares the stripped
texts), free text (alias `free-form`). An unknown type is a `ValueError`: check datasets with
`problem_kind` when loading them.
"""

import json
import re
import string
from dataclasses import dataclass

import torch

from .remote_code.protocol_vilavt import ToolCallError, parse_tool_call

PROBLEM_TYPES = ("multiple choice", "judgment", "numerical", "regression", "math", "free text")
_ALIASES = {"free-form": "free text", "free_text": "free text", "free form": "free text"}

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = TURN_START + "assistant\n"
_TURN_RE = re.compile(r"<\|im_start\|>(.*?)<\|im_end\|>", re.DOTALL)
_VISION_RE = re.compile(r"<\|vision_start\|><\|image_pad\|><\|vision_end\|>")
ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_CLOSED_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TOOL_RE = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
_BOXED_RE = re.compile(r"\\boxed\{(.*?)\}")  # no DOTALL: the authors unwrap only when a box closes on its line

# Our rollouts end a turn without `<|im_end|>` for these reasons only when the total token budget ran
# out (the authors' truncation); on any other stop the authors' rollout closes the turn with the template.
OPEN_TURN_STOP_REASONS = ("max_new_tokens",)

# The keyword values that reproduce the authors' reward exactly.
AUTHORS = {"tool_format": "authors", "answer_tag": "optional", "free_text": "zero"}
DEFAULTS = {"tool_format": "executable", "answer_tag": "required", "free_text": "match"}
CHOICES = {"tool_format": ("executable", "authors"), "answer_tag": ("required", "optional"),
            "free_text": ("match", "zero")}  # fmt: skip


def problem_kind(problem_type) -> str:
    """The canonical kind of a problem type (lower-cased and stripped, as the authors read it); a one-line
    `ValueError` naming an unknown one. Call it when loading a dataset to reject bad rows early."""
    name = str(problem_type).strip().lower()
    kind = name if name in PROBLEM_TYPES else _ALIASES.get(name)
    if kind is None:
        raise ValueError(f"unknown problem_type {problem_type!r}; known: {', '.join(PROBLEM_TYPES)} (or free-form)")
    return kind


def _check_options(**options) -> None:
    for name, value in options.items():
        if value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {CHOICES[name]}, got {value!r}")


# ---- answers ------------------------------------------------------------------------------------------

_THRESHOLDS = torch.arange(0.5, 0.95 + 0.05 / 2, 0.05, dtype=torch.float32)


def mean_relative_accuracy(pred: float, gold: float, inclusive: bool = False) -> float:
    """MRA as the authors compute it, in float32: the share of θ ∈ {0.50, …, 0.95} with
    |p − g| / (|g| + 1e-8) < 1 − θ (`inclusive`: ≤, as their evaluation script). Values carry float32
    noise (0.9 is 0.8999999761581421), and a prediction exactly at a threshold lands where float32 puts it."""
    pred, gold = torch.tensor(pred, dtype=torch.float32), torch.tensor(gold, dtype=torch.float32)
    error = (pred - gold).abs() / (gold.abs() + 1e-8)
    hits = error <= 1 - _THRESHOLDS if inclusive else error < 1 - _THRESHOLDS
    return hits.float().mean().item()


def extract_answer(text, required: bool = False) -> str | None:
    """The first `<answer>` content of `text`, stripped; without one the whole stripped text (the authors'
    fallback), or None when `required`."""
    text = str(text).strip()
    match = ANSWER_RE.search(text)
    if match:
        return match.group(1).strip()
    return None if required else text


def unwrap_boxed(text: str) -> str:
    r"""The content of the last `\boxed{` (braces balanced, or to the end of the text), as the authors
    unwrap it — only when some `\boxed{…}` closes on its line; otherwise `text` unchanged."""
    if not _BOXED_RE.search(text):
        return text
    tail = text.split("\\boxed{")[-1]
    depth = 1
    for i, char in enumerate(tail):
        depth += 1 if char == "{" else -1 if char == "}" else 0
        if depth == 0:
            return tail[:i]
    return tail if tail else text


def parse_number(text: str) -> float | None:
    """`float()` of the text without commas (so "1e3", "+4", " 4. ", "inf" and "nan" parse), or None."""
    try:
        return float(text.replace(",", ""))
    except (TypeError, ValueError):
        return None


def normalize_text(text: str) -> str:
    text = (text or "").lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _has_word(word: str, text: str) -> bool:
    return re.search(rf"\b{word}\b", text) is not None


def score_answer(prediction, gold, problem_type, *, free_text: str = "match") -> float:
    """Score an extracted answer against the gold one (which goes through the same `<answer>` extraction),
    in [0, 1], by the authors' rules for `problem_type`; an empty prediction or gold scores 0."""
    _check_options(free_text=free_text)
    kind = problem_kind(problem_type)
    if not prediction or gold is None:
        return 0.0
    prediction, gold = str(prediction), extract_answer(gold)
    if not gold:
        return 0.0
    if kind == "multiple choice":
        prediction, gold = prediction.strip(), gold.strip()
        return float(bool(prediction) and bool(gold) and prediction[0].lower() == gold[0].lower())
    if kind == "judgment":
        prediction, gold = prediction.lower().strip(), gold.lower().strip()
        return float(any(_has_word(word, prediction) and _has_word(word, gold) for word in ("yes", "no")))
    if kind in ("numerical", "regression"):
        value, gold_value = parse_number(prediction), parse_number(gold)
        if value is None or gold_value is None:
            return 0.0
        return max(0.0, min(1.0, mean_relative_accuracy(value, gold_value)))
    if kind == "math":
        # math_verify.verify(prediction, gold) on two raw strings compares their stripped texts.
        prediction, gold = prediction.strip(), gold.strip()
        return float(bool(prediction) and prediction == gold)
    if free_text == "zero":
        return 0.0
    return float(normalize_text(prediction) == normalize_text(gold))


def turn_accuracy(content, gold, problem_type, *, answer_tag: str = "required", free_text: str = "match") -> float:
    r"""The accuracy reward of one turn's content (a string, or a user turn's parts, whose `str()` the
    authors search): its answer (`extract_answer`, then `unwrap_boxed`) scored by `score_answer`."""
    _check_options(answer_tag=answer_tag)
    problem_kind(problem_type)  # an unknown type is an error, whatever the turn holds
    answer = extract_answer(content, required=answer_tag == "required") if content and gold else None
    return score_answer(unwrap_boxed(answer), gold, problem_type, free_text=free_text) if answer else 0.0


# ---- conversations ------------------------------------------------------------------------------------


@dataclass
class Turn:
    role: str  # system | user | assistant
    content: object  # text; a user turn's content is a list of parts ({"type": "image"} / {"type": "text", …})


def parse_dialogue(text: str) -> list[Turn]:
    """The turns of a rendered conversation as the authors' reward reads them: each closed
    `<|im_start|>role\\n…<|im_end|>` segment, stripped; empty segments, segments without a line break after
    the role, and unknown roles are dropped; a user turn's text is split into parts at the image markers."""
    turns = []
    for segment in _TURN_RE.findall(text):
        segment = segment.strip()
        if "\n" not in segment:
            continue
        role, content = segment.split("\n", 1)
        role = role.strip()
        if role in ("system", "assistant"):
            turns.append(Turn(role, content))
        elif role == "user":
            parts = []
            for i, part in enumerate(_VISION_RE.split(content)):
                if i > 0:
                    parts.append({"type": "image"})
                if part.strip():
                    parts.append({"type": "text", "text": part.strip()})
            turns.append(Turn(role, parts or [{"type": "text", "text": ""}]))
    return turns


def completion_text(completion) -> str:
    """A TRL completion as text: a string as it is; a list of messages (starting with the assistant turn
    the prompt opened) rendered with the chat template's turn markers."""
    if isinstance(completion, str):
        return completion
    pieces = []
    for i, message in enumerate(completion):
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(item.get("text") or "" for item in content if isinstance(item, dict))
        role = "assistant" if message.get("role") == "assistant" else "user"
        header = "" if i == 0 and role == "assistant" else f"{TURN_START}{role}\n"
        pieces.append(f"{header}{content}{TURN_END}\n")
    return "".join(pieces)


def conversation_turns(completion, prompt_text: str | None = None, stop_reason: str | None = None) -> list[Turn]:
    """The turns the authors' reward would parse from prompt + completion.

    `prompt_text`: the rendered prompt (ending with the assistant header); without it only the
    completion's turns are returned (the prompt's turns are all closed, so they parse the same either way).
    `stop_reason`: the rollout's (`Trace.stop_reason`); unless the total token budget ran out, an unclosed
    last turn is closed, as the authors' rollout renders every finished turn through the chat template.
    """
    text = (ASSISTANT_HEADER if prompt_text is None else prompt_text) + completion_text(completion)
    closable = stop_reason is not None and stop_reason not in OPEN_TURN_STOP_REASONS
    if closable and text.rfind(TURN_START) > text.rfind(TURN_END):
        text += TURN_END
    return parse_dialogue(text)


def assistant_turns(completion, prompt_text: str | None = None, stop_reason: str | None = None) -> list[str]:
    """The content of the assistant turns the reward judges (closed turns only)."""
    return [t.content for t in conversation_turns(completion, prompt_text, stop_reason) if t.role == "assistant"]


# ---- the format check -----------------------------------------------------------------------------------


def think_tags_ok(text: str) -> bool:
    """At least one <think>, as many </think>, and no </think> before its <think> (nesting is allowed)."""
    if "<think>" not in text or text.count("<think>") != text.count("</think>"):
        return False
    depth = 0
    for tag in re.findall(r"</?think>", text):
        depth += 1 if tag == "<think>" else -1
        if depth < 0:
            return False
    return depth == 0


def _tool_call_shape_ok(call) -> bool:
    """The authors' check of a parsed call: a dict with a non-empty `region` list of dicts holding `index`
    and a 4-element `bbox_2d` list with x1 < x2 and y1 < y2 (compared as given), and a non-blank `query`."""
    if not isinstance(call, dict) or "region" not in call or "query" not in call:
        return False
    regions = call["region"]
    if not isinstance(regions, list) or not regions:
        return False
    for region in regions:
        if not isinstance(region, dict) or "index" not in region or "bbox_2d" not in region:
            return False
        box = region["bbox_2d"]
        if not isinstance(box, list) or len(box) != 4:
            return False
        x1, y1, x2, y2 = box
        try:
            if x1 >= x2 or y1 >= y2:
                return False
        except TypeError:  # e.g. a number against a string
            return False
    return isinstance(call["query"], str) and bool(call["query"].strip())


def turn_format_ok(text: str, *, tool_format: str = "executable") -> bool:
    """The format check of one assistant turn: balanced <think> tags; if <tool> appears, its first
    `<tool>…</tool>` holds a valid call (`tool_format`: "authors" checks the call's shape, "executable" also
    requires our tool to accept it); else if <answer> appears, it is closed. A turn with neither passes on
    its <think> tags alone."""
    _check_options(tool_format=tool_format)
    if not text or not think_tags_ok(text):
        return False
    if "<tool>" in text:
        match = _TOOL_RE.search(text)
        if match is None:
            return False
        try:
            call = json.loads(match.group(1).strip())
        except (ValueError, RecursionError):
            return False
        if not _tool_call_shape_ok(call):
            return False
        if tool_format == "executable":
            try:
                parse_tool_call(match.group(1))
            except ToolCallError:
                return False
        return True
    if "<answer>" in text:
        return _CLOSED_ANSWER_RE.search(text) is not None
    return True


# ---- the reward -----------------------------------------------------------------------------------------


@dataclass
class RewardParts:
    overall: float
    format: float
    accuracy: float


def score_conversation(
    completion, gold, problem_type, *, prompt_text=None, stop_reason=None, acc_weight: float = 0.5,
    format_weight: float = 0.5, tool_format: str = "executable", answer_tag: str = "required",
    free_text: str = "match",
) -> RewardParts:  # fmt: skip
    """The reward of one rollout: format over every assistant turn, accuracy of the last parsed turn
    (whatever its role; 0 when no turn of the completion is closed and no `prompt_text` is given — the
    prompt's answer placeholder is what the authors would score), overall 0 unless accuracy > 0."""
    problem_kind(problem_type)
    turns = conversation_turns(completion, prompt_text, stop_reason)
    fmt = float(all(turn_format_ok(t.content, tool_format=tool_format) for t in turns if t.role == "assistant"))
    accuracy = 0.0
    if turns:
        accuracy = turn_accuracy(turns[-1].content, gold, problem_type, answer_tag=answer_tag, free_text=free_text)
    overall = acc_weight * accuracy + format_weight * fmt if accuracy > 0 else accuracy
    return RewardParts(overall, fmt, accuracy)


def _per_row(values, count: int) -> list:
    return list(values) if isinstance(values, (list, tuple)) else [values] * count


def _score_all(completions, answer, problem_type, prompt_text=None, stop_reason=None, **options) -> list[RewardParts]:
    n = len(completions)
    return [
        score_conversation(c, gold, kind, prompt_text=p, stop_reason=s, **options)
        for c, gold, kind, p, s in zip(completions, _per_row(answer, n), _per_row(problem_type, n),
                                       _per_row(prompt_text, n), _per_row(stop_reason, n))
    ]  # fmt: skip


def format_reward(completions, *, prompt_text=None, stop_reason=None, tool_format: str = "executable",
                  **kwargs) -> list[float]:  # fmt: skip
    """1.0 when every assistant turn passes the format check."""
    rewards = []
    for completion, p, s in zip(completions, _per_row(prompt_text, len(completions)),
                                _per_row(stop_reason, len(completions))):  # fmt: skip
        turns = assistant_turns(completion, p, s)
        rewards.append(float(all(turn_format_ok(t, tool_format=tool_format) for t in turns)))
    return rewards


def accuracy_reward(completions, answer, problem_type, *, prompt_text=None, stop_reason=None,
                    answer_tag: str = "required", free_text: str = "match", **kwargs) -> list[float]:  # fmt: skip
    """The accuracy reward of each completion's last turn."""
    parts = _score_all(completions, answer, problem_type, prompt_text, stop_reason, answer_tag=answer_tag,
                       free_text=free_text)  # fmt: skip
    return [p.accuracy for p in parts]


def make_vilavt_reward(acc_weight: float = 0.5, format_weight: float = 0.5, *, tool_format: str = "executable",
                       answer_tag: str = "required", free_text: str = "match"):  # fmt: skip
    """`acc_weight * acc + format_weight * format` if acc > 0 else 0 (the paper's reward with its weights).
    `make_vilavt_reward(**AUTHORS)` is the authors' reward exactly."""
    _check_options(tool_format=tool_format, answer_tag=answer_tag, free_text=free_text)
    options = dict(acc_weight=acc_weight, format_weight=format_weight, tool_format=tool_format,
                   answer_tag=answer_tag, free_text=free_text)  # fmt: skip

    def vilavt_reward(
        completions, answer, problem_type, prompt_text=None, stop_reason=None, log_metric=None, **kwargs
    ) -> list[float]:
        parts = _score_all(completions, answer, problem_type, prompt_text, stop_reason, **options)
        if log_metric is not None:  # TRL's GRPOTrainer: log the two parts beside the reward
            log_metric("vilavt/accuracy", sum(p.accuracy for p in parts) / len(parts))
            log_metric("vilavt/format_rate", sum(p.format for p in parts) / len(parts))
        return [p.overall for p in parts]

    return vilavt_reward


vilavt_reward = make_vilavt_reward()

__all__ = [
    "PROBLEM_TYPES",
    "AUTHORS",
    "DEFAULTS",
    "CHOICES",
    "problem_kind",
    "score_answer",
    "turn_accuracy",
    "turn_format_ok",
    "think_tags_ok",
    "extract_answer",
    "ANSWER_RE",
    "unwrap_boxed",
    "mean_relative_accuracy",
    "parse_dialogue",
    "conversation_turns",
    "assistant_turns",
    "completion_text",
    "score_conversation",
    "RewardParts",
    "format_reward",
    "accuracy_reward",
    "vilavt_reward",
    "make_vilavt_reward",
]

"""Answer scoring and the GRPO rewards (REFERENCE.md §4.4), as plain TRL reward callables.

A reward callable takes `completions` (strings, or TRL conversational completions) plus dataset
columns as keyword arguments (`answer`, `problem_type`) and returns one float per completion:

* `format_reward`   — 1 if every assistant turn follows the protocol (balanced <think>, a valid tool
                      call when <tool> appears, a closed <answer> when <answer> appears), else 0;
* `accuracy_reward` — the answer's score for its `problem_type` (see `score_answer`);
* `vilavt_reward`   — the paper's combination `acc_weight * acc + format_weight * format` if acc > 0,
                      else 0 (`make_vilavt_reward` builds one with other weights).
"""

import math
import re
import string

from .remote_code.protocol_vilavt import extract_answer, format_ok

PROBLEM_TYPES = ("multiple choice", "judgment", "numerical", "regression", "free text")
_ALIASES = {
    "multiple choice": "multiple choice",
    "multiple_choice": "multiple choice",
    "mc": "multiple choice",
    "judgment": "judgment",
    "judgement": "judgment",
    "yes/no": "judgment",
    "yes_no": "judgment",
    "numerical": "numerical",
    "numeric": "numerical",
    "counting": "numerical",
    "regression": "regression",
    "free text": "free text",
    "free_text": "free text",
    "open": "free text",
    "text": "free text",
}
MRA_THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]


def problem_kind(problem_type: str) -> str:
    """Canonical name of a problem type; a clear error for an unknown one."""
    kind = _ALIASES.get(str(problem_type).strip().lower())
    if kind is None:
        raise ValueError(f"unknown problem_type {problem_type!r}; known: {', '.join(PROBLEM_TYPES)} (and aliases)")
    return kind


# ---- answer normalisation ---------------------------------------------------------------------------

_LETTER = re.compile(r"^\s*[\(\[]?\s*([A-Za-z])\s*(?:[\)\].:,]|\s|$)")


def option_letter(text: str) -> str | None:
    """The option letter an answer starts with: 'B', '(B)', 'B.', 'B) red', 'b' -> 'B'."""
    match = _LETTER.match(text or "")
    return match.group(1).upper() if match else None


def yes_no(text: str) -> str | None:
    words = set(re.findall(r"\b(yes|no)\b", (text or "").lower()))
    return words.pop() if len(words) == 1 else None


def parse_number(text: str) -> float | None:
    match = re.search(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", (text or "").replace(",", ""))
    if not match:
        return None
    value = float(match.group(0))
    return value if math.isfinite(value) else None


def normalize_text(text: str) -> str:
    text = (text or "").lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def mean_relative_accuracy(pred: float, gold: float, inclusive: bool = False) -> float:
    """MRA over thresholds 0.50 … 0.95: the share of thresholds θ with |p − g| / |g| < 1 − θ
    (`inclusive`: ≤, as the reference's evaluation script)."""
    error = abs(pred - gold) / (abs(gold) + 1e-8)
    hits = [error <= 1 - t if inclusive else error < 1 - t for t in MRA_THRESHOLDS]
    return sum(hits) / len(hits)


def score_answer(prediction: str | None, gold, problem_type: str) -> float:
    """Score a predicted answer against the gold one, in [0, 1]. An empty or missing answer scores 0."""
    kind = problem_kind(problem_type)
    if prediction is None or not str(prediction).strip():
        return 0.0
    prediction, gold = str(prediction).strip(), str(gold).strip()
    if kind == "multiple choice":
        letter, gold_letter = option_letter(prediction), option_letter(gold)
        return float(letter is not None and letter == gold_letter)
    if kind == "judgment":
        answer, gold_answer = yes_no(prediction), yes_no(gold)
        return float(answer is not None and answer == gold_answer)
    if kind in ("numerical", "regression"):
        value, gold_value = parse_number(prediction), parse_number(gold)
        if value is None or gold_value is None:
            return 0.0
        if kind == "regression":
            return mean_relative_accuracy(value, gold_value)
        return float(abs(value - gold_value) <= 1e-6 * max(1.0, abs(gold_value)))
    return float(normalize_text(prediction) == normalize_text(gold))


# ---- completions --------------------------------------------------------------------------------------


def completion_text(completion) -> str:
    """A TRL completion (a string, or a list of messages whose assistant turns count) as text."""
    if isinstance(completion, str):
        return completion
    turns = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(item.get("text", "") for item in content if isinstance(item, dict))
        if message.get("role") == "assistant":
            turns.append(content)
    return "<|im_end|>\n<|im_start|>assistant\n".join(turns)


def assistant_turns(completion) -> list[str]:
    """The assistant turns of a (multi-turn) completion. The completion starts inside the first assistant
    turn (the prompt ends with the assistant header); later turns follow `<|im_start|>assistant\\n`;
    a turn ends at `<|im_end|>` or at the end of the text."""
    text = completion_text(completion)
    chunks = text.split("<|im_start|>assistant\n")
    return [chunk.split("<|im_end|>")[0] for chunk in chunks if chunk or len(chunks) == 1]


def final_answer(completion) -> str | None:
    turns = assistant_turns(completion)
    return extract_answer(turns[-1]) if turns else None


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when every assistant turn follows the protocol."""
    rewards = []
    for completion in completions:
        turns = assistant_turns(completion)
        rewards.append(float(bool(turns) and all(format_ok(turn) for turn in turns)))
    return rewards


def accuracy_reward(completions, answer, problem_type, **kwargs) -> list[float]:
    """Score of the final <answer> for each completion's problem type."""
    return [
        score_answer(final_answer(completion), gold, kind)
        for completion, gold, kind in zip(completions, answer, problem_type)
    ]


def make_vilavt_reward(acc_weight: float = 0.5, format_weight: float = 0.5):
    """`acc_weight * acc + format_weight * format` if acc > 0 else 0 (the paper's reward with its weights)."""

    def vilavt_reward(completions, answer, problem_type, log_metric=None, **kwargs) -> list[float]:
        accuracy = accuracy_reward(completions, answer, problem_type)
        formats = format_reward(completions)
        if log_metric is not None:  # TRL's GRPOTrainer: log the two parts beside the reward
            log_metric("vilavt/accuracy", sum(accuracy) / len(accuracy))
            log_metric("vilavt/format_rate", sum(formats) / len(formats))
        return [acc_weight * a + format_weight * f if a > 0 else 0.0 for a, f in zip(accuracy, formats)]

    return vilavt_reward


vilavt_reward = make_vilavt_reward()

__all__ = [
    "PROBLEM_TYPES",
    "problem_kind",
    "score_answer",
    "mean_relative_accuracy",
    "option_letter",
    "assistant_turns",
    "final_answer",
    "format_reward",
    "accuracy_reward",
    "vilavt_reward",
    "make_vilavt_reward",
]

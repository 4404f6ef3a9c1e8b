"""Benchmark evaluation (`vilavt eval`): the paper's benchmark files, the questions the model is asked,
the reference's metrics, and a batched, resumable runner over the chatting loop.

Benchmark files (REFERENCE.md §5.1) are JSON lists (or JSONL files) of items. Fields used:
  question_id          the item's id (the position in the file when absent; a repeated id gets `#<position>`)
  question             the question text; ERQA's contains literal `<image>` tags
  answer               the gold answer ("B", "A. right", "3.2", "move_right:1,move_forward:2")
  problem_type         multiple choice | numerical | regression | vci (SPAR view change); the rewards'
                       judgment / math / free text are accepted too (case-insensitive)
  images / image / frames   image paths, relative to the image root (a video = its frames); may be absent
  options              the options of a multiple-choice item, or null when they are inline in the question
  category / original_question_type / task   the first present one is the item's category
  num_images, visual_indices   (ERQA) checked against `images` and the `<image>` tags
Files must be UTF-8. Field types are checked when the file is loaded (`FIELD_TYPES`: question a non-empty
string, answer a string or a number, options a list of strings, ...); a wrong one is an error naming the
file, the item and the field, and `--dry-run` counts the item among its errors.

Questions (the layout of the reference's HF evaluator, REFERENCE.md §2.1): for a multiple-choice item with
an options list, the options are appended, one per line; then the problem type's instruction, on its own line
(this project's wording, `INSTRUCTIONS`: multiple choice, numerical and regression; none for vci). A mapping
of problem type -> instruction replaces them (`run_eval(..., instructions=...)`, `vilavt eval --instructions
FILE.json`), e.g. to ask with the wording of the reference's evaluator when reproducing its numbers.
As in the reference, ERQA gets no instruction: its questions already end with one.

ERQA's `<image>` tags: the reference interleaves images and text at the tags, but the ViLaVT chat template
shows all images first, each followed by its index line. So the images keep
their order and the k-th tag (0-based) becomes the reference "[image k]" in the text. `visual_indices`,
when given, are the tags' character offsets in the tag-free question; a mismatch is logged.

Metrics (REFERENCE.md §5.2) score a response as the authors' `eval/cal_metrics.py` does: its first `<answer>`
content, or else its whole text (in a run, the final assistant turn; see `generate_rows`), against the gold,
by the exact problem type:
  multiple choice   first characters equal, case-insensitive (an empty answer scores 0; theirs crashes);
  numerical         both or neither contain "." or ","; the numbers (commas removed) equal when rounded
                    to 2 decimals;
  regression        float32 MRA over θ ∈ {0.50, …, 0.95}: |p − g| / (|g| + 1e-8) ≤ 1 − θ (the reward: <);
  vci               "action:value" lists; for the 5 pairs in `VIEW_CHANGE_PAIRS` the net value
                    (e.g. move_right − move_left), then the mean MRA over the pairs; unparsable → 0;
  other types       (judgment, math, free text) `vilavt.rewards.score_answer` (theirs: 0; `other_types`).
Each item is asked `avg_k` times (Avg@k: an item's score is its samples' mean). Overall: the mean over
items, except VSI-Bench (mean of its 8 table types' means; _easy/_medium/_hard merged) and SPAR-Bench
(mean of the means of its Low / Medium / High types; levels item-weighted), as their scripts compute them.

Results are JSON lines, one per item and sample: benchmark, id, sample, answer, response, gold, score,
rounds, stop_reason, error. A rerun with the same file skips the (id, sample) pairs already done; pairs that
failed (e.g. a missing image) are tried again. A failed sample scores 0 and stays in the denominator. A line
an interrupted run left cut short (anywhere, even inside a UTF-8 character) is skipped, and cut off before
the next append.
"""

import json
import logging
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InputError
from .remote_code.processing_vilavt import ImageLoadError, open_image
from .rewards import ANSWER_RE, mean_relative_accuracy, problem_kind, score_answer
from .validation import decode_json, read_text

logger = logging.getLogger(__name__)

MULTIPLE_CHOICE_INSTRUCTION = "Reply with the letter of the correct option only."
NUMBER_INSTRUCTION = "Reply with the number alone, for example 7 or 0.25."
INSTRUCTIONS = {
    "multiple choice": MULTIPLE_CHOICE_INSTRUCTION,
    "numerical": NUMBER_INSTRUCTION,
    "regression": NUMBER_INSTRUCTION,
}
# Benchmarks whose questions already carry their answer instruction (the reference's HF evaluator).
NO_INSTRUCTION_BENCHMARKS = ("erqa",)
EVAL_PROBLEM_TYPES = ("multiple choice", "numerical", "regression", "vci")
REWARD_PROBLEM_TYPES = ("judgment", "math", "free text")  # scored by vilavt.rewards.score_answer

IMAGE_TAG = "<image>"
IMAGE_FIELDS = ("images", "image", "frames")
CATEGORY_FIELDS = ("category", "original_question_type", "task")

# SPAR-Bench view change: (positive, negative) actions whose net value is compared.
VIEW_CHANGE_PAIRS = (
    ("move_right", "move_left"),
    ("move_up", "move_down"),
    ("move_forward", "move_backward"),
    ("rotate_right", "rotate_left"),
    ("rotate_up", "rotate_down"),
)

# VSI-Bench and SPAR-Bench (by file name) get their scripts' tables besides the mean over items.
VSI_BENCH = re.compile(r"vsi[-_ ]?bench", re.IGNORECASE)
SPAR_BENCH = re.compile(r"spar[-_ ]?bench", re.IGNORECASE)
VSI_DIFFICULTY = re.compile(r"_(easy|medium|hard)$")
# The question types of VSI-Bench's table, in its order (types merged over difficulty); other types are
# counted but enter neither the table nor its overall.
VSI_TYPES = (
    "object_rel_distance", "object_rel_direction", "route_planning", "obj_appearance_order", "object_counting",
    "object_abs_distance", "object_size_estimation", "room_size_estimation",
)  # fmt: skip
# SPAR-Bench's levels (its question types by name); types in none of them (e.g. distance_infer_center_oc,
# obj_spatial_relation_oc) form the "Other" group, left out of the levels and the overall.
SPAR_LEVELS = {
    "Low": (
        "depth_prediction_oc", "depth_prediction_oo", "distance_prediction_oc", "distance_prediction_oo",
        "depth_prediction_oc_mv", "depth_prediction_oo_mv", "distance_prediction_oo_mv", "distance_prediction_oc_mv",
    ),
    "Medium": ("view_change_infer", "position_matching", "camera_motion_infer"),
    "High": (
        "obj_spatial_relation_oo", "obj_spatial_relation_oc_mv", "obj_spatial_relation_oo_mv",
        "spatial_imagination_oc", "spatial_imagination_oo", "spatial_imagination_oc_mv", "spatial_imagination_oo_mv",
        "distance_infer_center_oo", "distance_infer_center_oo_mv",
    ),
}  # fmt: skip


class BenchmarkError(InputError):
    """A benchmark or results file, or an item, that cannot be used; the message names the file (and item)."""


@dataclass
class Item:
    """One benchmark question, ready for the model."""

    id: str
    benchmark: str
    images: list[str]  # paths as given in the file (relative to the image root)
    question: str  # as the model is asked it
    answer: str  # gold
    problem_type: str  # canonical
    category: str
    options: list[str] | None


# ---- reading benchmark files ------------------------------------------------------------------------


def benchmark_name(path) -> str:
    return Path(path).stem


def read_benchmark_records(path) -> list[dict]:
    """The raw items of a JSON list or JSONL file; text that is not UTF-8 and malformed JSON are errors naming
    the file, line and column."""
    path = Path(path)
    text = read_text(path, error=BenchmarkError)
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(decode_json(line, path, line_offset=number - 1, error=BenchmarkError))
    else:
        records = decode_json(text, path, error=BenchmarkError)
    if not isinstance(records, list):
        kind = type(records).__name__
        raise BenchmarkError(f"{path}: expected a JSON list of objects (one per question), got {kind}")
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise BenchmarkError(f"{path}: item {position} is {kind}, not an object (one per question)")
    return records


def canonical_problem_type(value) -> str:
    """The metric's name for a problem type; a ValueError naming an unknown one."""
    name = str(value).strip().lower()
    if name in EVAL_PROBLEM_TYPES:
        return name
    try:
        return problem_kind(name)
    except ValueError:
        known = ", ".join(EVAL_PROBLEM_TYPES + REWARD_PROBLEM_TYPES)
        raise ValueError(f"unknown problem_type {value!r}; known: {known}") from None


def adds_instruction(benchmark: str) -> bool:
    return not any(name in benchmark.lower() for name in NO_INSTRUCTION_BENCHMARKS)


def build_question(
    question: str, problem_type: str, options: list | None = None, instruction: bool = True, instructions=None
) -> str:
    """The question as the model is asked it (REFERENCE.md §2.1): options of a multiple-choice item one per
    line, then the problem type's instruction (from `instructions`, problem type -> text, default
    `INSTRUCTIONS`; a type it lacks gets none); `<image>` tags must have been replaced already."""
    kind = canonical_problem_type(problem_type)
    instructions = INSTRUCTIONS if instructions is None else instructions
    text = question
    if kind == "multiple choice" and options is not None:
        text += "\n" + "\n".join(str(option) for option in options)
    if instruction and instructions.get(kind):
        text += "\n" + instructions[kind]
    return text


def load_instructions(path) -> dict[str, str]:
    """A JSON object of problem type -> instruction (e.g. {"multiple choice": "...", "numerical": "..."}), the
    types canonical; a `BenchmarkError` naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{path}: not a readable JSON instructions file ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(text, str) for text in data.values()):
        raise BenchmarkError(f"{path}: expected a JSON object of problem type -> instruction text")
    try:
        return {canonical_problem_type(kind): text for kind, text in data.items()}
    except ValueError as err:
        raise BenchmarkError(f"{path}: {err}") from None


def replace_image_tags(question: str) -> str:
    """`<image>` tags → "[image k]" (k-th tag, 0-based), spaced from the surrounding text: the chat template
    shows every image first, with its index."""
    parts = question.split(IMAGE_TAG)
    text = parts[0]
    for index, part in enumerate(parts[1:]):
        if text and not text[-1].isspace():
            text += " "
        text += f"[image {index}]"
        if part and not part[0].isspace():
            text += " "
        text += part
    return text


def image_tag_offsets(question: str) -> list[int]:
    """Character offsets of the `<image>` tags in the tag-free question (what ERQA's visual_indices hold)."""
    parts = question.split(IMAGE_TAG)
    return [len("".join(parts[: k + 1])) for k in range(len(parts) - 1)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_path(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_paths(value) -> bool:
    return _is_path(value) or (isinstance(value, list) and all(_is_path(path) for path in value))


# What each field must be when it is present and not null (a bool is never a number here; of alternative
# fields, the one used). A wrong type is an error at load time: `answer: ["A"]` would otherwise be scored as
# the text "['A']".
FIELD_TYPES = {
    "question_id": ("a string or an integer", lambda v: isinstance(v, str) or _is_int(v)),
    "question": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "answer": (
        "a non-empty string or a finite number",
        lambda v: (isinstance(v, str) and bool(v.strip())) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               and math.isfinite(v)),
    ),
    "problem_type": ("a string", lambda v: isinstance(v, str)),
    "options": ("a list of strings or null", lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v)),
    "num_images": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "visual_indices": ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(i) for i in v)),
    IMAGE_FIELDS: ("a path or a list of paths (non-empty strings)", _is_paths),
    CATEGORY_FIELDS: ("a string or an integer", lambda v: isinstance(v, str) or _is_int(v)),
}  # fmt: skip


def used_field(record: dict, fields: tuple[str, ...]) -> str | None:
    """Of alternative fields (`IMAGE_FIELDS`, `CATEGORY_FIELDS`), the first one given: the one used (another
    schema may use the others for something else, e.g. a trajectory's `frames`)."""
    return next((field for field in fields if record.get(field) not in (None, "")), None)


def check_field_types(record: dict) -> None:
    """A ValueError naming the first field whose value has the wrong type (see `FIELD_TYPES`)."""
    for field, (expected, valid) in FIELD_TYPES.items():
        field = used_field(record, field) if isinstance(field, tuple) else field
        value = None if field is None else record.get(field)
        if value is not None and not valid(value):
            shown = json.dumps(value, ensure_ascii=False)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"`{field}` must be {expected}, got {type(value).__name__} {shown}")


def image_paths(record: dict) -> list[str]:
    """The item's image paths: the first of `images`, `image`, `frames` that is given (types checked)."""
    field = used_field(record, IMAGE_FIELDS)
    value = [] if field is None else record[field]
    return [value] if isinstance(value, str) else list(value)


def category_of(record: dict, benchmark: str) -> str:
    field = used_field(record, CATEGORY_FIELDS)
    category = "all" if field is None else str(record[field])
    if VSI_BENCH.search(benchmark):
        category = VSI_DIFFICULTY.sub("", category)  # VSI-Bench scores easy/medium/hard of a type together
    return category


def parse_item(record: dict, benchmark: str, position: int, instructions=None) -> Item:
    """One raw item as an `Item`; a ValueError says what is wrong (the caller adds file and id)."""
    for field in ("question", "answer", "problem_type"):
        if record.get(field) is None:
            raise ValueError(f"has no `{field}`")
    check_field_types(record)
    question = record["question"]
    kind = canonical_problem_type(record["problem_type"])
    images = image_paths(record)
    if record.get("num_images") is not None and record["num_images"] != len(images):
        raise ValueError(f"num_images is {record['num_images']} but {len(images)} images are listed")
    tags = question.count(IMAGE_TAG)
    if tags:
        if tags != len(images):
            raise ValueError(f"the question has {tags} {IMAGE_TAG} tags but {len(images)} images are listed")
        visual_indices = record.get("visual_indices")
        if isinstance(visual_indices, list) and visual_indices and visual_indices != image_tag_offsets(question):
            logger.warning(
                "%s item %s: visual_indices %s do not match the %s tags' offsets %s; images keep their listed order",
                benchmark, record.get("question_id", position), visual_indices, IMAGE_TAG,
                image_tag_offsets(question),
            )
        question = replace_image_tags(question)
    options = record.get("options")
    return Item(
        id=str(position if record.get("question_id") is None else record["question_id"]),
        benchmark=benchmark,
        images=images,
        question=build_question(question, kind, options, adds_instruction(benchmark), instructions),
        answer=str(record["answer"]),
        problem_type=kind,
        category=category_of(record, benchmark),
        options=options,
    )


def item_label(record: dict, position: int) -> str:
    return f"item {position}" + (f" (question_id {record['question_id']!r})" if "question_id" in record else "")


def load_benchmark(path, instructions=None) -> list[Item]:
    """The items of a benchmark file (`instructions`: see `build_question`); a corrupt file or item is a
    `BenchmarkError` naming the file (and item)."""
    benchmark = benchmark_name(path)
    items = []
    for position, record in enumerate(read_benchmark_records(path)):
        try:
            items.append(parse_item(record, benchmark, position, instructions))
        except ValueError as err:
            raise BenchmarkError(f"{path}: {item_label(record, position)} {err}") from None
    return make_ids_unique(items)


def make_ids_unique(items: list[Item]) -> list[Item]:
    """Results are keyed by id: a repeated question_id gets `#<position>` (stable while the file is)."""
    seen = set()
    for position, item in enumerate(items):
        if item.id in seen:
            logger.warning("%s: question_id %r repeats; item %d is %r", item.benchmark, item.id, position,
                           f"{item.id}#{position}")
            item.id = f"{item.id}#{position}"
        seen.add(item.id)
    return items


# ---- metrics ----------------------------------------------------------------------------------------


def answer_content(text) -> str:
    """What the authors' metric compares: the first `<answer>` content of a response (stripped), or the whole
    response as it is; no response is the empty string."""
    if text is None:
        return ""
    text = str(text)
    match = ANSWER_RE.search(text)
    return match.group(1).strip() if match else text


def to_number(text: str) -> float | None:
    """`float()` of the text without commas ("inf" and "nan" parse too), or None."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def score_multiple_choice(prediction: str, gold: str) -> float:
    """First characters of the stripped texts equal, case-insensitive; an empty answer scores 0 (the
    authors' script raises IndexError there and loses the whole run)."""
    prediction, gold = prediction.strip(), gold.strip()
    return float(bool(prediction) and bool(gold) and prediction[0].lower() == gold[0].lower())


def score_numerical(prediction: str, gold: str) -> float:
    """Both or neither contain "." or ","; then the numbers equal after rounding to 2 decimals."""

    def has_separator(text: str) -> bool:
        return "." in text or "," in text

    if has_separator(prediction) != has_separator(gold):
        return 0.0
    value, gold_value = to_number(prediction), to_number(gold)
    if value is None or gold_value is None:
        return 0.0
    return float(round(value, 2) == round(gold_value, 2))


def score_regression(prediction: str, gold: str) -> float:
    """Float32 MRA with the evaluation's inclusive `<=`."""
    value, gold_value = to_number(prediction), to_number(gold)
    if value is None or gold_value is None:
        return 0.0
    return mean_relative_accuracy(value, gold_value, inclusive=True)


def parse_view_change(text: str) -> dict[str, float]:
    """"move_right:1,rotate_left:30" → {"move_right": 1.0, "rotate_left": 30.0}, as the authors parse it:
    pairs split at "," then at ":" (exactly one colon each), keys exactly as written (case and spaces
    count), values by `float()`; a ValueError if malformed."""
    actions = {}
    for part in text.split(","):
        pieces = part.split(":")
        if len(pieces) != 2:
            raise ValueError(f"not an action:value pair: {part!r}")
        actions[pieces[0]] = float(pieces[1])
    return actions


def score_view_change(prediction: str, gold: str) -> float:
    """Mean of the five pairs' MRA (inclusive) of the net values (e.g. move_right − move_left; an action
    not given counts 0); unparsable → 0."""
    try:
        predicted, expected = parse_view_change(prediction), parse_view_change(gold)
    except ValueError:
        return 0.0

    def net(actions, positive, negative):
        return actions.get(positive, 0) - actions.get(negative, 0)

    scores = [
        mean_relative_accuracy(net(predicted, *pair), net(expected, *pair), inclusive=True)
        for pair in VIEW_CHANGE_PAIRS
    ]
    return float(np.mean(scores))


EVAL_METRICS = {
    "multiple choice": score_multiple_choice,
    "numerical": score_numerical,
    "regression": score_regression,
    "vci": score_view_change,
}


def score_benchmark_answer(response, gold, problem_type: str, *, other_types: str = "reward") -> float:
    """Score a response (the model's final text, or a bare answer) against the gold answer as the authors'
    evaluation script does: both go through `answer_content`, and `problem_type` picks the metric by its
    exact name (multiple choice, numerical, regression, vci).

    `other_types`: "reward" (default) scores any other type the rewards know (judgment, math, free text;
    a differently spelled metric type such as "Multiple Choice" gets that metric) with
    `vilavt.rewards.score_answer`, and an unknown type is a ValueError naming it; "zero" scores every
    other type 0, as the authors' script."""
    if other_types not in ("reward", "zero"):
        raise ValueError(f"other_types must be 'reward' or 'zero', got {other_types!r}")
    prediction, gold = answer_content(response), answer_content(gold)
    if problem_type in EVAL_METRICS:
        return EVAL_METRICS[problem_type](prediction, gold)
    if other_types == "zero":
        return 0.0
    kind = canonical_problem_type(problem_type)
    if kind in EVAL_METRICS:
        return EVAL_METRICS[kind](prediction, gold)
    return score_answer(prediction, gold, kind)


# ---- summaries --------------------------------------------------------------------------------------


def item_scores(items: list[Item], records: dict, avg_k: int = 1) -> dict[str, float]:
    """Each item's Avg@k: the mean score of its samples present in `records` (failed ones score 0)."""
    scores = {}
    for item in items:
        samples = [records[(item.id, s)]["score"] for s in range(avg_k) if (item.id, s) in records]
        if samples:
            scores[item.id] = sum(samples) / len(samples)
    return scores


def mean(values) -> float | None:
    """The mean as numpy computes it (the authors' evaluation script, over all items), None for no values."""
    values = list(values)
    return float(np.mean(values)) if values else None


def table_mean(values) -> float | None:
    """The mean as the authors' VSI / SPAR table scripts compute it (a running sum, then one division)."""
    values = list(values)
    return sum(values) / len(values) if values else None


def _by_type(scored: list[tuple[str, float]]) -> dict[str, list[float]]:
    grouped: dict[str, list[float]] = {}
    for name, score in scored:
        grouped.setdefault(name, []).append(score)
    return grouped


def vsi_table(scored: list[tuple[str, float]]) -> dict:
    """VSI-Bench's table from (question type, score) pairs in item order: the mean of each listed type
    (difficulties merged by `category_of`), the overall as the unweighted mean of those type means, the
    count over all items; other types are named in `left_out`."""
    grouped = _by_type(scored)
    types = {name: {"score": table_mean(grouped[name]), "count": len(grouped[name])} for name in VSI_TYPES
             if name in grouped}  # fmt: skip
    return {
        "types": types,
        "overall": table_mean([entry["score"] for entry in types.values()]),
        "count": len(scored),
        "left_out": sorted(name for name in grouped if name not in VSI_TYPES),
    }


def spar_table(scored: list[tuple[str, float]]) -> dict:
    """SPAR-Bench's table from (question type, score) pairs in item order: per level the mean over its items
    (item-weighted) and its types' means; the overall as the unweighted mean of the level types' means; types
    of no level form `other`."""
    grouped = _by_type(scored)
    levels, type_means = {}, []
    for level, names in SPAR_LEVELS.items():
        values = [score for name, score in scored if name in names]
        if not values:
            continue
        types = {name: {"score": table_mean(grouped[name]), "count": len(grouped[name])}
                 for name in sorted(set(names) & set(grouped))}  # by name, as the script groups them  # fmt: skip
        levels[level] = {"score": table_mean(values), "count": len(values), "types": types}
        type_means += [entry["score"] for entry in types.values()]
    known = {name for names in SPAR_LEVELS.values() for name in names}
    other = sorted(name for name in grouped if name not in known)
    return {
        "levels": levels,
        "overall": table_mean(type_means),
        "count": sum(entry["count"] for entry in levels.values()),
        "other": {"count": sum(len(grouped[name]) for name in other), "types": other},
    }


def summarize(items: list[Item], records: dict, avg_k: int = 1) -> dict:
    """Accuracy overall and per category from the records of `items` ((id, sample) → record).

    `accuracy` is the benchmark's headline number: VSI-Bench's and SPAR-Bench's table overall (see
    `vsi_table`, `spar_table`, also under `vsi` / `spar`), else the mean over items (`mean`, which the
    authors' script prints for every benchmark)."""
    benchmark = items[0].benchmark if items else ""
    scores = item_scores(items, records, avg_k)
    scored = [(item.category, scores[item.id]) for item in items if item.id in scores]
    by_category = sorted(_by_type(scored).items())
    categories = {name: {"accuracy": table_mean(values), "items": len(values)} for name, values in by_category}
    pairs = [records[(item.id, s)] for item in items for s in range(avg_k) if (item.id, s) in records]
    failed = [r for r in pairs if r.get("error")]
    done = [r for r in pairs if not r.get("error")]
    summary = {
        "benchmark": benchmark,
        "accuracy": mean(scores.values()),
        "overall": "mean over items",
        "mean": mean(scores.values()),
        "avg_k": avg_k,
        "items": len(items),
        "items_scored": len(scores),
        "samples": len(done),
        "answered": sum(r.get("answer") is not None for r in done),
        "mean_rounds": statistics.fmean(r.get("rounds") or 0 for r in done) if done else None,
        "errors": len(failed),
        "pending": len(items) * avg_k - len(pairs),
        "categories": categories,
        "error_items": [{"id": r["id"], "sample": r["sample"], "error": r["error"]} for r in failed],
    }
    if VSI_BENCH.search(benchmark):
        summary["vsi"] = vsi_table(scored)
        summary["accuracy"], summary["overall"] = summary["vsi"]["overall"], "mean of the VSI-Bench type means"
        if summary["vsi"]["left_out"]:
            logger.warning("VSI-Bench types outside its table (left out of the overall): %s",
                           summary["vsi"]["left_out"])  # fmt: skip
    elif SPAR_BENCH.search(benchmark):
        summary["spar"] = spar_table(scored)
        summary["levels"] = {level: entry["score"] for level, entry in summary["spar"]["levels"].items()}
        summary["accuracy"] = summary["spar"]["overall"]
        summary["overall"] = "mean of the SPAR-Bench level types' means"
        if summary["spar"]["other"]["types"]:
            logger.warning("SPAR-Bench types in no level (left out of the levels and the overall): %s",
                           summary["spar"]["other"]["types"])  # fmt: skip
    return summary


def format_table(summary: dict) -> str:
    """The per-category table (accuracy in %) that `vilavt eval` prints."""

    def percent(value):
        return "-" if value is None else f"{100 * value:.2f}"

    rows = [(name, str(entry["items"]), percent(entry["accuracy"])) for name, entry in summary["categories"].items()]
    levels = summary.get("spar", {}).get("levels", {})
    rows += [(f"level {name}", str(entry["count"]), percent(entry["score"])) for name, entry in levels.items()]
    if summary["overall"] != "mean over items":
        rows.append(("mean over items", str(summary["items_scored"]), percent(summary["mean"])))
    counted = summary.get("spar", {}).get("count", summary["items_scored"])  # SPAR's overall leaves "Other" out
    rows.append((f"overall ({summary['overall']}, Avg@{summary['avg_k']})", str(counted), percent(summary["accuracy"])))
    width = max(len(row[0]) for row in rows + [("category",)])
    lines = [f"{'category':<{width}}  {'items':>6}  {'acc %':>7}"]
    lines += [f"{name:<{width}}  {count:>6}  {value:>7}" for name, count, value in rows]
    if summary["errors"]:
        lines.append(f"{summary['errors']} sample(s) failed and scored 0 (see error_items)")
    return "\n".join(lines)


# ---- results files ----------------------------------------------------------------------------------


def parse_result_line(line: bytes) -> dict | None:
    """A results line as its record, or None when it cannot be one: not UTF-8 (e.g. cut inside a multi-byte
    character), not a JSON object, or no id, integer sample and numeric score."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
        return None
    number = (int, float)
    if not isinstance(record.get("sample"), int) or not isinstance(record.get("score"), number):
        return None
    if isinstance(record["sample"], bool) or isinstance(record["score"], bool):
        return None
    return record


def read_results(path, benchmark: str, warn: bool = True) -> dict:
    """(id, sample) → the latest record in a results file (none if it does not exist). A line that is not a
    record (an interrupted write, cut anywhere, even inside a character) is skipped, with a warning if `warn`;
    records of another benchmark are an error."""
    path = Path(path)
    records = {}
    if not path.exists():
        return records
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        record = parse_result_line(line)
        if record is None:
            if warn:
                logger.warning("%s:%d: unreadable result line skipped (an interrupted write?)", path, number)
            continue
        if record.get("benchmark") != benchmark:
            raise BenchmarkError(
                f"{path}:{number}: results of benchmark {record.get('benchmark')!r}, not {benchmark!r}; "
                "use another --out file"
            )
        records[(str(record["id"]), record["sample"])] = record
    return records


def repair_last_line(path) -> None:
    """Before appending to a results file: a last line without its newline is completed when it is a whole
    record, and cut off when it is not (a write interrupted mid-line; its pair is redone)."""
    with open(path, "r+b") as results:
        size = results.seek(0, 2)
        if size == 0:
            return
        results.seek(size - 1)
        if results.read(1) == b"\n":
            return
        results.seek(0)
        data = results.read()
        start = data.rfind(b"\n") + 1
        if parse_result_line(data[start:]) is not None:
            results.write(b"\n")
        else:
            logger.warning("%s: dropped an incomplete last line (%d bytes) left by an interrupted run", path,
                           size - start)  # fmt: skip
            results.truncate(start)


def append_results(path, records: list[dict]) -> None:
    """Append records as JSON lines (after repairing a last line an interrupted run left unterminated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        repair_last_line(path)
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with open(path, "ab") as out:  # a lone surrogate (only those fail to encode) becomes its JSON escape \udXXX
        out.write(lines.encode("utf-8", "backslashreplace"))


def result_record(item: Item, sample: int, **fields) -> dict:
    record = dict(benchmark=item.benchmark, id=item.id, sample=sample, answer=None, response=None, gold=item.answer,
                  score=0.0, rounds=0, stop_reason=None, error=None)
    record.update(fields)
    return record


# ---- running a model --------------------------------------------------------------------------------


def resolve_image(image_root, path: str) -> Path:
    return Path(image_root) / path  # an absolute path stays as it is


def load_originals(item: Item, image_root) -> list:
    """The item's images, full resolution; `ImageLoadError` names a missing or unreadable file."""
    return [open_image(resolve_image(image_root, path)) for path in item.images]


def conversation_for(item: Item, originals: list) -> list[dict]:
    """The first user turn: every image (the template adds its index line), then the question."""
    content = [{"type": "image", "image": image} for image in originals]
    content.append({"type": "text", "text": item.question})
    return [{"role": "user", "content": content}]


PREDICTIONS = ("response", "answer")


def generate_rows(model, processor, rows: list[tuple[Item, int, list]], max_rounds: int, max_pixels=None,
                  prediction: str = "response", **generate_kwargs) -> list[dict]:
    """One batched generation for `rows` of (item, sample, original images); one record per row.

    `prediction`: what the metric scores — "response" (default): the final assistant turn's text, from
    which the metric takes the `<answer>` content or else the whole text, as the authors' evaluation
    scores the responses their vLLM evaluator stores; "answer": the extracted answer (first `<answer>`,
    `\\boxed{}` unwrapped; none scores 0), like their HF evaluator's stored responses. Records keep both
    (`answer`, `response`)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    inputs = processor.apply_chat_template(
        [conversation_for(item, originals) for item, _, originals in rows],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
        max_pixels=max_pixels,
    ).to(model.device)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            images=[originals for _, _, originals in rows],
            processor=processor,
            max_rounds=max_rounds,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
    records = []
    for (item, sample, _), trace in zip(rows, output.traces):
        scored = trace.final_turn if prediction == "response" else trace.answer
        score = score_benchmark_answer(scored, item.answer, item.problem_type)
        records.append(result_record(item, sample, answer=trace.answer, response=trace.final_turn, score=score,
                                     rounds=len(trace.rounds), stop_reason=trace.stop_reason))
    return records


def evaluate_batch(model, processor, batch: list[tuple[Item, int]], image_root, max_rounds: int, max_pixels=None,
                   prediction: str = "response", **generate_kwargs) -> list[dict]:
    """Records for a batch of (item, sample): items whose images cannot be loaded are recorded as errors,
    the others are generated together."""
    failed, rows, loaded = [], [], {}
    for item, sample in batch:
        if item.id not in loaded:
            try:
                loaded[item.id] = load_originals(item, image_root)
            except ImageLoadError as err:
                logger.warning("%s item %s: %s", item.benchmark, item.id, err)
                loaded[item.id] = err
        originals = loaded[item.id]
        if isinstance(originals, ImageLoadError):
            failed.append(result_record(item, sample, error=str(originals)))
        else:
            rows.append((item, sample, originals))
    generated = (
        generate_rows(model, processor, rows, max_rounds, max_pixels, prediction, **generate_kwargs) if rows else []
    )
    return failed + generated


def pending_pairs(items: list[Item], records: dict, avg_k: int) -> list[tuple[Item, int]]:
    """(item, sample) pairs without a successful record, item by item: an item's samples are adjacent, so
    they tend to share a batch (and their identical prompts one prefill)."""
    return [
        (item, sample)
        for item in items
        for sample in range(avg_k)
        if (item.id, sample) not in records or records[(item.id, sample)].get("error")
    ]


def run_eval(
    benchmark_path,
    image_root,
    model,
    processor,
    batch_size: int = 1,
    max_rounds: int = 5,
    avg_k: int = 1,
    limit: int | None = None,
    out_path=None,
    progress: bool = True,
    *,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    max_pixels: int | None = None,
    prediction: str = "response",
    instructions=None,
    **generate_kwargs,
) -> dict:
    """Evaluate `model` on a benchmark file through its chatting loop; returns `summarize(...)`.

    Args:
        image_root: the folder image paths are relative to (None: the benchmark file's folder).
        batch_size: rows (item × sample) per `generate` call.
        max_rounds: tool calls allowed per answer.
        avg_k: samples per item (Avg@k); sampling is on by default when k > 1, greedy otherwise.
        limit: evaluate only the first `limit` items.
        out_path: JSONL results file, appended after every batch; pairs already done there are skipped.
        max_new_tokens, do_sample, generate_kwargs: passed to `model.generate` (e.g. temperature).
        max_pixels: the originals' shared pixel budget (default: the processor's).
        prediction: what the metric scores, "response" or "answer" (see `generate_rows`).
        instructions: problem type -> the instruction after the question (default `INSTRUCTIONS`; see
            `build_question`).
    """
    if batch_size < 1 or avg_k < 1:
        raise ValueError(f"batch_size and avg_k must be at least 1, got {batch_size} and {avg_k}")
    items = load_benchmark(benchmark_path, instructions)[:limit]
    image_root = Path(benchmark_path).parent if image_root is None else image_root
    records = read_results(out_path, benchmark_name(benchmark_path)) if out_path else {}
    pending = pending_pairs(items, records, avg_k)
    logger.info("%s: %d items × %d samples, %d to generate", benchmark_name(benchmark_path), len(items), avg_k,
                len(pending))
    if do_sample is None:
        do_sample = avg_k > 1
    if avg_k > 1 and not do_sample:
        logger.warning("avg_k=%d with greedy decoding: the samples of an item will be identical", avg_k)
    generate_kwargs["do_sample"] = do_sample
    if max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = max_new_tokens
    with tqdm(total=len(pending), desc=benchmark_name(benchmark_path), unit="answer", disable=not progress) as bar:
        for start in range(0, len(pending), batch_size):
            batch = evaluate_batch(model, processor, pending[start : start + batch_size], image_root, max_rounds,
                                   max_pixels, prediction, **generate_kwargs)
            if out_path:
                append_results(out_path, batch)
            records.update(((r["id"], r["sample"]), r) for r in batch)
            bar.update(len(batch))
    return summarize(items, records, avg_k)


def dry_run(benchmark_path, image_root) -> dict:
    """Build every question and check every image path, without a model.

    Returns {"items", "parsed" (questions built, whether or not their images exist), "missing_images"
    (image references with no file), "errors" (items that cannot be used; each is logged)}."""
    benchmark = benchmark_name(benchmark_path)
    image_root = Path(benchmark_path).parent if image_root is None else image_root
    records = read_benchmark_records(benchmark_path)
    parsed = missing = errors = 0
    for position, record in enumerate(records):
        try:
            item = parse_item(record, benchmark, position)
        except ValueError as err:
            errors += 1
            logger.warning("%s: %s %s", benchmark_path, item_label(record, position), err)
            continue
        parsed += 1
        for path in item.images:
            if not resolve_image(image_root, path).is_file():
                missing += 1
                logger.debug("%s item %s: missing image %s", benchmark, item.id, resolve_image(image_root, path))
    if missing:
        logger.warning("%s: %d image reference(s) have no file under %s", benchmark, missing, image_root)
    return {"items": len(records), "parsed": parsed, "missing_images": missing, "errors": errors}


# ---- the command ------------------------------------------------------------------------------------


def default_out_path(benchmark_path, model: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(model)).name or str(model)).strip("-") or "model"
    return Path(f"{benchmark_name(benchmark_path)}.{tag}.results.jsonl")


__all__ = [
    "Item",
    "BenchmarkError",
    "load_benchmark",
    "read_benchmark_records",
    "parse_item",
    "build_question",
    "load_instructions",
    "replace_image_tags",
    "canonical_problem_type",
    "score_benchmark_answer",
    "score_multiple_choice",
    "score_numerical",
    "score_regression",
    "score_view_change",
    "parse_view_change",
    "VIEW_CHANGE_PAIRS",
    "summarize",
    "format_table",
    "read_results",
    "run_eval",
    "dry_run",
]

"""Multi-turn trajectories for SFT: the JSONL schema, the replay builder and the collator.

One JSON object per line:

    {
      "id": "synth-000001",                       optional, used in error messages
      "images": ["scene.png", ...],               original images; relative paths resolve against
                                                  the image root (default: the JSONL file's folder)
      "question": "What digit is inside the red frame?",
      "problem_type": "multiple choice",          see vilavt.rewards.problem_kind
      "answer": "7",                              gold answer
      "turns": [
        {"thought": "Too small to read; zoom in.",
         "query": "the digit inside the red frame",
         "regions": [{"index": 0, "bbox_2d": [x1, y1, x2, y2]}]},     or "bbox_norm": [0..1 x4]
        {"thought": "It is a 7.", "answer": "7"}
      ],
      "max_pixels": 200704,                       optional: the originals' shared pixel budget
      "max_rounds": 5                             optional: the round budget the model was under
    }

`bbox_2d` is in displayed pixels of image `index` (an original or an earlier crop), exactly what the
model writes; `bbox_norm` is relative to that image and is converted to its displayed pixels.

`load_trajectories` checks every row when the file is read (types, the problem type, boxes) and names the line,
the trajectory id and the field of the first problem. Text that spells a control token (`<|image_pad|>`) is
encoded as text, as in the chatting loop. Rows without `turns` are question rows (GRPO); `require_turns=True` asks for trajectories.

The builder replays the tool calls through the same code as inference (protocol parsing, cropping
from the full-resolution originals, the chat template): crops are regenerated, never stored.
Labels cover the assistant turns (their text, `<|im_end|>` and the newline after it); system, user,
tool-response and image tokens get -100 (REFERENCE.md §4.1, §4.3).
"""

import json
import math
from pathlib import Path

import torch

from .remote_code.generation_vilavt import Episode, episodes_from_inputs, full_inputs, tool_response
from .remote_code.processing_vilavt import TURN_END, open_image
from .remote_code.protocol_vilavt import render_answer, render_tool_call
from .rewards import problem_kind

IGNORE_INDEX = -100


class TrajectoryError(ValueError):
    """A trajectory that cannot be replayed; the message names it and the turn."""


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not UTF-8, not JSON or not an object is an
    error naming the line."""
    rows = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TrajectoryError(f"{path}:{number}: not UTF-8 text (byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                reason = f"{err.msg}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else "nested too deeply"
                raise TrajectoryError(f"{path}:{number}: invalid JSON ({reason})") from None
            if not isinstance(row, dict):
                raise TrajectoryError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def model_text(tokenizer, text: str) -> list[int]:
    """Token ids of text the model writes: a control-token string in it (`<|image_pad|>`, `<|im_end|>`) is spelled
    out as text, as the chatting loop's sampling would give it (it never samples control tokens)."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def check_text(value, name: str, allow_empty: bool = True) -> None:
    if not isinstance(value, str):
        raise TrajectoryError(f"{name}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise TrajectoryError(f"{name}: must not be empty")


def _numbers(value, name: str, low=None, high=None) -> None:
    if not (isinstance(value, list) and len(value) == 4):
        raise TrajectoryError(f"{name}: expected 4 numbers [x1, y1, x2, y2], got {json.dumps(value)[:60]}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TrajectoryError(f"{name}: expected 4 numbers, got {json.dumps(value)[:60]}")
        if low is not None and not low <= v <= high:
            raise TrajectoryError(f"{name}: values must lie in [{low}, {high}], got {json.dumps(value)[:60]}")


def _positive_int(row: dict, key: str, minimum: int = 1) -> None:
    if key in row and (isinstance(row[key], bool) or not isinstance(row[key], int) or row[key] < minimum):
        raise TrajectoryError(f"{key}: expected an integer >= {minimum}, got {json.dumps(row[key])[:40]}")


def check_answer_fields(row: dict) -> None:
    """`question`, `problem_type` (a known kind) and `answer` of a trajectory or question row."""
    check_text(row.get("question"), "question", allow_empty=False)
    try:
        problem_kind(row.get("problem_type"))
    except ValueError as err:
        raise TrajectoryError(f"problem_type: {err}") from None
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TrajectoryError(f"answer: expected a string or a number, got {json.dumps(answer)[:40]}")
    check_text(str(answer), "answer", allow_empty=False)


def check_trajectory(row: dict, require_turns: bool = True) -> None:
    """Raise `TrajectoryError` (naming the field) if `row` does not follow the schema above."""
    images = row.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise TrajectoryError(f"images: expected a non-empty list of image paths, got {json.dumps(images)[:60]}")
    check_answer_fields(row)
    _positive_int(row, "max_pixels")
    _positive_int(row, "max_rounds", minimum=0)
    if "turns" not in row and not require_turns:
        return
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise TrajectoryError("turns: expected a non-empty list of turn objects")
    for k, turn in enumerate(turns):
        where = f"turns[{k}]"
        if "thought" in turn:
            check_text(turn["thought"], f"{where}.thought")
        if "answer" in turn:
            if k != len(turns) - 1:
                raise TrajectoryError(f"{where}.answer: only the last turn may answer")
            check_text(str(turn["answer"]), f"{where}.answer", allow_empty=False)
            continue
        if k == len(turns) - 1:
            raise TrajectoryError(f"{where}: the last turn must give the answer")
        check_text(turn.get("query"), f"{where}.query", allow_empty=False)
        regions = turn.get("regions")
        if not isinstance(regions, list) or not regions or not all(isinstance(r, dict) for r in regions):
            raise TrajectoryError(f"{where}.regions: expected a non-empty list of region objects")
        for j, region in enumerate(regions):
            name = f"{where}.regions[{j}]"
            index = region.get("index")
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise TrajectoryError(f"{name}.index: expected an image index >= 0, got {json.dumps(index)}")
            if "bbox_2d" in region:
                _numbers(region["bbox_2d"], f"{name}.bbox_2d")
            elif "bbox_norm" in region:
                _numbers(region["bbox_norm"], f"{name}.bbox_norm", 0, 1)
            else:
                raise TrajectoryError(f'{name}: a region needs "bbox_2d" or "bbox_norm"')


def row_name(row: dict) -> str:
    return f"trajectory {row['id']!r}" if isinstance(row.get("id"), (str, int)) else "a row without id"


def resolve_images(paths: list[str], root: Path) -> list[str]:
    """Image references with relative paths made absolute against `root` (URLs and data URIs kept as they are)."""
    return [p if "://" in p or p.startswith("data:") or Path(p).is_absolute() else str(root / p) for p in paths]


def load_trajectories(path, image_root=None, require_turns: bool = False) -> list[dict]:
    """Read and check a JSONL file of trajectories (or question rows); a bad row is an error naming the line, the
    trajectory id and the field. Relative image paths are made absolute against `image_root` (default: the file's
    folder)."""
    root = Path(image_root) if image_root is not None else Path(path).resolve().parent
    rows = []
    for number, row in read_jsonl(path):
        try:
            check_trajectory(row, require_turns)
        except TrajectoryError as err:
            raise TrajectoryError(f"{path}:{number} ({row_name(row)}): {err}") from None
        rows.append({**row, "images": resolve_images(row["images"], root)})
    return rows


def _display_box(region: dict, episode: Episode, where: str) -> list[int]:
    index = region.get("index")
    if not isinstance(index, int) or not 0 <= index < len(episode.ledger):
        raise TrajectoryError(f"{where}: image index {index!r} does not exist yet ({len(episode.ledger)} images)")
    if "bbox_2d" in region:
        return list(region["bbox_2d"])
    if "bbox_norm" in region:
        view = episode.ledger.entries[index]
        x1, y1, x2, y2 = region["bbox_norm"]
        return [round(x1 * view.width), round(y1 * view.height), round(x2 * view.width), round(y2 * view.height)]
    raise TrajectoryError(f'{where}: a region needs "bbox_2d" or "bbox_norm"')


def prompt_episode(messages: list[dict], images: list, processor, config, max_pixels: int | None = None) -> Episode:
    """An Episode holding a conversation's prompt (`messages` up to the assistant's turn; image items without an
    image are filled from `images`, paths or PIL images), as the chatting loop starts it."""
    originals = [open_image(image) for image in images]
    inputs = processor.apply_chat_template(
        messages,
        images=originals,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        max_pixels=max_pixels,
    )
    (episode,) = episodes_from_inputs(
        config,
        processor,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        inputs["image_grid_thw"],
        inputs["query_ids"],
        inputs["query_attention_mask"],
        inputs["image_to_query_mapping"],
        [originals],
    )
    return episode


def _extend(episode: Episode, ids: list[int], trained: bool) -> None:
    episode.ids += ids
    episode.sampled += [trained] * len(ids)


def build_episode(row: dict, processor, config, image_root=None, max_rounds: int | None = None) -> Episode:
    """Replay a trajectory into an Episode: the conversation's tokens, images and queries.
    `episode.sampled` marks the tokens trained on (the model's turns, each with its closing
    `<|im_end|>` and newline). Relative image paths resolve against `image_root` (default: the working
    directory; `load_trajectories` has already made them absolute)."""
    name = row.get("id", "<trajectory>")
    root = Path(image_root) if image_root is not None else Path(".")
    images = resolve_images(row["images"], root)
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": row["question"]}]}]
    episode = prompt_episode(messages, images, processor, config, row.get("max_pixels"))
    budget = row.get("max_rounds", 5 if max_rounds is None else max_rounds)
    turns = row.get("turns") or []
    if not turns or "answer" not in turns[-1]:
        raise TrajectoryError(f"{name}: the last turn must give the answer")
    tokenizer = processor.tokenizer

    def extend(ids, trained):
        _extend(episode, ids, trained)

    for k, turn in enumerate(turns):
        where = f"{name}, turn {k}"
        if "answer" in turn:
            if k != len(turns) - 1:
                raise TrajectoryError(f"{where}: only the last turn may answer")
            extend(model_text(tokenizer, render_answer(str(turn["answer"]), turn.get("thought", ""))), True)
            extend(tokenizer.encode(TURN_END, add_special_tokens=False), True)
            break
        if k >= budget:
            raise TrajectoryError(f"{where}: more tool calls than the round budget ({budget})")
        regions = [(r["index"], _display_box(r, episode, where)) for r in turn.get("regions", [])]
        text = render_tool_call(regions, turn.get("query", ""), turn.get("thought", ""))
        written = model_text(tokenizer, text)
        extend(written, True)
        response = tool_response(episode, processor, text, final=k + 1 >= budget)
        if response.error is not None:
            raise TrajectoryError(f"{where}: the tool call fails on replay: {response.error}")
        episode.add_tool_response(response, generated_tokens=len(written))
        extend(response.ids[: response.closing], True)
        extend(response.ids[response.closing :], False)
    episode.turn_start = len(episode.ids)
    return episode


def build_conversation_episode(row: dict, processor, config) -> Episode:
    """A TRL conversational row (`messages` + `images`) as an Episode: the messages before the assistant's turn
    are the prompt (rendered by the chat template, so the ViLaVT system prompt applies unless the row has its own);
    the assistant's text, with its `<|im_end|>` and newline, is what trains."""
    messages, images = row["messages"], row.get("images") or []
    episode = prompt_episode(messages[:-1], images, processor, config, row.get("max_pixels"))
    content = messages[-1]["content"]
    text = content if isinstance(content, str) else "".join(item.get("text") or "" for item in content)
    tokenizer = processor.tokenizer
    _extend(episode, model_text(tokenizer, text), True)
    _extend(episode, tokenizer.encode(TURN_END, add_special_tokens=False), True)
    episode.turn_start = len(episode.ids)
    return episode


def runs_of_model_turns(episode: Episode) -> list[tuple[int, int]]:
    """(start, end) of each run of tokens the model writes (`episode.sampled`), in order."""
    runs, start = [], None
    for position, written in enumerate([*episode.sampled, False]):
        if written and start is None:
            start = position
        elif not written and start is not None:
            runs.append((start, position))
            start = None
    return runs


class TrajectoryCollator:
    """Turns trajectory rows into a padded training batch: model inputs for every conversation (all
    images; query rows offset per sample in `image_to_query_mapping`) and labels on assistant tokens.

    Rows are trajectory dicts or TRL conversational rows (`messages` + `images`, see
    `build_conversation_episode`), or dataset rows holding either as a JSON string under `trajectory`."""

    def __init__(self, processor, config, image_root=None, max_rounds: int = 5):
        self.processor, self.config = processor, config
        self.image_root, self.max_rounds = image_root, max_rounds
        self.pad_id = processor.tokenizer.pad_token_id or 0

    def __call__(self, features: list[dict]) -> dict:
        rows = [json.loads(f["trajectory"]) if "trajectory" in f else f for f in features]
        episodes = [
            build_conversation_episode(row, self.processor, self.config)
            if "messages" in row
            else build_episode(row, self.processor, self.config, self.image_root, self.max_rounds)
            for row in rows
        ]
        batch = full_inputs(episodes, self.pad_id, padding_side="right")
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, episode in enumerate(episodes):
            ids = torch.tensor(episode.ids)
            labels[row, : len(ids)] = torch.where(torch.tensor(episode.sampled), ids, IGNORE_INDEX)
        batch["labels"] = labels
        return batch


def as_dataset(rows: list[dict]):
    """A `datasets.Dataset` with one JSON-encoded trajectory per row (TRL trainers want a Dataset;
    JSON keeps the nested, optional fields intact)."""
    from datasets import Dataset

    return Dataset.from_dict({"trajectory": [json.dumps(row) for row in rows]})

"""Training data for both stages, read from a JSONL file and checked row by row when it is loaded.

SFT accepts
* ViLaVT trajectories (`vilavt.trajectories`: `images`, `question`, `problem_type`, `answer`, `turns`), or
* TRL's conversational format: `messages` (a user turn with image items and text, then one assistant turn,
  optionally after a system turn) and `images` (paths); only the assistant's text trains.

GRPO accepts
* ViLaVT question rows (`images`, `question`, `answer`, `problem_type`; trajectories also work, their turns
  unused), or
* TRL's format: `prompt` (text, or a conversation whose user turn may hold image items) with `image` or `images`
  (paths) and `answer` or `solution` (optional `problem_type`, default "free text").

Relative image paths resolve against `image_root` (default: the file's folder). A file in neither shape is an
error naming the columns found and expected; a bad row names its line.
"""

import json
from pathlib import Path

from ..rewards import problem_kind
from ..trajectories import (
    TrajectoryError,
    check_text,
    check_answer_fields,
    check_trajectory,
    read_jsonl,
    resolve_images,
    row_name,
)

SFT_SHAPES = {
    "trajectory": ("images", "question", "problem_type", "answer", "turns"),
    "conversational": ("messages", "images"),
}
GRPO_SHAPES = {
    "question": ("images", "question", "answer", "problem_type"),
    "TRL prompt": ("prompt", "image(s)", "answer or solution"),
}


def _shape_error(path, stage: str, row: dict, shapes: dict) -> TrajectoryError:
    expected = "; or ".join(f"{name}: {', '.join(columns)}" for name, columns in shapes.items())
    return TrajectoryError(
        f"{path}: no {stage} data shape fits its columns ({', '.join(sorted(row)) or 'none'}); expected {expected}"
    )


def _root(path, image_root) -> Path:
    return Path(image_root) if image_root is not None else Path(path).resolve().parent


def _rows(path, image_root, stage: str, shapes: dict, convert):
    """Rows of `path`, each converted by `convert(row, root)`, errors named by line and trajectory id."""
    if not Path(path).is_file():
        raise TrajectoryError(f"{path}: no such file")
    root, rows = _root(path, image_root), read_jsonl(path)
    if not rows:
        raise TrajectoryError(f"{path}: no rows")
    out = []
    for number, row in rows:
        try:
            converted = convert(row, root)
        except TrajectoryError as err:
            raise TrajectoryError(f"{path}:{number} ({row_name(row)}): {err}") from None
        if converted is None:
            raise _shape_error(f"{path}:{number}", stage, row, shapes)
        out.append(converted)
    return out


# ---- SFT -----------------------------------------------------------------------------------------------------


def _image_paths(value, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise TrajectoryError(f"{name}: expected image paths, got {json.dumps(value)[:60]}")
    return value


def _content_images(content) -> int:
    return (
        sum(1 for item in content if isinstance(item, dict) and item.get("type") == "image")
        if isinstance(content, list)
        else 0
    )


def _check_message(message, name: str) -> None:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise TrajectoryError(f"{name}: expected a message with role system, user or assistant")
    content = message.get("content")
    if isinstance(content, str):
        check_text(content, f"{name}.content")
        return
    if not isinstance(content, list) or not all(isinstance(item, dict) for item in content):
        raise TrajectoryError(f"{name}.content: expected text or a list of content items")
    for k, item in enumerate(content):
        if item.get("type") == "text":
            check_text(item.get("text"), f"{name}.content[{k}].text")
        elif item.get("type") != "image":
            raise TrajectoryError(
                f"{name}.content[{k}]: expected an item of type text or image, got {item.get('type')!r}"
            )


def check_conversation(row: dict) -> None:
    """A TRL conversational SFT row: [system,] user, assistant; as many image items as `images`."""
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise TrajectoryError("messages: expected a non-empty list of messages")
    for k, message in enumerate(messages):
        _check_message(message, f"messages[{k}]")
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise TrajectoryError(
            f"messages: expected [system,] user, assistant turns, got {', '.join(roles)} "
            "(multi-turn tool use: write ViLaVT trajectories, whose tool responses are replayed)"
        )
    images = _image_paths(row.get("images", []), "images")
    placed = sum(_content_images(m["content"]) for m in messages)
    if placed != len(images):
        raise TrajectoryError(f"images: {len(images)} images for {placed} image items in the messages")


def _sft_row(row: dict, root: Path) -> dict | None:
    if "messages" in row:
        check_conversation(row)
        return {**row, "images": resolve_images(_image_paths(row.get("images", []), "images"), root)}
    if "turns" in row or "question" in row:
        check_trajectory(row, require_turns=True)
        return {**row, "images": resolve_images(row["images"], root)}
    return None


def load_sft_rows(path, image_root=None) -> list[dict]:
    """SFT rows (trajectories or TRL conversations), checked, image paths absolute."""
    return _rows(path, image_root, "SFT", SFT_SHAPES, _sft_row)


def sft_dataset(rows: list[dict]):
    """A `datasets.Dataset` with one JSON-encoded row per example (the nested, optional fields stay intact)."""
    from datasets import Dataset

    return Dataset.from_dict({"trajectory": [json.dumps(row) for row in rows]})


# ---- GRPO ----------------------------------------------------------------------------------------------------


def _prompt(question, images: list[str]) -> list[dict]:
    """A user turn: the images (by path), then the question."""
    return [
        {
            "role": "user",
            "content": [*({"type": "image", "image": p} for p in images), {"type": "text", "text": question}],
        }
    ]


def _place_images(messages: list, images: list[str]) -> list[dict]:
    """A conversational prompt with the image paths filled into its image items (in order); without image items,
    the images go first in the first user turn (as TRL does)."""
    for k, message in enumerate(messages):
        _check_message(message, f"prompt[{k}]")
    placed = sum(_content_images(m["content"]) for m in messages)
    if placed and placed != len(images):
        raise TrajectoryError(f"images: {len(images)} images for {placed} image items in the prompt")
    pending, out, first_user = list(images), [], True
    for message in messages:
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(item) for item in content]
        for item in items:
            if item["type"] == "image":
                item["image"] = pending.pop(0)
        if message["role"] == "user" and first_user and not placed:
            items = [{"type": "image", "image": p} for p in pending] + items
            first_user = False
        out.append({"role": message["role"], "content": items})
    return out


def _grpo_row(row: dict, root: Path) -> dict | None:
    if "question" in row:
        check_trajectory(row, require_turns=False)
        prompt = _prompt(row["question"], resolve_images(row["images"], root))
        return {"prompt": prompt, "answer": str(row["answer"]), "problem_type": problem_kind(row["problem_type"])}
    if "prompt" not in row or not ({"image", "images"} & set(row)) or not ({"answer", "solution"} & set(row)):
        return None
    images = resolve_images(_image_paths(row.get("images", row.get("image")), "images"), root)
    answer_key = "answer" if "answer" in row else "solution"
    fields = {"question": "<prompt>", "problem_type": row.get("problem_type", "free text"), "answer": row[answer_key]}
    try:
        check_answer_fields(fields)
    except TrajectoryError as err:
        raise TrajectoryError(str(err).replace("answer:", f"{answer_key}:", 1)) from None
    if isinstance(row["prompt"], str):
        check_text(row["prompt"], "prompt", allow_empty=False)
        prompt = _prompt(row["prompt"], images)
    elif isinstance(row["prompt"], list) and row["prompt"]:
        prompt = _place_images(row["prompt"], images)
    else:
        raise TrajectoryError("prompt: expected text or a list of messages")
    return {"prompt": prompt, "answer": str(fields["answer"]), "problem_type": problem_kind(fields["problem_type"])}


def load_grpo_rows(path, image_root=None) -> list[dict]:
    """GRPO rows: `prompt` (a conversation whose image items hold absolute paths), `answer`, `problem_type`."""
    return _rows(path, image_root, "GRPO", GRPO_SHAPES, _grpo_row)


def grpo_dataset(rows: list[dict]):
    """A `datasets.Dataset` of GRPO rows. The images live in the prompt's image items, not in an `images` column, so
    TRL does no image processing of its own (the rollouts render and encode them)."""
    from datasets import Dataset

    return Dataset.from_list(rows)


__all__ = ["load_sft_rows", "sft_dataset", "load_grpo_rows", "grpo_dataset", "check_conversation"]

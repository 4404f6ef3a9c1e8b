"""Multi-turn trajectories for SFT: the JSONL schema, the replay builder and the collator.

One JSON object per line:

    {
      "id": "synth-000001",                       optional, used in error messages
      "images": ["scene.png", ...],               original images; relative paths resolve against
                                                  the image root (default: the JSONL's folder)
      "question": "What digit is inside the red frame?",
      "problem_type": "multiple choice",          see vilavt.rewards.PROBLEM_TYPES
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

The builder replays the tool calls through the same code as inference (protocol parsing, cropping
from the full-resolution originals, the chat template): crops are regenerated, never stored.
Labels cover the assistant turns (their text, `<|im_end|>` and the newline after it); system, user,
tool-response and image tokens get -100 (REFERENCE.md §4.1, §4.3).
"""

import json
from pathlib import Path

import torch

from .remote_code.generation_vilavt import Episode, episodes_from_inputs, full_inputs, tool_response
from .remote_code.processing_vilavt import TURN_END, open_image
from .remote_code.protocol_vilavt import render_answer, render_tool_call

IGNORE_INDEX = -100


class TrajectoryError(ValueError):
    """A trajectory that cannot be replayed; the message names it and the turn."""


def load_trajectories(path) -> list[dict]:
    """Read a JSONL file of trajectories; a malformed line is an error naming the line."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TrajectoryError(f"{path}:{number}: invalid JSON ({err.msg}, column {err.colno})") from None
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


def build_episode(row: dict, processor, config, image_root=None, max_rounds: int | None = None) -> Episode:
    """Replay a trajectory into an Episode: the conversation's tokens, images and queries.
    `episode.sampled` marks the tokens trained on (the model's turns, each with its closing
    `<|im_end|>` and newline)."""
    name = row.get("id", "<trajectory>")
    root = Path(image_root) if image_root is not None else Path(".")
    originals = [open_image(path if Path(path).is_absolute() else root / path) for path in row["images"]]
    messages = [
        {
            "role": "user",
            "content": [*({"type": "image", "image": im} for im in originals), {"type": "text", "text": row["question"]}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        max_pixels=row.get("max_pixels"),
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
    budget = row.get("max_rounds", max_rounds or 5)
    turns = row.get("turns") or []
    if not turns or "answer" not in turns[-1]:
        raise TrajectoryError(f"{name}: the last turn must give the answer")
    tokenizer = processor.tokenizer

    def model_text(text: str) -> list[int]:
        # What the model writes is text: a special-token string in it is spelled out, as the loop's sampling would.
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def extend(ids, trained):
        episode.ids += ids
        episode.sampled += [trained] * len(ids)

    for k, turn in enumerate(turns):
        where = f"{name}, turn {k}"
        if "answer" in turn:
            if k != len(turns) - 1:
                raise TrajectoryError(f"{where}: only the last turn may answer")
            extend(model_text(render_answer(str(turn["answer"]), turn.get("thought", ""))), True)
            extend(tokenizer.encode(TURN_END, add_special_tokens=False), True)
            break
        if k >= budget:
            raise TrajectoryError(f"{where}: more tool calls than the round budget ({budget})")
        regions = [(r["index"], _display_box(r, episode, where)) for r in turn.get("regions", [])]
        text = render_tool_call(regions, turn.get("query", ""), turn.get("thought", ""))
        written = model_text(text)
        extend(written, True)
        response = tool_response(episode, processor, text, final=k + 1 >= budget)
        if response.error is not None:
            raise TrajectoryError(f"{where}: the tool call fails on replay: {response.error}")
        episode.add_tool_response(response, generated_tokens=len(written))
        extend(response.ids[: response.closing], True)
        extend(response.ids[response.closing :], False)
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

    Rows are trajectory dicts, or dataset rows holding one as a JSON string under `trajectory`."""

    def __init__(self, processor, config, image_root=None, max_rounds: int = 5):
        self.processor, self.config = processor, config
        self.image_root, self.max_rounds = image_root, max_rounds
        self.pad_id = processor.tokenizer.pad_token_id or 0

    def __call__(self, features: list[dict]) -> dict:
        rows = [json.loads(f["trajectory"]) if "trajectory" in f else f for f in features]
        episodes = [build_episode(row, self.processor, self.config, self.image_root, self.max_rounds) for row in rows]
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

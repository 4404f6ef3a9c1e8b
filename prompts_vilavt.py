"""Prompt text as checkpoint data: every piece of text the processor renders around images, questions and
tool responses, saved next to the chat template as `prompt_templates.json`.

A checkpoint trained on exact bytes behaves differently on a paraphrase, so the wording belongs to the
checkpoint, not to the code: the project's own wording (`full`, `compact`) is the default for models this
project trains, and `vilavt prompts import` reads the authors' wording from a user's checkout into a
checkpoint (the project ships none of their sentences).

How a conversation is assembled (the layout of the authors' builders; STRUCTURE.md in the test fixtures):

* first user turn: each original image, then `image_index` (`{index}`); then one `user` text with
  `{image_instruction}` = `single_image` (`{width}`, `{height}`) for one image or `multi_image`
  (`{n_frames}`, `{n_frames_1}`, `{width}`, `{height}`) for several images or video frames, with the size
  of image 0 (`size_from="first"`, the RL dataset) or of the last image (`"last"`, the vLLM evaluator);
  `{question}` is the user's text.
* tool response: `<tool_response>`, each crop followed by `crop_index` (`{current_image_idx}`, `{width}`,
  `{height}`: the crop's global index and final size), an `error` line (`{message}`) for a failed call,
  `note` lines (`{note}`), then `response` while calls are left or `response_final` on the last allowed
  round, then `</tool_response>`.

Python's `str.format` is the authors' semantics, so it is done here, not in Jinja: slots with placeholders
are `.format`-ed (their `{{ }}` become `{ }`; the arguments, e.g. the question, keep their braces as
written), slots without placeholders are used verbatim (their `{{ }}` reach the model doubled). The chat
template only concatenates the items built here.

`on_error` says what a failed tool call does: "budget" (the error, then `response` or `response_final` by
the round budget: this project's behaviour), "final" (the error, then `response_final`: the authors'
evaluators) or "end" (the episode ends, no tool response: the authors' RL rollout; a rendered failed call
is then shown as "final" does).
"""

import json
import os
import string
from dataclasses import asdict, dataclass, fields

PROMPTS_FILE = "prompt_templates.json"
FORMAT_VERSION = 1
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

# Each slot's `.format` arguments, in the order the renderer passes them; () = never formatted (verbatim).
SLOTS = {
    "system": (),
    "image_index": ("index",),
    "single_image": ("width", "height"),
    "multi_image": ("n_frames", "n_frames_1", "width", "height"),
    "user": ("image_instruction", "question"),
    "crop_index": ("current_image_idx", "width", "height"),
    "response": (),
    "response_final": (),
    "error": ("message",),
    "note": ("note",),
}
ON_ERROR = ("budget", "final", "end")
SIZE_FROM = ("first", "last")


class PromptTemplateError(ValueError):
    """A templates file or template that the renderer cannot use; the message names the slot."""


def placeholders(text: str) -> list[str]:
    """The `str.format` fields of `text` in order of appearance (repeats kept); raises ValueError on a
    malformed format string (a lone brace) or a field inside a format spec."""
    parsed = list(string.Formatter().parse(text))
    if any(spec and "{" in spec for _, _, spec, _ in parsed):
        raise ValueError("a field inside a format spec")
    return [name for _, name, _, _ in parsed if name is not None]


def check_placeholders(text: str, needed, what: str) -> None:
    """`text` must have exactly the fields `needed` (plain names; each at least once)."""
    try:
        found = placeholders(text)
    except ValueError as err:
        raise PromptTemplateError(f"{what} is not a valid format string ({err})") from None
    if set(found) != set(needed) or any(not name.isidentifier() for name in found):
        shown = ", ".join("{" + name + "}" for name in dict.fromkeys(found)) or "none"
        raise PromptTemplateError(
            f"{what} has placeholders {shown}; the renderer needs {', '.join('{' + n + '}' for n in needed)}"
        )


def is_image_item(item) -> bool:
    # Datasets (Arrow) give every content item every key, with None where unused.
    return isinstance(item, dict) and (
        item.get("type") == "image" or item.get("image") is not None or item.get("image_url") is not None
    )


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(item.get("text") or "" for item in content or [] if isinstance(item, dict) and item.get("type") == "text")


def _item(text: str) -> dict:
    return {"type": "text", "text": text}


@dataclass(frozen=True)
class PromptTemplates:
    """Every piece of prompt text a ViLaVT processor renders (see the module docstring for the slots)."""

    system: str
    image_index: str
    single_image: str
    multi_image: str
    user: str
    crop_index: str
    response: str
    response_final: str
    error: str
    note: str
    on_error: str = "budget"
    size_from: str = "first"
    name: str = ""

    def __post_init__(self):
        for slot, needed in SLOTS.items():
            value = getattr(self, slot)
            if not isinstance(value, str):
                raise PromptTemplateError(f"prompt template {slot!r} must be a string, got {type(value).__name__}")
            if needed and not (slot == "note" and value == ""):  # an empty note template says nothing
                check_placeholders(value, needed, f"prompt template {slot!r}")
        if self.on_error not in ON_ERROR:
            raise PromptTemplateError(f"on_error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.size_from not in SIZE_FROM:
            raise PromptTemplateError(f"size_from must be one of {', '.join(SIZE_FROM)}, got {self.size_from!r}")

    # ---- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"prompt_templates_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "prompt templates") -> "PromptTemplates":
        if not isinstance(data, dict):
            raise PromptTemplateError(f"{where}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("prompt_templates_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise PromptTemplateError(f"{where}: prompt_templates_version {version!r} (this code reads {FORMAT_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), [slot for slot in SLOTS if slot not in data]
        if unknown or missing:
            raise PromptTemplateError(f"{where}: unknown keys {unknown}, missing keys {missing}")
        try:
            return cls(**data)
        except PromptTemplateError as err:
            raise PromptTemplateError(f"{where}: {err}") from None

    @classmethod
    def load(cls, path) -> "PromptTemplates":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PromptTemplateError(f"{path}: not a JSON prompt-templates file ({err})") from None
        return cls.from_dict(data, where=path)

    def save(self, path) -> str:
        path = os.fspath(path)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        return path

    # ---- rendering ------------------------------------------------------------------------------

    def first_turn_text(self, images: list[dict], question: str) -> str:
        """The text item that ends a user turn holding `images` (sized image items)."""
        shown = images[0] if self.size_from == "first" else images[-1]
        width, height = shown["width"], shown["height"]
        if len(images) == 1:
            instruction = self.single_image.format(width=width, height=height)
        else:
            count = len(images)
            instruction = self.multi_image.format(n_frames=count, n_frames_1=count - 1, width=width, height=height)
        return self.user.format(image_instruction=instruction, question=question)

    def tool_response_content(self, message: dict, first_index: int) -> list[dict]:
        """The content items of a tool response (`first_index`: the global index of its first crop unless
        the crop items carry their own `index`)."""
        content = message.get("content")
        items = [_item(TOOL_RESPONSE_OPEN)]
        if isinstance(content, str):
            items.append(_item(content))
        else:
            count = first_index
            for item in content or []:
                if is_image_item(item):
                    index = count if item.get("index") is None else item["index"]
                    line = self.crop_index.format(current_image_idx=index, width=item["width"], height=item["height"])
                    items += [item, _item(line)]
                    count += 1
                elif isinstance(item, dict) and item.get("type") == "text":
                    items.append(item)
        error = message.get("error")
        if error is not None:
            items.append(_item(self.error.format(message=error)))
        if self.note:
            items += [_item(self.note.format(note=note)) for note in message.get("notes") or ()]
        final = bool(message.get("final")) or (error is not None and self.on_error != "budget")
        items.append(_item((self.response_final if final else self.response) + TOOL_RESPONSE_CLOSE))
        return items

    def render(self, conversation: list[dict]) -> list[dict]:
        """`conversation` (image items sized: `width` / `height` set) as messages whose content the chat
        template concatenates: the default system prompt first when the conversation starts with a user
        turn, the prompt text around each user turn that holds images, the tool responses' text."""
        rendered = []
        if conversation and conversation[0].get("role") == "user":
            rendered.append({"role": "system", "content": self.system})
        count = 0  # images so far: a global index over originals and crops
        for message in conversation:
            role, content = message.get("role"), message.get("content")
            if role == "tool":
                items = self.tool_response_content(message, count)
                count += sum(is_image_item(item) for item in items)
                message = {"role": "tool", "content": items}
            elif role == "user" and isinstance(content, list) and any(is_image_item(item) for item in content):
                images = [item for item in content if is_image_item(item)]
                items = []
                for image in images:
                    items += [image, _item(self.image_index.format(index=count))]
                    count += 1
                message = {**message, "content": items + [_item(self.first_turn_text(images, _text(content)))]}
            rendered.append(message)
        return rendered


def _braces(text: str) -> str:
    """Literal text inside a `.format`-ed slot."""
    return text.replace("{", "{{").replace("}", "}}")


# ---- the project's own wording (models this project trains) ---------------------------------------------

_IMAGE_INDEX = "[image {index}]\n"
_SINGLE_IMAGE = "There is 1 image, image 0, displayed at {width} x {height} pixels."
_MULTI_IMAGE = "There are {n_frames} images, image 0 to image {n_frames_1}; image 0 is displayed at {width} x {height} pixels."
_QUESTION = "{image_instruction}\n\nTask: {question}\n\n"
_CROP_INDEX = "[image {current_image_idx}: zoomed view, {width} x {height} pixels]\n"
_ERROR = "[tool error] {message}\n"
_NOTE = "Note: {note}\n"

_FULL_SYSTEM = """You are a visual assistant that can inspect images in detail. The user shows you one or more images and asks something about them. Details that are too small to make out at first sight can be examined with the zoom-in tool: it crops the boxes you name from the originals at full resolution, and the vision encoder reads those crops again while attending to your query, so each zoomed view comes back focused on what you asked about. You may zoom several times, also into views you zoomed before.

# The zoom-in tool

Call it with one JSON object between <tool> and </tool>:
<tool>
{"region": [{"index": int, "bbox_2d": [x1, y1, x2, y2]}, ...], "query": str}
</tool>

- region: one entry per box. "index" picks an image by its number: the originals are numbered from 0 in the order shown, and every zoomed view gets the next free number. "bbox_2d" is the box in displayed pixels of that image, (x1, y1) its upper-left and (x2, y2) its lower-right corner.
- query: a few words on what to look for; all boxes of one call are read together with it.

## Rules for a call
- Name at least one box.
- Keep every box inside its image: 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height.

## Example
<tool> {"region": [{"index": 0, "bbox_2d": [96, 40, 352, 232]}], "query": "the digits on the price tag"} </tool>"""
_FULL_FORMATS = """Each turn of yours opens with your reasoning in <think> </think> and then does exactly one of two things:
- zoom in: <think>...</think><tool> {"region": [{"index": ..., "bbox_2d": [x1, y1, x2, y2]}], "query": "..."} </tool>
- answer: <think>...</think><answer>...</answer>"""
_FULL_RULES = """Box coordinates are pixels of the image that "index" names and stay inside it.
Put only the bare answer in <answer>: the letter of the chosen option for multiple choice, Yes or No for a yes/no question, just the number for a numeric question; no explanation, no units."""

FULL = PromptTemplates(
    system=_FULL_SYSTEM,
    image_index=_IMAGE_INDEX,
    single_image=_SINGLE_IMAGE,
    multi_image=_MULTI_IMAGE,
    user=_QUESTION + _braces(_FULL_FORMATS) + "\n" + _FULL_RULES,
    crop_index=_CROP_INDEX,
    response="Continue with your next turn. " + _FULL_FORMATS,
    response_final="The zoom-in budget is spent, so do not call the tool again. Give your final answer now, as <think>...</think><answer>...</answer>.",
    error=_ERROR,
    note=_NOTE,
    name="vilavt-full",
)
# The same protocol in a few words, for small models trained from scratch (the shipped demo model).
COMPACT = PromptTemplates(
    system='Answer questions about the images. For a closer look write <tool>{"region": [{"index": i, "bbox_2d": [x1, y1, x2, y2]}], "query": "..."}</tool>: each box (pixels of image i) is cut from the full-size original and read again along with your query.',
    image_index=_IMAGE_INDEX,
    single_image=_SINGLE_IMAGE,
    multi_image=_MULTI_IMAGE,
    user=_QUESTION + "Reply as <think>...</think><tool>...</tool> or <think>...</think><answer>...</answer>.",
    crop_index=_CROP_INDEX,
    response="Continue.",
    response_final="Zoom budget spent. Answer now: <think>...</think><answer>...</answer>.",
    error=_ERROR,
    note=_NOTE,
    name="vilavt-compact",
)
DEFAULT_PROMPTS = {"full": FULL, "compact": COMPACT}


def default_prompts(style: str) -> PromptTemplates:
    if style not in DEFAULT_PROMPTS:
        raise ValueError(f"prompt_style must be one of {', '.join(DEFAULT_PROMPTS)}, got {style!r}")
    return DEFAULT_PROMPTS[style]


def as_prompts(value) -> PromptTemplates:
    """A `PromptTemplates` from itself, its dict or a path to its JSON file."""
    if isinstance(value, PromptTemplates):
        return value
    if isinstance(value, dict):
        return PromptTemplates.from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        return PromptTemplates.load(value)
    if callable(getattr(value, "to_dict", None)):  # the same class from the other copy of this module
        return PromptTemplates.from_dict(value.to_dict())  # (the `vilavt` package's vs a checkpoint's remote code)
    raise TypeError(f"prompt templates must be a PromptTemplates, a dict or a path, got {type(value).__name__}")


# ---- tool messages (what the loop and the trajectory replay hand to the processor) -----------------------


def tool_message(crops=(), first_index: int = 0, final: bool = False, error: str | None = None, notes=()) -> dict:
    """A `tool` message: the crops (displayed-size PIL images, with their global image indices), or the
    error of a failed call, and notes; `final` = the round budget is spent. The processor's templates
    turn it into text."""
    content = [
        {"type": "image", "image": crop, "index": first_index + i, "width": crop.width, "height": crop.height}
        for i, crop in enumerate(crops)
    ]
    return {"role": "tool", "content": content, "final": final, "error": error, "notes": list(notes)}


__all__ = [
    "PromptTemplates",
    "PromptTemplateError",
    "PROMPTS_FILE",
    "SLOTS",
    "FULL",
    "COMPACT",
    "DEFAULT_PROMPTS",
    "default_prompts",
    "as_prompts",
    "placeholders",
    "check_placeholders",
    "is_image_item",
    "tool_message",
]

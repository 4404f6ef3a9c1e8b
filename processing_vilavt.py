"""ViLaVT processor: images, the chat template that carries the ViLaVT protocol, and query tokenisation.

The chat template is the single source of every prompt the model sees: the system prompt with the
zoom-in tool, the first user turn (image index lines, image size, `# Question:` and the output
formats) and the tool-response turns (zoom-in image lines, the continue / "answer now" prompts).
The chatting loop and the SFT builder render through it too, so training and inference token
streams are the same by construction.

Message shapes the template understands:
  {"role": "system", "content": ...}                         optional; default = ViLaVT system prompt
  {"role": "user", "content": [image, ..., text]}            original images then the question
  {"role": "assistant", "content": "<think>…</think><tool>…</tool>"}
  {"role": "tool", "content": [image, ..., text], "final": bool}
                                                             a tool response: crops (or an error text);
                                                             `final` = the round budget is spent
Image items may carry `width`/`height` (displayed size); `apply_chat_template` fills them in.
"""

import os

from PIL import Image
from transformers.configuration_utils import PreTrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from .images_vilavt import (  # noqa: F401  (re-exported: part of the processor module's public API)
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageLoadError,
    displayed_size,
    fit_image,
    open_image,
    prepare_images,
)

DEFAULT_MAX_QUERY_LENGTH = 50

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
TURN_END = "<|im_end|>\n"

# The protocol, in the template. Tags and JSON keys are what the released model was trained on
# (REFERENCE.md §2.1-2.5); the instructions around them are ours.
CHAT_TEMPLATE = r"""{%- set ns = namespace(images=0) -%}
{%- set compact = prompt_style is defined and prompt_style == 'compact' -%}
{%- if compact -%}
{%- set system_prompt -%}
You answer questions about images. To look closer, call the zoom-in tool: <tool>{"region": [{"index": i, "bbox_2d": [x1, y1, x2, y2]}], "query": "..."}</tool> crops the boxes (pixels of image i) from the original images and re-encodes them with your query.
{%- endset -%}
{%- set formats -%}
Answer with <think>...</think><tool>...</tool> or <think>...</think><answer>...</answer>.
{%- endset -%}
{%- set rules -%}{%- endset -%}
{%- set continue_prompt -%}
Continue.
{%- endset -%}
{%- set final_prompt -%}
No more tool calls. Answer now: <think>...</think><answer>...</answer>.
{%- endset -%}
{%- else -%}
{%- set system_prompt -%}
You are a helpful assistant. Solve the problem about the image(s) the user provides. You may look closer with a zoom-in tool: the regions you select are cropped from the original high-resolution image(s), processed externally, and re-encoded together with your query, so you can look again with a specific question in mind.

# Tools

## Tool Format
<tool>
{"region": [{"index": int, "bbox_2d": [x1, y1, x2, y2]}, ...], "query": str}
</tool>

- region: the regions to zoom in on. "index" is the 0-based index of the image to crop from (original images and earlier zoomed-in images all have an index). "bbox_2d" is a box in pixel coordinates of that image: (x1, y1) is its top-left corner and (x2, y2) its bottom-right corner.
- query: what you want to find out about the selected regions.

## Constraints
- Give at least one region.
- Coordinates must lie within the bounds of the indexed image, with x1 < x2 and y1 < y2.

## Example
<tool> {"region": [{"index": 0, "bbox_2d": [120, 64, 380, 300]}], "query": "What is written on the sign?"} </tool>
{%- endset -%}
{%- set formats -%}
Think inside <think> and </think> first. Then either call the zoom-in tool or give the final answer, in exactly one of these formats:
1. <think>...</think><tool> {"region": [{"index": ..., "bbox_2d": [x1, y1, x2, y2]}], "query": "..."} </tool>
2. <think>...</think><answer>...</answer>
{%- endset -%}
{%- set rules -%}
Coordinates in "bbox_2d" are pixels of the indexed image and must lie within its width and height.
In <answer>, give only the answer: the option's letter for a multiple-choice question, Yes or No for a yes/no question, a single number for a numeric question, and nothing else.
{%- endset -%}
{%- set continue_prompt -%}
Look at the zoomed-in image(s) and continue. {{ formats }}
{%- endset -%}
{%- set final_prompt -%}
You have reached the maximum number of iterations. No further tool calls are allowed. You must now provide the final answer in the format <think>...</think><answer>...</answer>.
{%- endset -%}
{%- endif -%}
{%- macro content_text(content) -%}
{%- if content is string -%}{{ content }}{%- else -%}{%- for item in content if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- macro is_image(item) -%}{{ 'yes' if item['type'] == 'image' or item.get('image') is not none or item.get('image_url') is not none else '' }}{%- endmacro -%}
{%- for message in messages -%}
{%- if loop.first and message['role'] == 'user' -%}
<|im_start|>system
{{ system_prompt }}<|im_end|>
{% endif -%}
{%- if message['role'] == 'system' -%}
<|im_start|>system
{{ content_text(message['content']) }}<|im_end|>
{% elif message['role'] == 'user' -%}
<|im_start|>user
{% if message['content'] is string -%}
{{ message['content'] }}
{%- else -%}
{%- set first = namespace(item=none, count=0) -%}
{%- for item in message['content'] if is_image(item) -%}
{%- if first.item is none %}{% set first.item = item %}{% endif -%}
{%- set first.count = first.count + 1 -%}
<|vision_start|><|image_pad|><|vision_end|>The index of the provided image is {{ ns.images }}.
{% set ns.images = ns.images + 1 -%}
{%- endfor -%}
{%- if first.count == 0 -%}
{{ content_text(message['content']) }}
{%- else -%}
{%- if first.count == 1 -%}
This is an image indexed by 0.
{%- else -%}
These are {{ first.count }} images with indexed from 0 to {{ first.count - 1 }}.
{%- endif -%}
{%- if first.item['width'] is defined -%}
{{ '\n' }}{{ 'The image size' if first.count == 1 else 'All images have size' }}: width {{ first.item['width'] }}, height {{ first.item['height'] }}.
{%- endif -%}
{{ '\n\n# Question: ' }}{{ content_text(message['content']) }}{{ '\n\n' }}{{ formats }}
{%- if rules %}
{{ rules }}
{%- endif -%}
{%- endif -%}
{%- endif -%}
<|im_end|>
{% elif message['role'] == 'assistant' -%}
<|im_start|>assistant
{% generation %}{{ content_text(message['content']) }}<|im_end|>
{% endgeneration %}
{%- elif message['role'] == 'tool' -%}
<|im_start|>user
<tool_response>
{%- if message['content'] is string %}{{ message['content'] }}{% else -%}
{%- for item in message['content'] -%}
{%- if is_image(item) -%}
<|vision_start|><|image_pad|><|vision_end|>The index of the zoom-in image is {{ item['index'] if item['index'] is defined else ns.images }}
{%- if item['width'] is defined %} (width: {{ item['width'] }}, height: {{ item['height'] }}){% endif %}.
{% set ns.images = ns.images + 1 -%}
{%- elif item['type'] == 'text' -%}
{{ item['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{ final_prompt if message.get('final') else continue_prompt }}</tool_response><|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}"""


def _flat_images(images) -> list[Image.Image]:
    """The PIL images in an image argument (one image, a list, or per-sample lists)."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        return [image for part in images for image in _flat_images(part)]
    return []


def _is_image_item(item) -> bool:
    # Datasets (Arrow) give every content item every key, with None where unused.
    return isinstance(item, dict) and (
        item.get("type") == "image" or item.get("image") is not None or item.get("image_url") is not None
    )


class ViLaVTProcessor(Qwen2_5_VLProcessor):
    r"""Image processor (PIL, no torchvision), Qwen tokenizer, query tokenizer and the ViLaVT chat template.

    Besides the stock Qwen2.5-VL outputs, `__call__` returns `query_ids` / `query_attention_mask`
    ([Q, max_query_length], right-padded, empty queries masked out) and `image_to_query_mapping`.

    Args:
        max_pixels: pixel budget shared by the original images of one conversation.
        min_pixels: smallest image area.
        crop_max_pixels: pixel budget of one zoom-in crop (defaults to `max_pixels`).
        crop_min_pixels: smallest area of a crop (defaults to `min_pixels`); small boxes are upscaled to it.
        max_query_length: query length limit (the reference trained with 50).
        prompt_style: "full" (the protocol in full, as the released model was trained) or "compact" (the
            same protocol in a few words; for small models trained from scratch).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        query_tokenizer=None,
        chat_template=None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        crop_max_pixels: int | None = None,
        crop_min_pixels: int | None = None,
        max_query_length: int = DEFAULT_MAX_QUERY_LENGTH,
        prompt_style: str = "full",
        **kwargs,
    ):
        self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.max_pixels, self.min_pixels = int(max_pixels), int(min_pixels)
        self.crop_max_pixels = int(crop_max_pixels or max_pixels)
        self.crop_min_pixels = int(crop_min_pixels or min_pixels)
        self.max_query_length = int(max_query_length)
        if prompt_style not in ("full", "compact"):
            raise ValueError(f"prompt_style must be 'full' or 'compact', got {prompt_style!r}")
        self.prompt_style = prompt_style
        ProcessorMixin.__init__(
            self, image_processor, tokenizer, query_tokenizer, chat_template=chat_template or CHAT_TEMPLATE
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # This class is already loaded and its parts (a Qwen tokenizer, the Qwen2-VL image processor) need
        # none of the folder's code; given no model config, the auto classes would read config.json, find its
        # auto_map and stop to ask whether to run that code.
        if "trust_remote_code" not in kwargs:
            kwargs.setdefault("config", PreTrainedConfig())
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def model_input_names(self):
        names = list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))
        return names + ["mm_token_type_ids", "query_ids", "query_attention_mask", "image_to_query_mapping"]

    @property
    def patch_factor(self) -> int:
        return self.image_processor.patch_size * self.image_processor.merge_size

    # ---- images -------------------------------------------------------------------------------

    def fit_originals(self, images: list, max_pixels: int | None = None, fitted: dict | None = None) -> list:
        """Load the original images of one conversation and resize them to their displayed size; they
        share the pixel budget (each gets `max_pixels / N`, REFERENCE.md §2.6). `fitted` memoises the
        results per source and budget across the conversations of a batch (GRPO repeats each prompt)."""
        budget, smallest = self.original_budget(len(images), max_pixels)
        fitted = {} if fitted is None else fitted
        results = []
        for image in images:
            source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else id(image)
            key = (source, budget, smallest)
            if key not in fitted:
                fitted[key] = fit_image(open_image(image), budget, smallest, self.patch_factor)
            results.append(fitted[key])
        return results

    def original_budget(self, count: int, max_pixels: int | None = None) -> tuple[int, int]:
        """(max, min) pixel area of each of `count` original images. An explicit `max_pixels` below
        `min_pixels` lowers the minimum too (it is the caller's budget)."""
        budget = (max_pixels or self.max_pixels) // max(count, 1)
        smallest = min(self.min_pixels, budget) if max_pixels else self.min_pixels
        return max(budget, smallest), smallest

    def size_keeping(self, images) -> dict:
        """The image processor's `size` that keeps `images` (already sized: displayed sizes are what
        boxes refer to) as they are."""
        areas = [image.width * image.height for image in _flat_images(images)]
        return {
            "shortest_edge": min([self.min_pixels, *areas]),
            "longest_edge": max([self.max_pixels, self.crop_max_pixels, *areas]),
        }

    # ---- queries ------------------------------------------------------------------------------

    def tokenize_queries(self, queries: list[str], return_tensors: str = "pt"):
        """Query ids and mask, [Q, max_query_length], right-padded as the reference trained.

        Empty queries get an all-zero mask (f0 = V(I, ∅)). Returns `(encoding, truncated)` where
        `truncated[i]` says whether query i was cut to `max_query_length` tokens.
        """
        queries = list(queries)
        if not queries:
            raise ValueError("tokenize_queries needs at least one query (use '' for an empty query)")
        if not all(isinstance(q, str) for q in queries):
            raise ValueError(f"queries must be strings, got {[type(q).__name__ for q in queries]}")
        tokenizer = self.query_tokenizer
        full_lengths = [len(ids) for ids in tokenizer(queries)["input_ids"]]
        encoding = tokenizer(
            queries,
            padding="max_length",
            truncation=True,
            max_length=self.max_query_length,
            return_tensors=return_tensors,
        )
        for row, query in enumerate(queries):
            if not query:
                encoding["attention_mask"][row] = 0
        truncated = [length > self.max_query_length for length in full_lengths]
        return BatchFeature(
            {"query_ids": encoding["input_ids"], "query_attention_mask": encoding["attention_mask"]},
            tensor_type=return_tensors,
        ), truncated

    # ---- calling ------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, queries=None, image_to_query_mapping=None, **kwargs):
        """Stock Qwen2.5-VL processing plus query tensors.

        Images are used at the size given (rounded to patch multiples within [min_pixels, max_pixels]);
        `apply_chat_template` / `fit_originals` size the originals. `queries` (one string per query
        row) and `image_to_query_mapping` (one row index per image) default to one empty query per
        image. For a batch of texts pass per-sample lists; rows are offset across samples.
        """
        images = prepare_images(images, convert=False)  # upright, 8-bit, <= 200:1: what open_image gives the crops
        kwargs.setdefault("images_kwargs", {})
        kwargs["images_kwargs"].setdefault("size", self.size_keeping(images))
        outputs = super().__call__(images=images, text=text, **kwargs)
        if images is None:
            return outputs
        num_images = len(outputs["image_grid_thw"])
        if queries is None:
            queries, mapping = [""] * num_images, list(range(num_images))
        elif queries and isinstance(queries[0], (list, tuple)):  # per-sample lists
            if image_to_query_mapping is None or len(image_to_query_mapping) != len(queries):
                raise ValueError("per-sample queries need a per-sample image_to_query_mapping of the same length")
            mapping, offset = [], 0
            for sample_queries, sample_mapping in zip(queries, image_to_query_mapping):
                mapping += [offset + int(q) for q in sample_mapping]
                offset += len(sample_queries)
            queries = [q for sample_queries in queries for q in sample_queries]
        else:
            mapping = list(range(num_images)) if image_to_query_mapping is None else list(image_to_query_mapping)
        if len(mapping) != num_images:
            raise ValueError(f"image_to_query_mapping has {len(mapping)} entries but {num_images} images were given")
        encoding, _ = self.tokenize_queries(queries, return_tensors="pt")
        outputs.update(encoding)
        outputs["image_to_query_mapping"] = BatchFeature({"m": [mapping]}, tensor_type="pt")["m"][0]
        return outputs

    def prepare_conversation(
        self, conversation: list[dict], images: list | None = None, max_pixels: int | None = None, fitted=None
    ) -> list[dict]:
        """A copy of `conversation` whose image items hold displayed-size images and their `width` /
        `height`, as the template needs. Originals (user turns) share the pixel budget; tool-turn
        images (crops) keep their size. `images` fills image items that carry no image of their own
        (TRL-style placeholders), in order. `max_pixels` overrides the originals' shared budget;
        `fitted` is `fit_originals`' memo."""
        # Messages and content items are copied (the items are rewritten below), images are not.
        conversation = [
            {**message, "content": [dict(item) if isinstance(item, dict) else item for item in message["content"]]}
            if isinstance(message.get("content"), list) else dict(message)
            for message in conversation
        ]  # fmt: skip
        pending = list(images or [])
        items_by_role = {"user": [], "tool": []}
        for message in conversation:
            if message.get("role") in items_by_role and isinstance(message.get("content"), list):
                items_by_role[message["role"]] += [item for item in message["content"] if _is_image_item(item)]

        def source(item):
            found = item.get("image", item.get("image_url", item.get("path", item.get("url"))))
            if isinstance(found, dict):  # OpenAI-style {"image_url": {"url": ...}}
                found = found.get("url")
            if found is None:
                if not pending:
                    raise ValueError("an image item has no image and no `images` were passed to fill it")
                found = pending.pop(0)
            return found

        originals = self.fit_originals([source(item) for item in items_by_role["user"]], max_pixels, fitted)
        crops = [
            fit_image(open_image(source(item)), self.crop_max_pixels, self.crop_min_pixels, self.patch_factor)
            for item in items_by_role["tool"]
        ]
        for item, image in zip(items_by_role["user"] + items_by_role["tool"], originals + crops):
            for key in ("image_url", "path", "url"):
                item.pop(key, None)
            item.update(type="image", image=image, width=image.width, height=image.height)
        return conversation

    def apply_chat_template(self, conversation, chat_template=None, images=None, max_pixels=None, **kwargs):
        """Render (and optionally tokenize) ViLaVT conversations; image items are sized first so the
        prompt states the displayed sizes the model must use for boxes (`max_pixels` overrides the
        originals' budget)."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        if batched:
            fitted = {}
            conversation = [self.prepare_conversation(c, max_pixels=max_pixels, fitted=fitted) for c in conversation]
        else:
            conversation = self.prepare_conversation(conversation, images, max_pixels)
        kwargs.setdefault("prompt_style", self.prompt_style)
        return super().apply_chat_template(conversation, chat_template, **kwargs)


ViLaVTProcessor.register_for_auto_class()

__all__ = ["ViLaVTProcessor", "ImageLoadError", "open_image", "fit_image", "displayed_size", "CHAT_TEMPLATE", "TURN_END"]

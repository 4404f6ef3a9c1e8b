"""ViLaVT processor: images, prompts, the chat template, and query tokenisation.

Every piece of prompt text (system prompt, the first user turn's image-index lines, image size and
question wrapper, the tool responses' crop lines and continue / final / error texts) comes from the
processor's `prompts` (`prompts_vilavt.PromptTemplates`), which a checkpoint carries in
`prompt_templates.json` next to `chat_template.jinja`; the chat template only assembles the turns. The
chatting loop and the SFT builder render through the processor too, so training and inference token
streams are the same by construction.

Message shapes `apply_chat_template` understands:
  {"role": "system", "content": ...}                         optional; default = the templates' system prompt
  {"role": "user", "content": [image | video, ..., text]}    original images (a video = its frames, each an
                                                             image with its own index) then the question
  {"role": "assistant", "content": "<think>…</think><tool>…</tool>"}
  {"role": "tool", "content": [image, ..., text], "final": bool, "error": str | None, "notes": [str]}
                                                             a tool response (`prompts_vilavt.tool_message`):
                                                             crops, or a failed call's error; `final` = the
                                                             round budget is spent
Image items may carry `width`/`height` (displayed size); `apply_chat_template` fills them in.
"""

import inspect
import json
import os
import re
from collections import OrderedDict

import torch
from PIL import Image
from transformers.configuration_utils import PreTrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.utils import cached_file, logging

from .images_vilavt import (  # noqa: F401  (re-exported: part of the processor module's public API)
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageLoadError,
    displayed_size,
    fit_image,
    open_image,
    prepare_images,
)
from .prompts_vilavt import PROMPTS_FILE, TOOL_RESPONSE_OPEN, as_prompts, default_prompts, is_image_item

logger = logging.get_logger(__name__)

DEFAULT_MAX_QUERY_LENGTH = 50

TURN_END = "<|im_end|>\n"

# transformers >= 5.23 encodes control tokens spelled in a conversation's text as text
# (`apply_chat_template(..., sanitize_control_tokens=True)`); older processors (5.19, what vLLM 0.32 installs
# with) have no such option, so there `spelled_as_text` breaks them instead.
SANITIZES_CONTROL_TOKENS = "sanitize_control_tokens" in inspect.signature(
    Qwen2_5_VLProcessor.apply_chat_template
).parameters

# A plain assembler (Qwen2.5-VL's layout): every prompt text is already in the messages, put there by the
# processor from its prompt templates (`prompts_vilavt.PromptTemplates.render`). A `tool` message is a user
# turn; assistant turns are marked for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = r"""{%- macro text(content) -%}
{%- if content is string -%}{{ content }}{%- else -%}{%- for item in content if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
<|im_start|>{{ 'user' if message['role'] == 'tool' else message['role'] }}
{% if message['role'] == 'assistant' -%}
{% generation %}{{ text(message['content']) }}<|im_end|>
{% endgeneration %}
{%- else -%}
{%- if message['content'] is string or message['role'] == 'system' -%}
{{ text(message['content']) }}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif item['type'] == 'text' -%}
{{ item['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}"""
# Chat templates saved before the prompt text became data held the wording themselves (and read `prompt_style`).
_LEGACY_TEMPLATE_MARKS = ("{%- set system_prompt -%}", "prompt_style")


def _flat_images(images) -> list[Image.Image]:
    """The PIL images in an image argument (one image, a list, or per-sample lists)."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        return [image for part in images for image in _flat_images(part)]
    return []


def _video_frames(item: dict) -> list[dict]:
    """A video item as image items, one per frame: ViLaVT reads a video as its frames, each an image with its own
    index (the authors' multi-image rule). Frames: a list of images (paths, URLs, PIL images) or a T x H x W x C
    uint8 array."""
    frames = next((item[key] for key in ("video", "path", "url") if item.get(key) is not None), None)
    if getattr(frames, "ndim", None) == 4:
        frames = [Image.fromarray(frame.numpy() if hasattr(frame, "numpy") else frame) for frame in frames]
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ValueError(
            "a video item must give its frames, as a list of images or a T x H x W x C array (ViLaVT reads a "
            f"video as frames, each an image with its own index); got {type(frames).__name__}"
        )
    return [{"type": "image", "image": frame} for frame in frames]


def _copied(message: dict) -> dict:
    """`message` with its content items copied (they are rewritten) and its video items split into frames;
    images are not copied."""
    if not isinstance(message.get("content"), list):
        return dict(message)
    content = []
    for item in message["content"]:
        if isinstance(item, dict) and item.get("type") == "video":
            content += _video_frames(item)
        else:
            content.append(dict(item) if isinstance(item, dict) else item)
    return {**message, "content": content}


def spelled_as_text(value, control_tokens: re.Pattern):
    """`value` (a conversation, message or string) with every control token its strings spell broken by a word
    joiner (U+2060) after the token's first character, so the tokenizer encodes it as text (transformers < 5.23)."""
    if isinstance(value, str):
        return control_tokens.sub(lambda match: match[0][0] + "\u2060" + match[0][1:], value)
    if isinstance(value, (list, tuple)):
        return [spelled_as_text(item, control_tokens) for item in value]
    if isinstance(value, dict):
        return {key: spelled_as_text(item, control_tokens) for key, item in value.items()}
    return value


def batch_vision(samples: list[dict]) -> dict:
    """The vision inputs of several conversations as one batch — the one place query rows are batched.

    Each sample holds a conversation's `query_ids` / `query_attention_mask` ([Q_i, T_i]) and
    `image_to_query_mapping` ([N_i], rows of that conversation), and optionally its `pixel_values` and
    `image_grid_thw`. Query rows are right-padded to the longest T (a query's valid slots, hence their rotary
    positions, stay where they are) and each conversation's mapping is offset by the query rows before it.
    """
    samples = [s for s in samples if s.get("image_to_query_mapping") is not None]
    if not samples:
        return {}
    length = max(s["query_ids"].shape[1] for s in samples)
    pad = lambda rows: torch.nn.functional.pad(rows, (0, length - rows.shape[1]))  # noqa: E731
    offsets = torch.tensor([0] + [s["query_ids"].shape[0] for s in samples[:-1]]).cumsum(0).tolist()
    batch = {
        "query_ids": torch.cat([pad(s["query_ids"]) for s in samples]),
        "query_attention_mask": torch.cat([pad(s["query_attention_mask"]) for s in samples]),
        "image_to_query_mapping": torch.cat([s["image_to_query_mapping"] + o for s, o in zip(samples, offsets)]),
    }
    for key in ("pixel_values", "image_grid_thw"):
        if all(key in s for s in samples):
            batch[key] = torch.cat([s[key] for s in samples])
    return batch


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
        prompt_templates: every piece of prompt text (`PromptTemplates`, its dict or a path to its JSON file);
            `from_pretrained` reads the checkpoint's `prompt_templates.json`.
        prompt_style: the project's own wording used when there are no `prompt_templates`: "full" (the protocol
            in full) or "compact" (the same protocol in a few words; for small models trained from scratch).
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
        prompt_templates=None,
        **kwargs,
    ):
        self.max_pixels, self.min_pixels = int(max_pixels), int(min_pixels)
        self.crop_max_pixels = int(crop_max_pixels or max_pixels)
        self.crop_min_pixels = int(crop_min_pixels or min_pixels)
        self.max_query_length = int(max_query_length)
        default = default_prompts(prompt_style)  # also checks prompt_style when templates are given
        self.prompts = default if prompt_templates is None else as_prompts(prompt_templates)
        self.prompt_style = prompt_style
        self._stated_sizes = OrderedDict()  # rendered text -> the displayed sizes it states (see __call__)
        if isinstance(chat_template, str) and all(mark in chat_template for mark in _LEGACY_TEMPLATE_MARKS):
            logger.info("replacing a chat template that carries its own wording with the assembler of the templates")
            chat_template = None
        # The query tokenizer takes the parent's third sub-processor slot (its video processor): ProcessorMixin
        # binds positional sub-processors to this class's attributes (image_processor, tokenizer, query_tokenizer).
        super().__init__(image_processor, tokenizer, query_tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # This class is already loaded and its parts (a Qwen tokenizer, the Qwen2-VL image processor) need
        # none of the folder's code; given no model config, the auto classes would read config.json, find its
        # auto_map and stop to ask whether to run that code.
        if "trust_remote_code" not in kwargs:
            kwargs.setdefault("config", PreTrainedConfig())
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        """The parent's, plus the checkpoint's `prompt_templates.json` (a folder or a hub repo); without one the
        default wording of the checkpoint's `prompt_style` is used. A `prompt_style` passed here replaces the
        checkpoint's templates, as any keyword overrides what a checkpoint saved."""
        processor_dict, rest = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        if "prompt_style" in kwargs and "prompt_templates" not in kwargs:
            processor_dict.pop("prompt_templates", None)
            return processor_dict, rest
        if "prompt_templates" in processor_dict or os.path.isfile(str(pretrained_model_name_or_path)):
            return processor_dict, rest
        hub = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
        resolved = cached_file(
            pretrained_model_name_or_path,
            PROMPTS_FILE,
            **{key: kwargs[key] for key in hub if kwargs.get(key) is not None},
            _raise_exceptions_for_missing_entries=False,
        )
        if resolved is not None:
            with open(resolved, encoding="utf-8") as handle:
                processor_dict["prompt_templates"] = json.load(handle)
        return processor_dict, rest

    def to_json_file(self, json_file_path):
        # `save_pretrained` writes processor_config.json through here before it uploads (`push_to_hub`), so the
        # templates file written next to it is saved and pushed with it.
        super().to_json_file(json_file_path)
        self.prompts.save(os.path.join(os.path.dirname(os.fspath(json_file_path)), PROMPTS_FILE))

    @property
    def model_input_names(self):
        names = list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))
        return names + ["mm_token_type_ids", "query_ids", "query_attention_mask", "image_to_query_mapping"]

    @property
    def patch_factor(self) -> int:
        return self.image_processor.patch_size * self.image_processor.merge_size

    # ---- images -------------------------------------------------------------------------------

    def fit_originals(self, images: list, max_pixels: int | None = None, fitted: dict | None = None) -> list:
        """The original images of one conversation resized to their displayed size; they share the pixel
        budget (each gets `max_pixels / N`, REFERENCE.md §2.6). `fitted` memoises the results per source and
        budget across the conversations of a batch (GRPO repeats each prompt)."""
        return self._open_and_fit(images, max_pixels, fitted)[1]

    def _open_and_fit(self, images: list, max_pixels: int | None, fitted: dict | None) -> tuple[list, list]:
        """(originals opened upright at full resolution, their displayed-size versions), as `fit_originals`."""
        budget, smallest = self.original_budget(len(images), max_pixels)
        fitted = {} if fitted is None else fitted
        pairs = []
        for image in images:
            source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else id(image)
            key = (source, budget, smallest)
            if key not in fitted:
                original = open_image(image)
                fitted[key] = (original, fit_image(original, budget, smallest, self.patch_factor))
            pairs.append(fitted[key])
        return [original for original, _ in pairs], [shown for _, shown in pairs]

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
        # One pass: a query cut to max_query_length also yields overflow rows, which say it was cut.
        encoding = self.query_tokenizer(
            queries, padding="max_length", truncation=True, max_length=self.max_query_length,
            return_overflowing_tokens=True,
        )  # fmt: skip
        owners = encoding["overflow_to_sample_mapping"]
        first = {}
        for row, owner in enumerate(owners):
            first.setdefault(owner, row)
        rows = [first[i] for i in range(len(queries))]
        ids = torch.tensor([encoding["input_ids"][row] for row in rows])
        mask = torch.tensor([encoding["attention_mask"][row] for row in rows])
        mask[torch.tensor([not q for q in queries])] = 0
        truncated = [owners.count(i) > 1 for i in range(len(queries))] if len(owners) > len(queries) else [False] * len(queries)
        return BatchFeature({"query_ids": ids, "query_attention_mask": mask}, tensor_type=return_tensors), truncated

    def control_tokens(self, chat_template=None) -> re.Pattern:
        """The tokens a conversation's text must not spell, by transformers' rule: the tokenizer's special tokens
        and the added tokens the chat template writes."""
        template = chat_template if isinstance(chat_template, str) else self.chat_template
        template = template if isinstance(template, str) else ""
        tokens = [
            token.content
            for token in self.tokenizer.added_tokens_decoder.values()
            if token.special or (token.content in template and not token.content.isspace())
        ]
        return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")

    # ---- calling ------------------------------------------------------------------------------

    def encode(self, text=None, images=None, **kwargs) -> BatchFeature:
        """Stock Qwen2.5-VL processing of `text` with `images` taken at the size given (they are already
        displayed-size: the sizes the text states), without query tensors."""
        kwargs.setdefault("images_kwargs", {})
        kwargs["images_kwargs"].setdefault("size", self.size_keeping(images))
        return super().__call__(images=images, text=text, **kwargs)

    def __call__(self, images=None, text=None, queries=None, image_to_query_mapping=None, images_sized=False, **kwargs):
        """Stock Qwen2.5-VL processing plus query tensors and the originals.

        Each text's images are shown at the sizes the text states: the sizes `apply_chat_template(...,
        tokenize=False)` stated for that text, or else the ViLaVT rule (the originals of a conversation — the
        images before its first tool response — share `max_pixels`; crops fit `crop_max_pixels`).
        `images_sized=True`: the images are already displayed-size (`apply_chat_template` passes them so).
        `queries` (one string per query row, or their `tokenize_queries` encoding) and `image_to_query_mapping`
        (one row index per image) default to one empty query per image; for a batch of texts pass per-sample
        lists (rows are offset across samples). The output's `originals` holds each sample's original images
        (upright, full resolution), which `generate` crops from.
        """
        images = prepare_images(images, convert=False)  # upright, 8-bit, <= 200:1: what open_image gives the crops
        if images is None:
            return self.encode(text=text, **kwargs)
        texts = [text] if isinstance(text, str) else list(text or [])
        originals = self._images_per_text(images, texts)
        shown = originals if images_sized or not texts else [self._sized_as_stated(t, o) for t, o in zip(texts, originals)]
        outputs = self.encode(text=text, images=[image for sample in shown for image in sample] or None, **kwargs)
        num_images = len(outputs["image_grid_thw"])
        if isinstance(queries, BatchFeature):  # already tokenized (the chatting loop's tool responses)
            encoding = queries
            mapping = list(range(num_images)) if image_to_query_mapping is None else list(image_to_query_mapping)
        else:
            if queries is None:
                queries, mapping = [""] * num_images, list(range(num_images))
            elif queries and isinstance(queries[0], (list, tuple)):  # per-sample lists
                if image_to_query_mapping is None or len(image_to_query_mapping) != len(queries):
                    raise ValueError("per-sample queries need a per-sample image_to_query_mapping of the same length")
                encodings = [self.tokenize_queries(q)[0] for q in queries]
                batch = batch_vision(
                    [{**e, "image_to_query_mapping": torch.tensor(m, dtype=torch.long)} for e, m in zip(encodings, image_to_query_mapping)]
                )
                queries, mapping = None, batch.pop("image_to_query_mapping").tolist()
                encoding = BatchFeature(batch)
            else:
                mapping = list(range(num_images)) if image_to_query_mapping is None else list(image_to_query_mapping)
            if queries is not None:
                encoding, _ = self.tokenize_queries(queries, return_tensors="pt")
        if len(mapping) != num_images:
            raise ValueError(f"image_to_query_mapping has {len(mapping)} entries but {num_images} images were given")
        outputs.update(encoding)
        outputs["image_to_query_mapping"] = torch.tensor(mapping, dtype=torch.long)
        outputs["originals"] = originals  # not a tensor: left alone by .to(device) and by the model's forward
        return outputs

    def _images_per_text(self, images, texts: list[str]) -> list[list]:
        """`images` (flat, or one list per text) as one list per text, by the image placeholders of each text."""
        if not texts:
            return [[image] for image in _flat_images(images)]
        if isinstance(images, (list, tuple)) and images and all(isinstance(part, (list, tuple)) for part in images):
            nested = [list(part) for part in images]
        else:
            flat, counts, nested = _flat_images(images), [t.count(self.image_token) for t in texts], []
            if sum(counts) != len(flat):
                raise ValueError(f"the text holds {sum(counts)} {self.image_token} placeholders but {len(flat)} images were given")
            for count in counts:
                nested.append(flat[:count])
                flat = flat[count:]
        if len(nested) != len(texts):
            raise ValueError(f"{len(nested)} lists of images were given for {len(texts)} texts")
        return nested

    def _sized_as_stated(self, text: str, images: list) -> list:
        """`images` (one text's, in order) at the displayed sizes `text` states."""
        stated = self._stated_sizes.get(text)
        if stated is not None and len(stated) == len(images):
            return [im if im.size == size else im.resize(size, Image.Resampling.BICUBIC) for im, size in zip(images, stated)]
        count = text.split(TOOL_RESPONSE_OPEN, 1)[0].count(self.image_token)  # the originals: before any tool response
        budget, smallest = self.original_budget(count)
        return [
            fit_image(image, budget, smallest, self.patch_factor)
            if i < count
            else fit_image(image, self.crop_max_pixels, self.crop_min_pixels, self.patch_factor)
            for i, image in enumerate(images)
        ]

    def prepare_conversation(
        self, conversation: list[dict], images: list | None = None, max_pixels: int | None = None, fitted=None
    ) -> tuple[list[dict], list]:
        """A copy of `conversation` whose image items hold displayed-size images and their `width` /
        `height`, as the prompts need, and its originals (upright, full resolution); a video item becomes one
        image item per frame. Originals (user turns) share the pixel budget; tool-turn images (crops) are
        fitted to the crop budget unless they carry their displayed size already. `images` fills image items
        that carry no image of their own (TRL-style placeholders), in order. `max_pixels` overrides the
        originals' shared budget; `fitted` is `fit_originals`' memo."""
        conversation = [_copied(message) for message in conversation]
        pending = list(images or [])
        items_by_role = {"user": [], "tool": []}
        for message in conversation:
            if message.get("role") in items_by_role and isinstance(message.get("content"), list):
                items_by_role[message["role"]] += [item for item in message["content"] if is_image_item(item)]

        def source(item):
            found = item.get("image", item.get("image_url", item.get("path", item.get("url"))))
            if isinstance(found, dict):  # OpenAI-style {"image_url": {"url": ...}}
                found = found.get("url")
            if found is None:
                if not pending:
                    raise ValueError("an image item has no image and no `images` were passed to fill it")
                found = pending.pop(0)
            return found

        def crop(item):
            image = source(item)
            if isinstance(image, Image.Image) and image.size == (item.get("width"), item.get("height")):
                return image  # a crop the loop already sized
            return fit_image(open_image(image), self.crop_max_pixels, self.crop_min_pixels, self.patch_factor)

        originals, shown = self._open_and_fit([source(item) for item in items_by_role["user"]], max_pixels, fitted)
        crops = [crop(item) for item in items_by_role["tool"]]
        for item, image in zip(items_by_role["user"] + items_by_role["tool"], shown + crops):
            for key in ("image_url", "path", "url"):
                item.pop(key, None)
            item.update(type="image", image=image, width=image.width, height=image.height)
        return conversation, originals

    def apply_chat_template(self, conversation, chat_template=None, images=None, max_pixels=None, **kwargs):
        """Render (and optionally tokenize) ViLaVT conversations with the processor's prompt templates; image
        items are sized first so the prompt states the displayed sizes the model must use for boxes
        (`max_pixels` overrides the originals' budget).

        Tokenized, text the conversation holds (questions, tool-response errors) is encoded as text even where
        it spells a control token (transformers' `sanitize_control_tokens`), unless assistant masks are asked
        for; the output's `originals` holds each conversation's original images. As text, the sizes it states are
        remembered, so that `processor(text=..., images=...)` encodes exactly them."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        fitted = {}
        prepared = [
            self.prepare_conversation(c, None if batched else images, max_pixels, fitted)
            for c in (conversation if batched else [conversation])
        ]
        rendered = [self.prompts.render(c) for c, _ in prepared]
        tokenize = kwargs.get("tokenize", False)
        if tokenize and not kwargs.get("return_assistant_tokens_mask"):
            kwargs.setdefault("sanitize_control_tokens", True)
        if not SANITIZES_CONTROL_TOKENS and kwargs.pop("sanitize_control_tokens", False):
            rendered = [spelled_as_text(c, self.control_tokens(chat_template)) for c in rendered]
        if tokenize:
            kwargs["processor_kwargs"] = {**(kwargs.get("processor_kwargs") or {}), "images_sized": True}
        out = super().apply_chat_template(rendered if batched else rendered[0], chat_template, **kwargs)
        if not tokenize:
            for text, conv in zip([out] if isinstance(out, str) else out, rendered):
                sizes = [(i["width"], i["height"]) for m in conv if isinstance(m.get("content"), list) for i in m["content"] if is_image_item(i)]
                self._stated_sizes[text] = sizes
                while len(self._stated_sizes) > 256:
                    self._stated_sizes.popitem(last=False)
        elif kwargs.get("return_dict"):
            out["originals"] = [originals for _, originals in prepared]
        return out


ViLaVTProcessor.register_for_auto_class()

__all__ = ["ViLaVTProcessor", "ImageLoadError", "open_image", "fit_image", "displayed_size", "CHAT_TEMPLATE", "TURN_END"]

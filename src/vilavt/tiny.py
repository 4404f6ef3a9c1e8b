"""Tiny, fully offline ViLaVT models for tests, examples and the demo.

The tokenizer is a small byte-level BPE trained on the spot (no download) and wrapped as a Qwen2
tokenizer with Qwen's special tokens; the query tokenizer shares its vocabulary and, like
Qwen3-Embedding's, appends `<|endoftext|>` to every query.
"""

import json
from dataclasses import dataclass
from functools import lru_cache

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .remote_code.configuration_vilavt import ViLaVTConfig
from .remote_code.modeling_vilavt import ViLaVTForConditionalGeneration
from .remote_code.processing_vilavt import ViLaVTProcessor
from .remote_code.prompts_vilavt import DEFAULT_PROMPTS

# Qwen2.5-VL's special tokens, in their original order.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Protocol tags get one token each in the tiny vocabulary (the real Qwen tokenizer splits them),
# which keeps tiny models' sequences short.
PROTOCOL_TOKENS = ["<think>", "</think>", "<tool>", "</tool>", "<answer>", "</answer>", "<tool_response>", "</tool_response>"]

# Box coordinates on the 28-pixel token grid, written the way tool calls write them.
_GRID = [28 * i for i in range(17)]
_BOXES = [json.dumps({"index": i % 3, "bbox_2d": [a, b, c, d]}) for i, (a, b, c, d) in enumerate(zip(_GRID, _GRID[3:] + _GRID[:3], _GRID[1:] + _GRID[:1], _GRID[4:] + _GRID[:4]))]

_CORPUS = [
    *(getattr(prompts, slot) for prompts in DEFAULT_PROMPTS.values() for slot in ("system", "user", "response", "response_final")),
    " ".join(_BOXES),
    "The bar is too small to see. Zoom in on the red frame. Still too small. Zoom in again. The bar is rising.",
    "Both bars are too small to see. Zoom in on both red frames. the bar inside the red frame. the bars inside the red frames",
    *(  # the templates' lines as the model sees them, sizes and indices filled in
        prompts.image_index.format(index=0) + prompts.single_image.format(width=112, height=112)
        + prompts.multi_image.format(n_frames=2, n_frames_1=1, width=112, height=84)
        + prompts.crop_index.format(current_image_idx=1, width=224, height=224)
        for prompts in DEFAULT_PROMPTS.values()
    ),
    "Which way does the bar inside the red frame point: vertical, horizontal, rising or falling? The bars are falling and vertical.",
    "Do the bars inside the red frames of image 0 and image 1 point the same way? yes no",
    "0123456789 0 1 2 3 4 5 6 7 8 9 10 11 12 100 255 512 1024",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    '{"region": [{"index": 0, "bbox_2d": [10, 20, 30, 40]}], "query": "what digit is in the red frame?"}',
    "What is the digit inside the marked frame? Is the digit in image 0 larger than the digit in image 1?",
    "The answer is A. Yes. No. The letter is B. The shape is a circle, square or triangle.",
    "I need to zoom in on the marked region to read it. The glyph is too small to read.",
]


@lru_cache(maxsize=4)
def _bpe(vocab_size: int) -> tuple[dict, list]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS * 8, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def build_tokenizers(vocab_size: int = 1024) -> tuple[Qwen2Tokenizer, Qwen2Tokenizer]:
    """(chat tokenizer, query tokenizer), built offline in well under a second."""
    vocab, merges = _bpe(vocab_size)

    def make():
        tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=32768)
        tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TOKENS])
        return tokenizer

    chat = make()
    chat.eos_token, chat.pad_token = "<|im_end|>", "<|endoftext|>"
    chat.padding_side = "left"  # batched generation
    query = make()
    eos_id = query.convert_tokens_to_ids("<|endoftext|>")
    query._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos_id)]
    )
    query.padding_side = "right"
    query.model_max_length = 50
    return chat, query


def tiny_config(tokenizer=None, query_tokenizer=None, **overrides) -> ViLaVTConfig:
    """A ~0.3 M-parameter ViLaVT config matching `build_tokenizers()`; `overrides` (nested dicts for
    `vision_config`, `text_config`, `text_encoder_config`) replace any field."""
    if tokenizer is None or query_tokenizer is None:
        tokenizer, query_tokenizer = build_tokenizers()
    ids = tokenizer.convert_tokens_to_ids
    init = overrides.pop("initializer_range", 0.1)
    vision = dict(
        depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
        fullatt_block_indexes=[1, 3], integration_point="late", window_size=112, initializer_range=init,
    )
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        initializer_range=init, tie_word_embeddings=False,
    )
    encoder = dict(
        vocab_size=len(query_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        rope_theta=1000000.0, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|endoftext|>"),
        initializer_range=init,
    )
    for key, part in (("vision_config", vision), ("text_config", text), ("text_encoder_config", encoder)):
        part.update(overrides.pop(key, {}))
    return ViLaVTConfig(
        vision_config=vision,
        text_config=text,
        text_encoder_config=encoder,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
        **overrides,
    )


@dataclass(frozen=True)
class Preset:
    """A named tiny-model size: overrides of `tiny_config` and default processor settings."""

    config: dict
    processor: dict
    description: str


PRESETS = {
    "test": Preset({}, {}, "the test model (~0.3 M parameters)"),
    # The demo model of the synthetic zoom task: a little larger; originals share about 112 x 112 pixels (16 image
    # tokens), crops at their natural 2x zoom (a one-token box gives 56 x 56 pixels, 4 tokens); the compact prompt.
    "demo": Preset(
        config=dict(
            vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128),
            text_config=dict(
                hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
            ),
            text_encoder_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
            initializer_range=0.02,
        ),
        processor=dict(max_pixels=112 * 112, min_pixels=56 * 56, crop_max_pixels=224 * 224, prompt_style="compact"),
        description="the synthetic zoom task's model (2.6 M parameters)",
    ),
    # The benchmarks' model (bench/): ~29 M parameters, ViT depth 8 / hidden 256, LLM 4 layers / hidden 512.
    "small": Preset(
        config=dict(
            vision_config=dict(
                depth=8, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512, fullatt_block_indexes=[3, 7]
            ),
            text_config=dict(
                hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
            ),
            text_encoder_config=dict(
                hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64
            ),
            initializer_range=0.05,
        ),
        processor=dict(crop_max_pixels=448 * 448),
        description="the benchmarks' model (~29 M parameters)",
    ),
}  # fmt: skip


def tiny_processor(tokenizer=None, query_tokenizer=None, max_pixels: int = 56 * 56 * 16, **kwargs) -> ViLaVTProcessor:
    if tokenizer is None or query_tokenizer is None:
        tokenizer, query_tokenizer = build_tokenizers()
    min_pixels = kwargs.pop("min_pixels", 28 * 28 * 4)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return ViLaVTProcessor(
        image_processor, tokenizer, query_tokenizer, max_pixels=max_pixels, min_pixels=min_pixels, **kwargs
    )


def tiny_vilavt(seed: int = 0, attn_implementation: str = "sdpa", processor_kwargs=None, preset: str = "test", **config_overrides):
    """(model, processor): a randomly initialised tiny ViLaVT (float32, eval mode) and its processor.

    `preset` names a size in `PRESETS` ("test", "demo": the synthetic-task model, "small": the benchmarks'
    model). Deterministic for a given seed; no file or network access.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    config_overrides = {**json.loads(json.dumps(PRESETS[preset].config)), **config_overrides}
    processor_kwargs = {**PRESETS[preset].processor, **(processor_kwargs or {})}
    tokenizer, query_tokenizer = build_tokenizers()
    config = tiny_config(tokenizer, query_tokenizer, **config_overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = ViLaVTForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    processor = tiny_processor(tokenizer, query_tokenizer, **(processor_kwargs or {}))
    return model, processor

"""Shared by the benchmarks: the "small" model (about 29 M parameters), the scene, scripted episodes."""

import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from vilavt.scripted import ScriptedPolicy, answer_text, tool_call_text  # noqa: E402
from vilavt.tiny import tiny_vilavt  # noqa: E402

IMAGE_SIDE = 1344  # bench/rollout.py's default image: 1344 x 1344, 2304 image tokens (multiround.py: 1792)
FREE_TOKENS = 48  # thought tokens the model writes itself at the start of every turn


def build(side: int = IMAGE_SIDE):
    """The small model (`vilavt.tiny.PRESETS["small"]`) and a processor that shows a `side` x `side` image as it is
    (side: a multiple of 28)."""
    return tiny_vilavt(seed=0, preset="small", processor_kwargs={"max_pixels": side * side})


def scene(seed=0, side: int = IMAGE_SIDE) -> Image.Image:
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        x, y = (torch.randint(0, side - 60, (2,), generator=g)).tolist()
        draw.rectangle((x, y, x + 60, y + 40), fill=tuple(torch.randint(0, 255, (3,), generator=g).tolist()))
    return image


def script(variant=0):
    """Three tool rounds (one region; a crop plus the original; a crop of a crop), then the answer."""
    shift = 40 * variant
    return [
        (FREE_TOKENS, tool_call_text([(0, [200 + shift, 300, 520 + shift, 620])], "what is in this region")),
        (FREE_TOKENS, tool_call_text([(1, [0, 0, 160, 160]), (0, [700, 100 + shift, 1000, 400 + shift])], "compare")),
        (FREE_TOKENS, tool_call_text([(2, [20, 20, 120, 120])], "read the small text")),
        (FREE_TOKENS, answer_text("B")),
    ]


def inputs_for(processor, seeds):
    """A batch of conversations, one per scene seed (repeated seeds = several rollouts of one prompt)."""
    side = math.isqrt(processor.max_pixels)
    images = {seed: scene(seed, side) for seed in set(seeds)}
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": images[s]}, {"type": "text", "text": "Which option?"}]}]
        for s in seeds
    ]
    batch = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    return batch, [[images[s]] for s in seeds]


def run(model, processor, scripts, incremental=True, seeds=None):
    """Generate one scripted episode per script; returns (seconds, output)."""
    inputs, images = inputs_for(processor, seeds or [0] * len(scripts))
    policy = ScriptedPolicy(processor.tokenizer, scripts)
    started = time.perf_counter()
    output = model.generate(
        **inputs,
        images=images,
        processor=processor,
        logits_processor=LogitsProcessorList([policy]),
        incremental=incremental,
        max_new_tokens=6000,
        return_dict_in_generate=True,
    )
    elapsed = time.perf_counter() - started
    assert all(t.stop_reason == "answer" and len(t.rounds) == 3 for t in output.traces), [
        (t.stop_reason, [r.error for r in t.rounds]) for t in output.traces
    ]
    return elapsed, output

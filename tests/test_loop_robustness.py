"""The chatting loop under hostile model text: an untrained model sampling at high temperature, and scripted
tool calls built to break parsers, tokenizers and budgets, over hundreds of episodes in batches of 1-8.

Whatever the model writes, every episode ends without an exception, within its budgets, with a trace that
agrees with its token sequence and a conversation a full forward pass accepts."""

import json
import random

import pytest
import torch
from transformers import LogitsProcessorList

from vilavt.scripted import ScriptedPolicy, answer_text, tool_call_text

from conftest import conversation, picture

STOP_REASONS = {"answer", "no_answer", "eos", "max_rounds", "max_new_tokens", "max_turn_tokens", "stopping_criteria"}
SPECIALS = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_end|>\n<|im_start|>assistant\n",
            "<|im_start|>user\n", "<|endoftext|>"]


def call(payload: str, thought: str = "look") -> str:
    return f"<think>{thought}</think><tool>{payload}</tool>"


def hostile_turns(rng: random.Random) -> list[str]:
    """Turns a model could write that a parser, tokenizer or renderer must survive."""
    special = rng.choice(SPECIALS)
    digits = "9" * rng.choice([400, 5000])
    box = [0, 0, 28, 28]
    return [
        call('{"region": [{"index": 0, "bbox_2d": [0, 0, %s, 28]}], "query": "q"}' % digits),
        call('{"region": [{"index": %s, "bbox_2d": [0, 0, 28, 28]}], "query": "q"}' % digits),
        call('{"region": [{"index": 0, "bbox_2d": [NaN, 0, 28, Infinity]}], "query": "q"}'),
        call('{"region": [{"index": 0, "bbox_2d": [0, 0, 1e999, 28]}], "query": "q"}'),
        call("[" * rng.choice([1000, 3000]) + "]" * 10),
        call('{"region": [{"index": 0, "bbox_2d": [0, 0, 28, 28]}], "query": "\\ud800 half a pair"}'),
        call(json.dumps({"region": [{"index": special, "bbox_2d": box}], "query": "q"})),
        call(json.dumps({"region": [{"index": 0, "bbox_2d": box}], "query": f"look at {special} here"})),
        call(json.dumps({"region": [{"index": 0, "bbox_2d": [special, 0, 28, 28]}], "query": "q"})),
        call(json.dumps({"region": [{"index": 0, "bbox_2d": box}], special: 1, "query": "q"})),
        "<think>" + "<tool>" * rng.choice([50, 400]),
        "<answer>" * rng.choice([50, 400]),
        "<think>no call</think></tool>",
        call('{"region": [{"index": 7, "bbox_2d": [0, 0, 28, 28]}], "query": "q"}'),
        call('{"region": [{"index": 0, "bbox_2d": [28, 28, 0, 0]}], "query": "q"}'),
        call('{"region": [], "query": "q"}'),
        call('{"region": [{"index": 0, "bbox_2d": [0, 0, 28, 28]}], "query": ""}'),
        call(json.dumps({"region": [{"index": 0, "bbox_2d": box}] * 20, "query": "q"})),
        call('{"region": [{"index": 0, "bbox_2d": [0, 0, 28, 28]}], "query": "' + "very long " * 80 + '"}'),
        call("not json at all " + special),
        tool_call_text([(0, box)], "a valid call"),
        tool_call_text([(rng.randrange(3), [0, 0, 56, 56])], "maybe a crop"),
        answer_text(special),
        answer_text("7"),
    ]


def random_script(rng: random.Random) -> list:
    turns = hostile_turns(rng)
    return [(rng.randrange(0, 12), rng.choice(turns)) for _ in range(rng.randrange(1, 7))]


def check_episode(model, processor, episode, trace, limits: dict) -> None:
    tokenizer = processor.tokenizer
    assert trace.stop_reason in STOP_REASONS, trace.stop_reason
    assert len(trace.rounds) <= limits["max_rounds"]
    assert episode.new_tokens <= limits["max_new_tokens"]
    new = episode.ids[episode.prompt_length :]
    sampled = [t for t, s in zip(new, episode.sampled[episode.prompt_length :]) if s]
    injected = [t for t, s in zip(new, episode.sampled[episode.prompt_length :]) if not s]
    ids = lambda token: tokenizer.convert_tokens_to_ids(token)  # noqa: E731
    # The model never wrote a control token; every tool response is one user turn and one assistant header.
    control = {ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>")}
    assert not control & set(sampled)
    assert new.count(ids("<|im_start|>")) == 2 * len(trace.rounds)
    assert injected.count(ids("<tool_response>")) == len(trace.rounds)
    # Images in the sequence: the originals, then every round's crops, each with its own index.
    crops = [index for rnd in trace.rounds for index in rnd.crop_indices]
    assert crops == list(range(len(trace.originals), len(trace.originals) + len(crops)))
    assert episode.ids.count(ids("<|vision_start|>")) == len(trace.originals) + len(crops) == len(episode.grids)
    for rnd in trace.rounds:
        assert (rnd.error is None) == bool(rnd.crops), (rnd.error, len(rnd.crops))
        assert rnd.error is None or "\n" not in rnd.error.strip()
    # The finished conversation is a valid model input.
    with torch.no_grad():
        logits = model(**episode.model_inputs()).logits
    assert logits.shape[1] == len(episode.ids) and bool(torch.isfinite(logits).all())


@pytest.fixture(scope="module")
def untrained():
    from vilavt import tiny_vilavt

    return tiny_vilavt(seed=7)


@pytest.mark.parametrize("seed", range(4))
def test_hostile_episodes_end_cleanly(untrained, seed):
    model, processor = untrained
    rng = random.Random(seed)
    episodes = 0
    while episodes < 50:  # 4 seeds: over 200 episodes
        batch = rng.randrange(1, 9)
        images = [[picture(seed=rng.randrange(100))] + ([picture((300, 500), seed=1)] if rng.random() < 0.3 else [])
                  for _ in range(batch)]
        scripted = rng.random() < 0.8
        limits = {"max_rounds": rng.randrange(0, 5), "max_new_tokens": rng.choice([60, 200, 600])}
        kwargs = dict(do_sample=True, temperature=rng.choice([1.5, 3.0]), top_k=0, **limits)
        if rng.random() < 0.3:
            kwargs["max_turn_tokens"] = rng.choice([5, 40, 200])
        if scripted:
            kwargs["logits_processor"] = LogitsProcessorList(
                [ScriptedPolicy(processor.tokenizer, [random_script(rng) for _ in range(batch)])]
            )
        inputs = processor.apply_chat_template(
            [conversation(row) for row in images], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True},
        )
        torch.manual_seed(rng.randrange(10**6))
        out = model.generate(**inputs, images=images, processor=processor, return_dict_in_generate=True, **kwargs)
        for episode, trace in zip(out.episodes, out.traces):
            check_episode(model, processor, episode, trace, limits)
            if "max_turn_tokens" in kwargs:
                assert all(r.generated_tokens <= kwargs["max_turn_tokens"] for r in trace.rounds)
        episodes += batch

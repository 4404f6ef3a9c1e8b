"""`generate` outside the tool loop (transformers' own decoding) and the loop's handling of generation
settings: what it honours, what it refuses, and tokens it never samples."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vilavt.scripted import ScriptedPolicy, answer_text, tool_call_text

from conftest import conversation, picture


@pytest.fixture(scope="module")
def inputs(tiny):
    _, processor = tiny
    return processor.apply_chat_template(
        conversation([picture()]), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def plain(tiny, inputs, **kwargs):
    model, processor = tiny
    kwargs.setdefault("max_new_tokens", 6)
    return model.generate(**inputs, processor=processor, tool_loop=False, **kwargs)


def test_plain_greedy_is_transformers_decoding(tiny, inputs):
    """tool_loop=False is transformers' own greedy decoding: each token is the argmax of a full forward."""
    model, _ = tiny
    sequences = plain(tiny, inputs, max_new_tokens=4)
    prompt = inputs["input_ids"].shape[1]
    assert sequences.shape[1] == prompt + 4
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for step in range(4):
        with torch.no_grad():
            logits = model(input_ids=sequences[:, : prompt + step], **images).logits
        assert int(logits[0, -1].argmax()) == int(sequences[0, prompt + step])


def test_plain_path_supports_transformers_features(tiny, inputs):
    greedy = plain(tiny, inputs)
    # Static cache and prompt-lookup (assisted) decoding are exact for greedy decoding.
    assert torch.equal(plain(tiny, inputs, cache_implementation="static"), greedy)
    assert torch.equal(plain(tiny, inputs, prompt_lookup_num_tokens=3), greedy)
    # Beam search with one beam is greedy; with 3 beams it returns 2 sequences per prompt.
    beams = plain(tiny, inputs, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 2 and torch.equal(beams[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat(2, 1))
    # Scores and transition scores, as in transformers.
    model, _ = tiny
    out = plain(tiny, inputs, output_scores=True, return_dict_in_generate=True)
    transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert transition.shape == (1, 6) and bool((transition <= 0).all())
    assert torch.equal(out.sequences, greedy)


def test_plain_path_samples_several_sequences_with_images(tiny, inputs):
    out = plain(tiny, inputs, do_sample=True, num_return_sequences=3, max_new_tokens=8)
    assert out.shape[0] == 3


def test_without_a_processor_generate_decodes_plainly(tiny, inputs):
    """No processor given and none loadable (an in-memory model): transformers' decoding, with a warning."""
    from transformers.testing_utils import CaptureLogger

    from vilavt.remote_code import generation_vilavt

    model, _ = tiny
    fresh = type(model)(model.config).eval()  # the fixture's model may hold a processor from earlier tests
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    with CaptureLogger(generation_vilavt.logger) as captured:
        sequences = fresh.generate(**inputs, max_new_tokens=5)
    assert torch.equal(sequences, plain(tiny, inputs, max_new_tokens=5))
    assert "without the tool loop" in captured.out


@pytest.mark.parametrize(
    "setting",
    [
        {"num_beams": 2},
        {"cache_implementation": "static"},
        {"prompt_lookup_num_tokens": 3},
        {"use_cache": False},
        {"penalty_alpha": 0.6, "top_k": 4},
        {"output_attentions": True},
        {"output_hidden_states": True},
        {"max_length": 50},
        {"low_memory": True},
        {"unknown_argument": 1},
    ],
)
def test_loop_refuses_settings_it_cannot_honour(tiny, inputs, setting):
    model, processor = tiny
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"does not support .*{name}.*tool_loop=False"):
        model.generate(**inputs, processor=processor, max_new_tokens=5, **setting)


def test_loop_scores_and_stop_strings(tiny):
    model, processor = tiny
    script = [(2, tool_call_text([(0, [0, 0, 28, 28])], "red frame")), (1, answer_text("7"))]
    inputs = processor.apply_chat_template(
        conversation([picture()]), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    policy = LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [script])])
    out = model.generate(**inputs, processor=processor, logits_processor=policy, output_scores=True,
                         output_logits=True, return_dict_in_generate=True, max_new_tokens=400)
    episode, scores = out.episodes[0], out.scores[0]
    sampled = [token for token, s in zip(episode.ids, episode.sampled) if s]
    assert scores.shape == (len(sampled), out.logits[0].shape[-1])
    assert [int(row.argmax()) for row in scores] == sampled  # greedy: each token is its scores' argmax
    # A stop string ends the episode where it appears (here: inside the first tool call's JSON).
    stopped = model.generate(**inputs, processor=processor, logits_processor=LogitsProcessorList(
        [ScriptedPolicy(processor.tokenizer, [script])]), stop_strings=["red frame"], return_dict_in_generate=True,
        max_new_tokens=400)
    trace = stopped.traces[0]
    assert trace.stop_reason == "stopping_criteria" and not trace.rounds
    assert processor.tokenizer.decode(stopped.episodes[0].ids).endswith("red frame")


class Boost(LogitsProcessor):
    """A processor (after the loop's own) that pushes the given tokens far above everything else."""

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.ids] += 1e4
        return scores


def test_control_tokens_are_never_sampled(tiny, inputs):
    model, processor = tiny
    tokenizer = processor.tokenizer
    control = [tokenizer.convert_tokens_to_ids(t) for t in
               ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>", "<|im_start|>")]
    out = model.generate(**inputs, processor=processor, logits_processor=LogitsProcessorList([Boost(control)]),
                         do_sample=True, temperature=2.0, max_new_tokens=40, return_dict_in_generate=True)
    sampled = [t for t, s in zip(out.episodes[0].ids, out.episodes[0].sampled) if s]
    assert sampled and not set(sampled) & set(control)

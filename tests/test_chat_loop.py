"""The chatting loop inside generate(): exact against one full forward and against the reference-style
loop, batched == unbatched, and every bad tool call becomes an error the model reads."""

import pytest
import torch
from conftest import chat_inputs, conversation, picture
from PIL import Image
from transformers import LogitsProcessorList, TextStreamer

from vilavt.scripted import ScriptedPolicy, answer_text, tool_call_text

SMALL_BOX = [0, 0, 28, 28]  # inside any displayed image (the smallest is 56 x 56)


def run(tiny, images_per_row, scripts, **kwargs):
    model, processor = tiny
    inputs = chat_inputs(processor, [conversation(images) for images in images_per_row], processor_kwargs={"padding": True})
    kwargs.setdefault("max_new_tokens", 3000)
    return model.generate(
        **inputs,
        images=images_per_row,
        processor=processor,
        logits_processor=LogitsProcessorList([ScriptedPolicy(processor.tokenizer, scripts)]),
        return_dict_in_generate=True,
        **kwargs,
    )


def assert_matches_full_forward(model, output):
    """The logits recorded while decoding equal one forward over each final conversation."""
    for episode, logits in zip(output.episodes, output.logits):
        with torch.no_grad():
            full = model(**episode.model_inputs()).logits[0]
        sampled = torch.tensor([i for i, s in enumerate(episode.sampled) if s])
        torch.testing.assert_close(logits, full[sampled - 1], atol=1e-4, rtol=1e-4)


SCENARIOS = {
    "one image": (
        [picture()],
        [
            (3, tool_call_text([(0, [100, 60, 160, 120])], "red frame")),
            (2, tool_call_text([(0, [10, 10, 90, 70])], "the top left corner")),
            (4, tool_call_text([(0, [0, 0, 56, 56])], "anything else")),
            (3, answer_text("7")),
        ],
    ),
    "two images, one call spanning both": (
        [picture(), picture((300, 500), "navy", seed=1)],
        [
            (3, tool_call_text([(0, [20, 20, 80, 80]), (1, [10, 20, 60, 90])], "compare both")),
            (2, tool_call_text([(1, [0, 0, 56, 56])], "second image")),
            (2, tool_call_text([(2, SMALL_BOX), (3, SMALL_BOX)], "both crops")),
            (5, answer_text("yes")),
        ],
    ),
    "crop of a crop": (
        [picture((900, 700))],
        [
            (2, tool_call_text([(0, [50, 50, 150, 130])], "region")),
            (2, tool_call_text([(1, SMALL_BOX)], "inside the crop")),
            (2, tool_call_text([(2, SMALL_BOX)], "inside the crop of the crop")),
            (2, answer_text("B")),
        ],
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_incremental_loop_is_exact(tiny, scenario):
    images, script = SCENARIOS[scenario]
    incremental = run(tiny, [images], [script], output_logits=True)
    reference = run(tiny, [images], [script], output_logits=True, incremental=False)
    trace = incremental.traces[0]
    assert trace.stop_reason == "answer" and len(trace.rounds) == 3
    assert all(r.error is None and r.crops for r in trace.rounds), [r.error for r in trace.rounds]
    assert_matches_full_forward(tiny[0], incremental)
    assert_matches_full_forward(tiny[0], reference)
    # Greedy decoding (free tokens in every turn) gives the same tokens either way.
    assert torch.equal(incremental.sequences, reference.sequences)
    assert [r.crop_indices for r in trace.rounds] == [r.crop_indices for r in reference.traces[0].rounds]


def test_crop_of_a_crop_comes_from_the_original(tiny):
    images, script = SCENARIOS["crop of a crop"]
    trace = run(tiny, [images], [script]).traces[0]
    boxes = [r.regions[0]["box_in_original"] for r in trace.rounds]
    assert all(r.regions[0]["source"] == 0 for r in trace.rounds)
    for outer, inner in zip(boxes, boxes[1:]):  # each box lies inside the previous one
        assert outer[0] <= inner[0] < inner[2] <= outer[2] and outer[1] <= inner[1] < inner[3] <= outer[3]


def test_batched_equals_unbatched(tiny):
    """Four rows taking 0, 1, 2 and 3 rounds, with different images, decoded together and alone."""
    rows = [
        ([picture(seed=3)], [(4, answer_text("A"))]),
        ([picture((300, 500), seed=4)], [(2, tool_call_text([(0, SMALL_BOX)], "q1")), (3, answer_text("B"))]),
        SCENARIOS["two images, one call spanning both"][0:1]
        + ([(2, tool_call_text([(0, SMALL_BOX), (1, SMALL_BOX)], "both")), (1, tool_call_text([(2, SMALL_BOX)], "more")), (2, answer_text("C"))],),
        SCENARIOS["crop of a crop"],
    ]
    together = run(tiny, [images for images, _ in rows], [script for _, script in rows])
    assert [len(t.rounds) for t in together.traces] == [0, 1, 2, 3]
    for row, (images, script) in enumerate(rows):
        alone = run(tiny, [images], [script])
        mine, theirs = together.episodes[row], alone.episodes[0]
        assert mine.ids[mine.prompt_length :] == theirs.ids[theirs.prompt_length :], f"row {row} differs"
        assert mine.sampled == theirs.sampled
        assert together.traces[row].answer == alone.traces[0].answer


BAD_CALLS = {
    "malformed JSON": ('<think>x</think><tool>{"region": [{"index": 0, </tool>', "is not valid JSON"),
    "missing key": ('<think>x</think><tool>{"query": "a"}</tool>', 'is missing the key "region"'),
    "missing bbox": ('<think>x</think><tool>{"region": [{"index": 0}], "query": "a"}</tool>', 'missing the key "bbox_2d"'),
    "index out of range": (tool_call_text([(5, SMALL_BOX)], "q"), "image index 5 does not exist (valid indices: 0 to 0)"),
    "inverted box": (tool_call_text([(0, [50, 50, 10, 10])], "q"), "is inverted or has zero area"),
    "zero-area box": (tool_call_text([(0, [10, 10, 10, 40])], "q"), "is inverted or has zero area"),
    "out-of-bounds box": (tool_call_text([(0, [0, 0, 5000, 10])], "q"), "is outside image 0"),
    "too many regions": (tool_call_text([(0, SMALL_BOX)] * 3, "q"), "too many regions: 3 (at most 2 per call)"),
    "empty query": (tool_call_text([(0, SMALL_BOX)], "  "), '"query" must be a non-empty string'),
    "unclosed tool": ('<think>x</think><tool>{"region": []', "the <tool> block is not closed with </tool>"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_become_tool_errors(tiny, case):
    bad, message = BAD_CALLS[case]
    output = run(tiny, [[picture()]], [[(2, bad), (2, answer_text("A"))]], max_regions=2)
    trace = output.traces[0]
    assert trace.stop_reason == "answer" and trace.answer == "A"
    assert len(trace.rounds) == 1 and message in trace.rounds[0].error
    text = tiny[1].tokenizer.decode(output.episodes[0].ids)
    assert "<tool_response>[tool error] " + trace.rounds[0].error + "\n" in text


def test_frame_index_that_does_not_exist(tiny):
    frames = [picture((200, 150), seed=s) for s in range(3)]  # a video as a list of frames
    trace = run(tiny, [frames], [[(1, tool_call_text([(7, SMALL_BOX)], "q")), (1, answer_text("A"))]]).traces[0]
    assert trace.rounds[0].error.startswith("image index 7 does not exist (valid indices: 0 to 2)")


def test_box_that_rounds_to_zero_pixels_of_the_original(tiny):
    small = picture((50, 50))  # shown at 56 x 56, larger than the original
    trace = run(tiny, [[small]], [[(1, tool_call_text([(0, [0, 0, 0.5, 20])], "q")), (1, answer_text("A"))]]).traces[0]
    assert "covers less than one pixel of the original image" in trace.rounds[0].error


def test_long_query_is_truncated_and_said_so(tiny):
    query = "the small red frame in the lower right " * 20
    output = run(tiny, [[picture()]], [[(1, tool_call_text([(0, SMALL_BOX)], query)), (1, answer_text("A"))]])
    trace = output.traces[0]
    assert trace.rounds[0].error is None and trace.rounds[0].crops
    assert "only its first 50 were used" in trace.rounds[0].notes[0]
    assert "Note: the query is longer than 50 tokens" in tiny[1].tokenizer.decode(output.episodes[0].ids)
    assert int(output.episodes[0].query_mask[-1].sum()) == 50


def test_round_budget_ends_the_episode(tiny):
    calls = [(1, tool_call_text([(0, SMALL_BOX)], f"q{i}")) for i in range(6)]
    output = run(tiny, [[picture()]], [calls], max_rounds=2)
    trace = output.traces[0]
    assert trace.stop_reason == "max_rounds" and len(trace.rounds) == 2
    text = tiny[1].tokenizer.decode(output.episodes[0].ids)
    final = tiny[1].prompts.response_final.split("<")[0]  # its words, before the protocol tags
    assert text.count(final) == 1 and text.index(final) > text.index("q1")


@pytest.mark.parametrize("budget", [40, 41, 200])
def test_token_budget_ends_a_rambling_episode(tiny, budget):
    """A model that never ends its turn (end-of-turn and tags banned) stops at exactly the token budget, tool
    responses included: here one call, then rambling."""
    script = [(3, tool_call_text([(0, SMALL_BOX)], "q")), (10_000, "")]
    output = run(tiny, [[picture()]], [script], max_new_tokens=budget)
    episode, trace = output.episodes[0], output.traces[0]
    assert trace.stop_reason == "max_new_tokens"
    assert episode.new_tokens == budget if trace.rounds else episode.new_tokens <= budget
    assert len(trace.rounds) == (1 if budget == 200 else 0)  # a 40-token budget cannot hold the tool response


def test_errors_count_against_the_round_budget(tiny):
    bad = [(1, BAD_CALLS["malformed JSON"][0])] * 5
    trace = run(tiny, [[picture()]], [bad], max_rounds=3).traces[0]
    assert trace.stop_reason == "max_rounds" and len(trace.rounds) == 3
    assert all("not valid JSON" in r.error for r in trace.rounds)


def test_missing_image_file_is_an_error_before_generation(tiny, tmp_path):
    model, processor = tiny
    from vilavt.remote_code.processing_vilavt import ImageLoadError

    with pytest.raises(ImageLoadError, match="missing.png: image file not found"):
        model.chat(tmp_path / "missing.png", "What?", processor=processor)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="broken.png: not a readable image"):
        model.chat([picture(), broken], "What?", processor=processor)


def test_chat_returns_answer_and_a_drawable_trace(tiny, tmp_path):
    model, processor = tiny
    images, script = SCENARIOS["crop of a crop"]
    answer, trace = model.chat(
        images[0], "What?", processor=processor, logits_processor=LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [script])])
    )
    assert answer == "B" and len(trace.rounds) == 3
    assert trace.rounds[0].query == "region" and trace.rounds[0].regions[0]["bbox_2d"] == [50, 50, 150, 130]
    assert trace.rounds[1].generated_tokens > 0 and trace.rounds[1].injected_tokens > 0
    path = trace.save_png(tmp_path / "trace.png")
    with Image.open(path) as drawn:
        assert drawn.width >= 320 and drawn.height > 100


def test_num_return_sequences_and_sampling(tiny):
    images, script = SCENARIOS["one image"]
    torch.manual_seed(0)
    output = run(tiny, [images], [script, script], do_sample=True, temperature=1.0, num_return_sequences=2, output_logits=True)
    assert output.sequences.shape[0] == 2 and len(output.traces) == 2
    assert all(t.stop_reason == "answer" for t in output.traces)
    free = [[ep.ids[i] for i, s in enumerate(ep.sampled) if s] for ep in output.episodes]
    assert free[0] != free[1]  # the free tokens were sampled independently
    assert_matches_full_forward(tiny[0], output)


def test_streamer_receives_the_whole_conversation(tiny, capsys):
    model, processor = tiny
    images, script = SCENARIOS["one image"]
    inputs = processor.apply_chat_template(
        conversation(images), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True)
    output = model.generate(
        **inputs,
        images=[images],
        processor=processor,
        streamer=streamer,
        logits_processor=LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [script])]),
        return_dict_in_generate=True,
    )
    printed = capsys.readouterr().out
    episode = output.episodes[0]
    # Everything new, with each image as <|vision_start|><|vision_end|> (its placeholder run left out).
    image_pad = model.config.image_token_id
    expected = processor.tokenizer.decode([i for i in episode.ids[episode.prompt_length :] if i != image_pad])
    assert printed.strip() == expected.strip()
    assert "<tool_response>" in printed and "<|vision_start|><|vision_end|>" in printed
    assert "<|image_pad|>" not in printed


def test_plain_tensor_output(tiny):
    model, processor = tiny
    inputs = processor.apply_chat_template(
        conversation([picture()]), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    sequences = model.generate(**inputs, processor=processor, max_new_tokens=5)
    assert isinstance(sequences, torch.Tensor) and sequences.shape[1] <= inputs["input_ids"].shape[1] + 5
    assert torch.equal(sequences[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])


def test_growing_cache_matches_dynamic_cache():
    """The loop's cache writes into spare capacity; it must hold exactly what DynamicCache's concatenation
    holds, through growth, row selection (finished rows leave) and column pruning (shared padding)."""
    from transformers.cache_utils import DynamicCache

    from vilavt.remote_code.cache_vilavt import GrowingCache

    torch.manual_seed(0)
    grown, reference = GrowingCache(), DynamicCache()
    for step, width in enumerate([300, 1, 1, 257, 1, 600, 1]):
        rows = 4 if step <= 3 else 3
        for layer in range(2):
            k, v = torch.randn(rows, 2, width, 8), torch.randn(rows, 2, width, 8)
            got, want = grown.update(k, v, layer), reference.update(k, v, layer)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert grown.get_seq_length() == reference.get_seq_length()
        if step == 3:  # a row leaves
            for cache in (grown, reference):
                cache.batch_select_indices(torch.tensor([0, 2, 3]))
        if step == 4:  # drop two columns, as ChatSession.drop does for padding no row needs
            columns = torch.tensor([c for c in range(reference.get_seq_length()) if c not in (5, 9)])
            for cache in (grown, reference):
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, columns], layer.values[:, :, columns]
    for a, b in zip(grown.layers, reference.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert grown.layers[0]._key_buffer.shape[-2] > grown.get_seq_length()  # spare capacity is being used

"""The vLLM backend against the transformers loop, from the same checkpoint: same tokens, boxes and answers
on scripted episodes, query-aware features, prefix-cache and encoder accounting from vLLM's own counters,
batching, and bad input. Runs only in the vLLM environment: `python -m pytest --vllm tests/test_vllm.py`
(scripts/vllm-env builds it; .ci/run does both)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

for key, value in {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from conftest import conversation, picture  # noqa: E402
from test_chat_loop import BAD_CALLS  # noqa: E402
from test_generate_paths import Boost  # noqa: E402
from test_loop_robustness import SPECIALS, hostile_turns  # noqa: E402
from vilavt import tiny_vilavt  # noqa: E402
from vilavt.scripted import ScriptedPolicy, answer_text, tool_call_text  # noqa: E402

FREE = 4  # thought tokens the model writes itself at the start of every turn
# The tiny "demo" architecture (head_dim 32: vLLM's CPU attention has no kernel for the test preset's 16), with
# originals large enough (1296 image tokens) that a conversation's prefix dominates each new round.
PROCESSOR = dict(max_pixels=1008 * 1008, crop_max_pixels=112 * 112, prompt_style="compact")

SCENARIOS = {
    # one image, three calls on it
    "one image": (
        [(1100, 1100)],
        [
            (FREE, tool_call_text([(0, [56, 56, 280, 280])], "what is in this region")),
            (FREE, tool_call_text([(0, [300, 100, 500, 300])], "and here")),
            (FREE, tool_call_text([(0, [100, 400, 400, 600])], "the lower part")),
            (FREE, answer_text("B")),
        ],
    ),
    # two images, one call spanning both (encoded jointly), then calls on the crops
    "two images, joint call": (
        [(1200, 900), (1000, 1000)],
        [
            (FREE, tool_call_text([(0, [10, 10, 200, 150]), (1, [50, 50, 250, 250])], "compare the frames")),
            (FREE, tool_call_text([(2, [0, 0, 56, 56])], "the first crop")),
            (FREE, tool_call_text([(3, [10, 10, 80, 80]), (1, [300, 300, 400, 400])], "again both")),
            (FREE, answer_text("yes")),
        ],
    ),
    # a crop of a crop of a crop
    "crop of a crop": (
        [(1200, 1000)],
        [
            (FREE, tool_call_text([(0, [100, 100, 400, 400])], "zoom")),
            (FREE, tool_call_text([(1, [0, 0, 56, 56])], "zoom further")),
            (FREE, tool_call_text([(2, [0, 0, 28, 28])], "read the small text")),
            (FREE, answer_text("rising")),
        ],
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, processor = tiny_vilavt(seed=0, preset="demo", processor_kwargs=PROCESSOR)
    folder = tmp_path_factory.mktemp("vilavt-vllm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    from vilavt.vllm.api import ViLaVTVLLM, load_engine

    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    folder, _, processor = checkpoint
    llm = load_engine(folder, dtype="float32", max_model_len=8192, enforce_eager=True, block_size=32, seed=0)
    return ViLaVTVLLM(llm, processor)


def scenario_images(sizes, seed=0):
    return [picture(size, seed=seed + i) for i, size in enumerate(sizes)]


def prompt_inputs(processor, images_per_row):
    conversations = [conversation(images) for images in images_per_row]
    return processor.apply_chat_template(
        conversations if len(conversations) > 1 else conversations[0],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True},
    )  # fmt: skip


def run_transformers(checkpoint, images_per_row, scripts, **kwargs):
    _, model, processor = checkpoint
    return model.generate(
        **prompt_inputs(processor, images_per_row), images=images_per_row, processor=processor,
        logits_processor=LogitsProcessorList([ScriptedPolicy(processor.tokenizer, scripts)]),
        return_dict_in_generate=True, max_new_tokens=kwargs.pop("max_new_tokens", 4000), **kwargs,
    )  # fmt: skip


def encoder_log(engine):
    return [n for log in engine.llm.apply_model(lambda m: list(m.encoder_log)) for n in log]


def clear_encoder_log(engine):
    engine.llm.apply_model(lambda m: m.encoder_log.clear())


def run_vllm(engine, images_per_row, scripts, reset=True, **kwargs):
    """The vLLM loop, from an empty prefix cache; returns (output, images encoded per encoder call)."""
    if reset:
        engine.llm.reset_prefix_cache(reset_running_requests=True) if _accepts_running(engine) else engine.llm.reset_prefix_cache()
    clear_encoder_log(engine)
    processor = engine.processor
    output = engine.generate(
        **prompt_inputs(processor, images_per_row), images=images_per_row,
        logits_processor_factory=lambda row: LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [scripts[row]])]),
        return_dict_in_generate=True, max_new_tokens=kwargs.pop("max_new_tokens", 4000), **kwargs,
    )  # fmt: skip
    return output, encoder_log(engine)


def _accepts_running(engine):
    import inspect

    return "reset_running_requests" in inspect.signature(engine.llm.reset_prefix_cache).parameters


def assert_same_episode(theirs, mine):
    """Same tokens (sampled and injected), same boxes and queries, same answer and stop."""
    assert mine.ids == theirs.ids
    assert mine.sampled == theirs.sampled
    assert [r.regions for r in mine.trace.rounds] == [r.regions for r in theirs.trace.rounds]
    assert [r.query for r in mine.trace.rounds] == [r.query for r in theirs.trace.rounds]
    assert [r.error for r in mine.trace.rounds] == [r.error for r in theirs.trace.rounds]
    assert (mine.trace.answer, mine.trace.stop_reason) == (theirs.trace.answer, theirs.trace.stop_reason)


@pytest.fixture(scope="module")
def scenario_runs(checkpoint, engine):
    runs = {}
    for name, (sizes, script) in SCENARIOS.items():
        images = [scenario_images(sizes)]
        reference = run_transformers(checkpoint, images, [script])
        mine, encoded = run_vllm(engine, images, [script])
        authors, authors_encoded = run_vllm(engine, images, [script], hashing="authors")
        runs[name] = (reference, mine, encoded, authors, authors_encoded)
    return runs


@pytest.mark.parametrize("name", SCENARIOS)
def test_scripted_episode_equals_the_transformers_loop(scenario_runs, name, tmp_path):
    reference, mine, *_ = scenario_runs[name]
    theirs, ours = reference.episodes[0], mine.episodes[0]
    assert len(ours.trace.rounds) == 3 and ours.trace.stop_reason == "answer"
    assert all(r.error is None and r.crops for r in ours.trace.rounds)
    assert_same_episode(theirs, ours)
    assert torch.equal(mine.sequences, reference.sequences.cpu())
    assert Image.open(ours.trace.save_png(tmp_path / "trace.png")).size[0] > 0


@pytest.mark.parametrize("name", SCENARIOS)
def test_prefix_cache_serves_every_later_round(scenario_runs, name):
    _, mine, encoded, *_ = scenario_runs[name]
    requests = mine.episodes[0].vllm_requests
    assert len(requests) == 4  # three tool rounds, then the answer
    assert requests[0].cached_tokens == 0
    rates = [r.cache_hit_rate for r in requests[1:]]
    assert min(rates) >= 0.9, rates
    # The encoder ran on the originals, then on each round's new crops only.
    crops = [len(r.crops) for r in mine.traces[0].rounds]
    assert encoded == [len(SCENARIOS[name][0])] + crops, encoded


@pytest.mark.parametrize("name", SCENARIOS)
def test_authors_hashing_loses_the_cache(scenario_runs, name):
    _, mine, encoded, authors, authors_encoded = scenario_runs[name]
    assert_same_episode(mine.episodes[0], authors.episodes[0])  # same features, only the hashes differ
    ours = [r.cache_hit_rate for r in mine.episodes[0].vllm_requests[1:]]
    theirs = [r.cache_hit_rate for r in authors.episodes[0].vllm_requests[1:]]
    assert max(theirs) < 0.9 <= min(ours), (ours, theirs)
    assert sum(authors_encoded) > sum(encoded)  # originals and old crops encoded again every round


def test_query_changes_only_that_crops_features(checkpoint, engine):
    """vLLM-side features (embed_multimodal on the loop's items) equal the transformers model's; changing a
    crop's query changes that crop's features and leaves the original's as they were."""
    from vilavt.vllm.processing import add_query_fields

    _, model, processor = checkpoint
    original = processor.fit_originals([picture((640, 480))])[0]
    crops = [picture((112, 84), seed=5), picture((84, 112), seed=6)]

    def features(query):
        images = [original, *crops]
        outputs = processor.image_processor(images=images, size=processor.size_keeping(images), return_tensors="pt")
        joint = list(crops)
        fields = add_query_fields(processor, dict(outputs), ["", query, query], [None, joint, joint], [0, 0, 1])
        mine = engine.llm.apply_model(lambda m: [f.clone() for f in m.embed_multimodal(**fields)])[0]
        encoding, _ = processor.tokenize_queries(["", query])
        theirs = model.model.get_image_features(
            outputs["pixel_values"], outputs["image_grid_thw"], query_ids=encoding["query_ids"],
            query_attention_mask=encoding["query_attention_mask"], image_to_query_mapping=torch.tensor([0, 1, 1]),
        ).pooler_output  # fmt: skip
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return mine

    first, second = features("the red frame"), features("the blue circle")
    assert torch.equal(first[0], second[0])
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(first[1:], second[1:]))


def test_batch_of_eight_equals_one_at_a_time(engine):
    """Eight conversations with 0 to 3 tool rounds in flight together give what each gives alone."""
    scripts, images = [], []
    for row in range(8):
        rounds = row % 4
        calls = [(FREE, tool_call_text([(i, [0, 0, 56, 56])], f"look {row}.{i}")) for i in range(rounds)]
        scripts.append(calls + [(FREE, answer_text(str(row)))])
        images.append([picture((300 + 40 * row, 300), seed=row)])
    together, _ = run_vllm(engine, images, scripts)
    assert [len(t.rounds) for t in together.traces] == [row % 4 for row in range(8)]
    for row in range(8):
        alone, _ = run_vllm(engine, [images[row]], [scripts[row]])
        assert_same_episode(alone.episodes[0], together.episodes[row])


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_get_the_same_tool_errors(checkpoint, engine, case):
    bad, message = BAD_CALLS[case]
    script = [(2, bad), (2, answer_text("A"))]
    images = [[picture()]]
    reference = run_transformers(checkpoint, images, [script], max_regions=2)
    mine, _ = run_vllm(engine, images, [script], max_regions=2)
    assert message in mine.traces[0].rounds[0].error
    assert_same_episode(reference.episodes[0], mine.episodes[0])


@pytest.mark.parametrize("limits", [dict(max_rounds=2), dict(max_new_tokens=120), dict(max_turn_tokens=6)])
def test_budgets_end_episodes_as_in_the_transformers_loop(checkpoint, engine, limits):
    calls = [(1, tool_call_text([(0, [0, 0, 56, 56])], f"q{i}")) for i in range(6)]
    images = [[picture()]]
    reference = run_transformers(checkpoint, images, [calls], **dict(limits))
    mine, _ = run_vllm(engine, images, [calls], **dict(limits))
    assert_same_episode(reference.episodes[0], mine.episodes[0])


def test_logprobs_are_the_policys_as_in_the_transformers_loop(checkpoint, engine):
    """`output_logprobs`: log-softmax(logits / temperature) of each sampled token, before the logits processors and
    the control-token ban — greedy: equal to the transformers loop's; sampled (temperature 0.7): equal to a full
    forward of the transformers model over the vLLM episode."""
    _, model, processor = checkpoint
    sizes, script = SCENARIOS["two images, joint call"]
    images = [scenario_images(sizes)]
    reference = run_transformers(checkpoint, images, [script], output_logprobs=True)
    mine, _ = run_vllm(engine, images, [script], output_logprobs=True)
    assert_same_episode(reference.episodes[0], mine.episodes[0])
    assert len(mine.logprobs[0]) == sum(mine.episodes[0].sampled)
    torch.testing.assert_close(mine.logprobs[0], reference.logprobs[0], rtol=0, atol=1e-4)

    sampled, _ = run_vllm(engine, images, [script], output_logprobs=True, do_sample=True, temperature=0.7, seed=3)
    episode = sampled.episodes[0]
    with torch.no_grad():
        logits = model(**episode.model_inputs()).logits[0].float()
    positions = torch.tensor([i for i, s in enumerate(episode.sampled) if s])
    expected = torch.log_softmax(logits[positions - 1] / 0.7, dim=-1)[torch.arange(len(positions)), torch.tensor(episode.ids)[positions]]
    torch.testing.assert_close(sampled.logprobs[0], expected, rtol=0, atol=1e-4)
    assert not torch.allclose(sampled.logprobs[0], torch.log_softmax(logits[positions - 1], -1)[
        torch.arange(len(positions)), torch.tensor(episode.ids)[positions]], atol=1e-3)  # the temperature counts


def test_control_tokens_are_never_sampled(checkpoint, engine):
    """The ban comes after every logits processor, as in the transformers loop: pushed far above everything, the
    control tokens are still never sampled, and greedy decoding gives the transformers loop's tokens."""
    _, _, processor = checkpoint
    tokenizer = processor.tokenizer
    control = [tokenizer.convert_tokens_to_ids(t) for t in
               ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>", "<|im_start|>")]
    images = [[picture()]]
    inputs = prompt_inputs(processor, images)
    boost = LogitsProcessorList([Boost(control)])
    sampled = engine.generate(**inputs, logits_processor=boost, do_sample=True, temperature=2.0, seed=0,
                              max_new_tokens=40, return_dict_in_generate=True).episodes[0]
    tokens = [t for t, s in zip(sampled.ids, sampled.sampled) if s]
    assert tokens and not set(tokens) & set(control)
    _, model, _ = checkpoint
    reference = model.generate(**inputs, processor=processor, logits_processor=boost, max_new_tokens=40,
                               return_dict_in_generate=True).episodes[0]
    mine = engine.generate(**inputs, logits_processor=boost, max_new_tokens=40, return_dict_in_generate=True).episodes[0]
    assert mine.ids == reference.ids


class FirstChoice:
    """`hostile_turns`' random choices, pinned: the shortest lengths, `special` as the i-th special token."""

    def __init__(self, special: int = 0):
        self.special = special

    def choice(self, options):
        return SPECIALS[self.special] if options is SPECIALS else options[0]

    def randrange(self, stop):
        return 0


@pytest.mark.parametrize("special", [0, 4])
def test_hostile_tool_calls_get_the_same_responses(checkpoint, engine, special):
    """The robustness suite's hostile turns (parser, tokenizer and renderer traps, control tokens spelled in the
    text), one per conversation, all in flight together: every episode equals the transformers loop's."""
    turns = hostile_turns(FirstChoice(special))
    scripts = [[(1, turn), (1, answer_text("A"))] for turn in turns]
    images = [[picture(seed=row)] for row in range(len(turns))]
    reference = run_transformers(checkpoint, images, scripts, max_new_tokens=3000)
    mine, _ = run_vllm(engine, images, scripts, max_new_tokens=3000)
    errors = 0
    for row in range(len(turns)):
        assert_same_episode(reference.episodes[row], mine.episodes[row])
        errors += any(r.error for r in mine.traces[row].rounds)
    assert errors >= len(turns) // 2  # most of them are errors the model reads


def test_chat_mirrors_the_model(checkpoint, engine, tmp_path):
    _, model, processor = checkpoint
    image = picture()
    answer, trace = engine.chat(image, "What is in the red frame?", max_new_tokens=30)
    reference_answer, reference = model.chat(image, "What is in the red frame?", processor=processor, max_new_tokens=30)
    assert (answer, trace.text, trace.stop_reason) == (reference_answer, reference.text, reference.stop_reason)
    assert trace.save_png(tmp_path / "chat.png")


def vilavt_cli(*args, tmp_path) -> str:
    """The `vilavt` command of this environment, in a fresh process (its own vLLM engine), with the CPU settings."""
    env = {**os.environ, "VLLM_USE_AOT_COMPILE": "0", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
           "VLLM_CONFIGURE_LOGGING": "0"}  # vLLM's log lines on stderr, not among the command's output
    command = [str(Path(sys.executable).parent / "vilavt"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def test_cli_backend_vllm_answers_as_the_transformers_backend(tmp_path):
    """`vilavt synth-eval` and `vilavt chat` on the shipped checkpoint: the same answers, rounds and accuracy with
    `--backend vllm` as with the transformers model."""
    evals = [
        json.loads(vilavt_cli("synth-eval", "--n", "6", "--type", "single,multi", "--no-progress", *backend,
                              tmp_path=tmp_path).strip().splitlines()[-1])
        for backend in ([], ["--backend", "vllm"])
    ]  # fmt: skip
    assert evals[0] == evals[1] and evals[0]["n"] == 6
    picture().save(tmp_path / "scene.png")
    chats = [
        vilavt_cli("chat", "--image", "scene.png", "--question", "What is in the red frame?", *backend, tmp_path=tmp_path)
        for backend in ([], ["--backend", "vllm"])
    ]
    assert chats[0] == chats[1] and "answer:" in chats[0]


@pytest.mark.parametrize("group", ["vllm.general_plugins", "vllm.logits_processors"])
def test_missing_entry_point_is_one_clear_error(monkeypatch, group):
    import importlib.metadata

    from vilavt.vllm import ENTRY_POINTS, VLLMBackendError, check_backend

    installed = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None, _missing=group: [] if group == _missing else installed(group=group))
    with pytest.raises(VLLMBackendError, match=re.escape(f'"{group}"] {ENTRY_POINTS[group]}')):
        check_backend()


def test_processors_need_the_engine_in_this_process(checkpoint, engine, monkeypatch):
    """With vLLM's engine core in another process, the loop's registry (logits processors, log-prob records) is out
    of its reach: one clear error before any request."""
    import vilavt.vllm.loop
    from vilavt.vllm import VLLMBackendError

    monkeypatch.setattr(vilavt.vllm.loop, "in_process", lambda llm: False)
    inputs = prompt_inputs(checkpoint[2], [[picture()]])
    with pytest.raises(VLLMBackendError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        engine.generate(**inputs, output_logprobs=True, max_new_tokens=5)
    assert not engine.llm.llm_engine.has_unfinished_requests()


def test_vllm_lacking_a_feature_is_one_clear_error(monkeypatch):
    import vllm

    from vilavt.vllm import VLLMBackendError, check_backend

    monkeypatch.delattr(vllm.LLM, "apply_model")
    with pytest.raises(VLLMBackendError, match=r"lacks vllm.LLM.apply_model"):
        check_backend()


def test_bad_image_items_are_rejected():
    from vilavt.vllm.processing import normalise_item

    image = picture()
    assert normalise_item(image)["query"] == ""
    for bad, message in [
        ("photo.jpg", "is a PIL image"),
        ({"image": image, "query": 3}, '"query" must be a string'),
        ({"image": image, "joint": [image], "joint_index": 2}, "joint_index"),
        ({"image": image, "colour": "red"}, "unknown keys"),
    ]:
        with pytest.raises(ValueError, match=message):
            normalise_item(bad)

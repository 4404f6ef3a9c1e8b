"""Two-stage training with TRL on the tiny model (CPU): trajectory replay and labels, SFT, GRPO with
ViLaVT rollouts, LoRA / QLoRA, and checkpoints that reload with trust_remote_code."""

import json
import re

import pytest
import torch
from conftest import TRAJECTORIES, replay_live, run_python
from PIL import Image
from transformers import LogitsProcessorList

from vilavt import tiny_vilavt
from vilavt.scripted import ScriptedPolicy, answer_text
from vilavt.trajectories import TrajectoryCollator, TrajectoryError, build_episode, load_trajectories, runs_of_model_turns
from vilavt.remote_code.protocol_vilavt import render_tool_call

def base_config(data, output_dir, **extra):
    return dict(
        train_file=str(data / "train.jsonl"),
        image_root=str(data),
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        **extra,
    )


def test_labels_cover_exactly_the_assistant_turns(tiny, data):
    model, processor = tiny
    episode = build_episode(TRAJECTORIES[0], processor, model.config, image_root=data)
    tokenizer = processor.tokenizer
    trained = [tokenizer.decode(episode.ids[i:j]) for i, j in runs_of_model_turns(episode)]
    first_box = episode.trace.rounds[0].regions[0]["bbox_2d"]
    assert trained == [
        render_tool_call([(0, first_box)], "the red frame", "too small") + "<|im_end|>\n",
        render_tool_call([(1, [0, 0, 28, 28])], "its centre", "closer") + "<|im_end|>\n",
        answer_text("B", "it is B") + "<|im_end|>\n",
    ]
    # Token by token: every label is either the token (assistant) or ignored; image and tool tokens ignored.
    batch = TrajectoryCollator(processor, model.config, image_root=data)([TRAJECTORIES[0]])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    for position, (token, label, trained_here) in enumerate(zip(ids.tolist(), labels.tolist(), episode.sampled)):
        assert label == (token if trained_here else -100), position
    assert not (labels == processor.image_token_id).any()
    untrained = tokenizer.decode([t for t, s in zip(episode.ids, episode.sampled) if not s])
    assert untrained.count("<tool_response>") == 2 and "zoom-in tool" in untrained  # system prompt, tool turns


def test_trajectories_replay_through_the_live_loop(tiny, data):
    """The SFT sequence of a trajectory is the sequence the chatting loop produces when the model writes
    the same turns: same tokens, images, queries and mapping."""
    model, processor = tiny
    for row in TRAJECTORIES:
        episode, output = replay_live(model, processor, row, data)
        live = output.episodes[0]
        assert live.trace.answer == row["answer"]
        assert live.ids == episode.ids[: len(live.ids)] and episode.ids[len(live.ids) :] == processor.tokenizer.encode("\n")
        assert torch.equal(live.grids, episode.grids) and live.mapping == episode.mapping
        assert all(torch.equal(a, b) for a, b in zip(live.pixel_rows, episode.pixel_rows))
        assert all(torch.equal(a, b) for a, b in zip(live.query_ids, episode.query_ids))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["turns"][0]["regions"][0].update(index=3), "two-rounds, turn 0: image index 3 does not exist yet"),
        (lambda r: r["turns"][1]["regions"][0].update(bbox_2d=[0, 0, 5000, 5]), "two-rounds, turn 1: the tool call fails on replay: bbox_2d"),
        (lambda r: r["turns"].pop(), "two-rounds: the last turn must give the answer"),
        (lambda r: r.update(max_rounds=1), "two-rounds, turn 1: more tool calls than the round budget"),
    ],
)
def test_bad_trajectories_are_named(tiny, data, change, message):
    model, processor = tiny
    row = json.loads(json.dumps(TRAJECTORIES[0]))
    change(row)
    with pytest.raises(TrajectoryError, match=message.replace("(", r"\(")):
        build_episode(row, processor, model.config, image_root=data)


def test_a_zero_round_budget_refuses_tool_calls(tiny, data):
    model, processor = tiny
    with pytest.raises(TrajectoryError, match=r"two-rounds, turn 0: more tool calls than the round budget \(0\)"):
        build_episode(TRAJECTORIES[0], processor, model.config, image_root=data, max_rounds=0)


def test_corrupt_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TRAJECTORIES[0]) + "\n{not json\n")
    with pytest.raises(TrajectoryError, match=r"bad.jsonl:2: invalid JSON"):
        load_trajectories(path)


def test_trainable_parts():
    from vilavt.train.common import set_trainable
    from vilavt.train.config import GRPO_TRAINABLE, SFT_TRAINABLE

    model, _ = tiny_vilavt(seed=1)
    sft = set_trainable(model, SFT_TRAINABLE)
    assert sft["text_encoder"] == sft["text_proj"] == 0 and min(sft[p] for p in ("llm", "vit", "merger", "instruct")) > 0
    assert all(not p.requires_grad for p in model.model.text_encoder.parameters())
    grpo = set_trainable(model, GRPO_TRAINABLE)
    assert grpo["vit"] == grpo["merger"] == grpo["instruct"] == 0 and grpo["llm"] > 0 and grpo["text_proj"] > 0
    with pytest.raises(ValueError, match="unknown trainable parts"):
        set_trainable(model, {"decoder": True})


def test_sft_lowers_the_loss_and_saves_a_remote_code_checkpoint(data, tmp_path):
    """Three steps on a fixed batch of two trajectories with different crop counts (2 and 2+1 images)."""
    from vilavt.train.common import save_checkpoint
    from vilavt.train.sft import build_sft_trainer

    trainer = build_sft_trainer(base_config(data, tmp_path / "sft", max_steps=3, learning_rate=1e-3, model="tiny:0"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[2] < losses[0] - 0.3, losses
    folder = save_checkpoint(trainer.model, trainer.processing_class, tmp_path / "sft" / "final")
    assert_reloads(folder)


def assert_reloads(folder):
    out = run_python(
        f"""
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
answer, trace = model.chat(Image.new("RGB", (200, 150), "red"), "What?", processor=processor, max_new_tokens=30)
print(type(model).__name__, trace.stop_reason)
"""
    )
    assert out.startswith("ViLaVTForConditionalGeneration")


def question(prompt: list[dict]) -> str:
    """The question of a GRPO prompt (a conversation whose user turn holds image items, then the text)."""
    return next(item["text"] for item in prompt[-1]["content"] if item.get("type") == "text")


@pytest.fixture(scope="module")
def grpo_run(data, tmp_path_factory):
    """Two GRPO steps, two generations per prompt; the rollouts call the tool (scripted), one of each
    pair answers right and one wrong, so rewards differ within each group."""
    from vilavt.train.grpo import build_grpo_trainer

    model, processor = tiny_vilavt(seed=0)

    answers = {row["question"]: row["answer"] for row in TRAJECTORIES}

    def scripted(prompts):
        scripts = [
            [(2, render_tool_call([(0, [0, 0, 56, 56])], "look", "zoom")), (2, answer_text(answers[question(p)] if i % 2 == 0 else "Z"))]
            for i, p in enumerate(prompts)
        ]
        return LogitsProcessorList([ScriptedPolicy(processor.tokenizer, scripts)])

    output_dir = tmp_path_factory.mktemp("grpo")
    config = base_config(
        data, output_dir, max_steps=2, num_generations=2, learning_rate=1e-4, max_completion_length=600, max_rounds=3
    )
    trainer = build_grpo_trainer(config, model=model, processor=processor, logits_processor_factory=scripted)
    batches = []
    compute_loss = trainer.compute_loss

    def capture(model, inputs, *args, **kwargs):
        batches.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = capture
    trainer.train()
    return trainer, batches


def test_grpo_rollouts_call_the_tool_and_train(grpo_run):
    trainer, batches = grpo_run
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(h["vilavt/rounds_per_episode"] == 1 and h["vilavt/crops_per_episode"] == 1 for h in logs)
    assert all(h["reward_std"] > 0 for h in logs)  # right and wrong answers in each group
    assert all(h["vilavt/accuracy"] == 0.5 and h["vilavt/format_rate"] == 1 for h in logs)  # the reward's parts
    assert all(h["completions/clipped_ratio"] == 0 for h in logs)


def test_grpo_tool_response_tokens_have_zero_loss_weight(grpo_run):
    trainer, batches = grpo_run
    tokenizer = trainer.processing_class.tokenizer
    image_token = trainer.processing_class.image_token_id
    for batch in batches:
        weight = (batch["completion_mask"] * batch["tool_mask"]).bool()
        for ids, real, trained_here in zip(batch["completion_ids"], batch["completion_mask"].bool(), weight):
            trained, injected = ids[trained_here], ids[real & ~trained_here]
            assert "<tool_response>" not in tokenizer.decode(trained)
            assert "<tool_response>" in tokenizer.decode(injected)
            assert not (trained == image_token).any() and (injected == image_token).any()


def test_grpo_scoring_matches_the_rollout_at_step_0(grpo_run):
    trainer, _ = grpo_run
    first = next(h for h in trainer.state.log_history if "vilavt/rollout_logprob_gap" in h)
    assert first["vilavt/rollout_logprob_gap"] < 1e-4


def test_grpo_updates_move_log_probs_with_the_advantage(grpo_run):
    """The policy-gradient's direction: after training, the rewarded completions of the first batch gained
    log-probability than every unrewarded one of the batch (catches advantages or rollouts misaligned with
    the completions they are applied to)."""
    trainer, batches = grpo_run
    batch = batches[0]  # its rollout log-probs are the pre-update policy's (the step-0 gap test)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    trained = batch["completion_mask"] * batch["tool_mask"]
    with trainer.scoring_vision(batch), torch.no_grad():
        after, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, batch["completion_ids"].size(1)
        )
    gained = ((after - batch["sampling_per_token_logps"]) * trained).sum(dim=1)
    advantages = batch["advantages"]
    assert (advantages > 0).any() and (advantages < 0).any()
    assert gained[advantages > 0].min() > gained[advantages < 0].max()


def padded(batch: dict, left: int, right: int) -> dict:
    """`batch` with `left` more padding columns before the prompts and `right` more after the completions."""
    width = batch["completion_ids"].size(1)
    out = dict(batch)
    for key in ("prompt_ids", "prompt_mask"):
        out[key] = torch.nn.functional.pad(batch[key], (left, 0))
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.size(1) == width:
            out[key] = torch.nn.functional.pad(value, (0, right), value=int(key == "tool_mask"))
    return out


def test_grpo_skipping_zero_advantage_rows_leaves_the_update_unchanged(grpo_run, monkeypatch):
    """With beta = 0 and the dapo loss, a completion with advantage 0 adds nothing to the loss: the loss pass
    without it and without the padding columns no kept row needs gives the full batch's loss and gradients."""
    trainer, batches = grpo_run
    batch = padded(batches[0], left=3, right=5)
    batch["advantages"] = batch["advantages"].clone()
    batch["advantages"][1] = 0.0
    widths = []
    score = trainer._get_per_token_logps_and_entropies

    def spy(model, input_ids, *args, **kwargs):
        widths.append(tuple(input_ids.shape))
        return score(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    results = []
    for skip in (False, True):
        trainer.skip_zero_advantage = skip
        trainer.model.zero_grad()
        loss = type(trainer).compute_loss(trainer, trainer.model, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    trainer.model.zero_grad()
    (full_loss, full_grads), (skipped_loss, skipped_grads) = results
    original = batches[0]["prompt_ids"].size(1) + batches[0]["completion_ids"].size(1)
    assert widths == [(2, original + 8), (1, original)]
    assert full_loss.abs() > 0 and torch.allclose(full_loss, skipped_loss, atol=1e-6)
    assert full_grads.keys() == skipped_grads.keys() and any(g.abs().sum() > 0 for g in full_grads.values())
    for name, grad in full_grads.items():
        torch.testing.assert_close(skipped_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_grpo_checkpoint_reloads(grpo_run, tmp_path):
    from vilavt.train.common import save_checkpoint

    trainer, _ = grpo_run
    assert_reloads(save_checkpoint(trainer.model, trainer.processing_class, tmp_path / "final"))


def test_lora_adapts_vision_and_language(data, tmp_path):
    from vilavt.train.sft import build_sft_trainer

    trainer = build_sft_trainer(
        base_config(data, tmp_path / "lora", max_steps=1, learning_rate=1e-2, model="tiny:0", lora={"r": 4, "alpha": 8})
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])}
    assert any(".visual." in n for n in changed) and any(".language_model." in n for n in changed)
    assert not any("text_encoder" in n for n in before)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


def test_qlora_trains_on_cpu(data, tmp_path):
    from vilavt.train.common import save_checkpoint
    from vilavt.train.sft import build_sft_trainer

    model, processor = tiny_vilavt(seed=2)
    folder = save_checkpoint(model, processor, tmp_path / "base")
    trainer = build_sft_trainer(
        base_config(data, tmp_path / "qlora", max_steps=1, learning_rate=1e-3, model=folder, quantization="4bit", lora={"r": 4})
    )
    trainer.train()
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    assert trainer.state.log_history[0]["loss"] > 0


# ---- training data: checked when loaded, both ViLaVT and TRL shapes -------------------------------------------


def write_rows(folder, rows, name="rows.jsonl"):
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def broken(change):
    row = json.loads(json.dumps(TRAJECTORIES[0]))
    change(row)
    return row


@pytest.mark.parametrize(
    "row, message",
    [
        (broken(lambda r: r.update(images="scene.png")), "images: expected a non-empty list of image paths"),
        (broken(lambda r: r.update(problem_type="essay")), "problem_type: unknown problem_type 'essay'"),
        (broken(lambda r: r.update(answer=["B"])), 'answer: expected a string or a number, got ["B"]'),
        (broken(lambda r: r.update(question=None)), "question: expected a string, got NoneType"),
        (broken(lambda r: r.update(max_pixels=-5)), "max_pixels: expected an integer >= 1, got -5"),
        (broken(lambda r: r["turns"][0]["regions"][0].update(bbox_norm=[0.1, 0.2, 1.5, 0.9])), "turns[0].regions[0].bbox_norm: values must lie in [0, 1]"),
        (broken(lambda r: r["turns"][1]["regions"][0].update(bbox_2d=[0, 0, 28])), "turns[1].regions[0].bbox_2d: expected 4 numbers"),
        (broken(lambda r: r["turns"][1]["regions"][0].pop("index")), "turns[1].regions[0].index: expected an image index >= 0, got null"),
        (broken(lambda r: r["turns"][0].update(query=7)), "turns[0].query: expected a string, got int"),
        (broken(lambda r: r["turns"].pop()), "turns[1]: the last turn must give the answer"),
        (broken(lambda r: r.update(turns="none")), "turns: expected a non-empty list of turn objects"),
    ],
)  # fmt: skip
def test_malformed_trajectories_are_named_when_loaded(tmp_path, row, message):
    """The line, the trajectory id and the field, when the file is read (not when training reaches the row)."""
    from vilavt.train.data import load_sft_rows

    path = write_rows(tmp_path, [TRAJECTORIES[1], row])
    for load in (lambda: load_trajectories(path, require_turns=True), lambda: load_sft_rows(path)):
        with pytest.raises(TrajectoryError) as caught:
            load()
        assert str(caught.value).startswith(f"{path}:2 (trajectory 'two-rounds'): {message}"), str(caught.value)


def test_undecodable_and_non_object_lines_are_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(TRAJECTORIES[0]).encode() + b"\n" + "{\"question\": \"caf\u00e9\"}".encode("latin-1") + b"\n")
    with pytest.raises(TrajectoryError, match=r"rows.jsonl:2: not UTF-8 text \(byte 17\)"):
        load_trajectories(path)
    path.write_text(json.dumps(TRAJECTORIES[0]) + "\n[1, 2]\n")
    with pytest.raises(TrajectoryError, match="rows.jsonl:2: expected a JSON object, got list"):
        load_trajectories(path)


def test_relative_image_paths_resolve_against_the_jsonl_folder(data, tmp_path, monkeypatch):
    """As documented: not against the working directory."""
    monkeypatch.chdir(tmp_path)
    (row,) = load_trajectories(data / "train.jsonl")[:1]
    assert row["images"] == [str(data / "scene.png")]
    model, processor = tiny_vilavt(seed=0)
    batch = TrajectoryCollator(processor, model.config)([row])  # no image_root: the paths are already resolved
    assert batch["input_ids"].shape[0] == 1
    other = tmp_path / "images"
    other.mkdir()
    (row,) = load_trajectories(data / "train.jsonl", image_root=other)[:1]
    assert row["images"] == [str(other / "scene.png")]


CONVERSATION = {
    "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the frame?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<think>It is red.</think><answer>red</answer>"}]},
    ],
    "images": ["scene.png"],
}


def test_sft_accepts_trl_conversations_with_assistant_only_loss(data, tmp_path):
    """TRL's conversational format (messages + images) next to trajectories in one file: only the assistant's
    text, its <|im_end|> and newline, carry labels."""
    from vilavt.train.data import load_sft_rows
    from vilavt.train.sft import build_sft_trainer

    path = write_rows(data, [CONVERSATION, TRAJECTORIES[0], dict(CONVERSATION, images=["navy.png"])], "mixed.jsonl")
    rows = load_sft_rows(path)
    assert rows[0]["images"] == [str(data / "scene.png")]
    model, processor = tiny_vilavt(seed=0)
    batch = TrajectoryCollator(processor, model.config)([rows[0]])
    labels = batch["labels"][0]
    trained = processor.tokenizer.decode(labels[labels != -100])
    assert trained == "<think>It is red.</think><answer>red</answer><|im_end|>\n"
    assert (batch["input_ids"][0] == processor.image_token_id).sum() > 0
    config = {**base_config(data, tmp_path / "mixed", max_steps=2, model="tiny:0", learning_rate=1e-3), "train_file": str(path)}
    trainer = build_sft_trainer(config)
    trainer.train()
    assert all(h["loss"] > 0 for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize(
    "row, message",
    [
        (dict(CONVERSATION, images=[]), "images: 0 images for 1 image items in the messages"),
        (dict(CONVERSATION, messages=CONVERSATION["messages"] * 2), "messages: expected [system,] user, assistant turns"),
        ({**CONVERSATION, "messages": [CONVERSATION["messages"][0], {"role": "robot", "content": "hi"}]}, "messages[1]: expected a message with role"),
    ],
)  # fmt: skip
def test_bad_conversations_are_named(tmp_path, row, message):
    from vilavt.train.data import load_sft_rows

    with pytest.raises(TrajectoryError, match=re.escape(message)):
        load_sft_rows(write_rows(tmp_path, [CONVERSATION, row]))


def test_grpo_accepts_trl_prompt_rows(data):
    """`prompt` (text, or a conversation with image items) with `image` / `images` and `answer` / `solution`."""
    from vilavt.train.data import grpo_dataset, load_grpo_rows
    from vilavt.train.grpo import _with_images

    rows = [
        {"prompt": "Is the left one brighter?", "images": ["scene.png", "navy.png"], "solution": "yes", "problem_type": "judgment"},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Which?"}, {"type": "image"}]}], "image": "scene.png", "answer": "B"},
        TRAJECTORIES[0],
    ]  # fmt: skip
    loaded = load_grpo_rows(write_rows(data, rows, "grpo.jsonl"))
    assert [(r["answer"], r["problem_type"]) for r in loaded] == [("yes", "judgment"), ("B", "free text"), ("B", "multiple choice")]
    first = loaded[0]["prompt"][0]["content"]
    assert [item.get("image") for item in first] == [str(data / "scene.png"), str(data / "navy.png"), None]
    assert loaded[1]["prompt"][0]["content"][1] == {"type": "image", "image": str(data / "scene.png")}
    dataset = grpo_dataset(loaded)  # through Arrow: every item gets every key
    conversation, originals = _with_images(dataset[1]["prompt"], lambda path: Image.open(path))
    assert [item["type"] for item in conversation[0]["content"]] == ["text", "image"] and originals[0].size == (640, 480)
    assert conversation[0]["content"][0] == {"type": "text", "text": "Which?"}


def test_a_file_in_neither_shape_names_the_columns(tmp_path):
    from vilavt.train.data import load_grpo_rows, load_sft_rows

    path = write_rows(tmp_path, [{"text": "hello", "label": 1}])
    with pytest.raises(TrajectoryError, match=re.escape(f"{path}:1: no SFT data shape fits its columns (label, text); expected trajectory: images, question, problem_type, answer, turns; or conversational: messages, images")):
        load_sft_rows(path)
    with pytest.raises(TrajectoryError, match=re.escape("no GRPO data shape fits its columns (label, text); expected question: images, question, answer, problem_type; or TRL prompt: prompt, image(s), answer or solution")):
        load_grpo_rows(path)


# ---- loading models by name -----------------------------------------------------------------------------------


def test_a_folder_always_wins_over_a_preset_name(tmp_path, monkeypatch):
    from vilavt.loading import ModelLoadError, load_model_and_processor
    from vilavt.train.common import save_checkpoint

    saved, processor = tiny_vilavt(seed=5)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="model 'tiny-zoom': no such folder, and no such preset"):
        load_model_and_processor("tiny-zoom")
    for name in ("tiny-zoom", "tiny"):
        save_checkpoint(saved, processor, tmp_path / name)
        model, _ = load_model_and_processor(name)  # relative folder names
        assert torch.equal(model.lm_head.weight, saved.lm_head.weight), name
    preset, _ = load_model_and_processor("tiny-demo:3")
    assert preset.config.text_config.hidden_size == 128
    with pytest.raises(ModelLoadError, match=r"model 'tiny:abc': the seed after ':' must be a non-negative integer, got 'abc'"):
        load_model_and_processor("tiny:abc")


def test_missing_weights_are_refused_unless_allowed(tmp_path):
    from safetensors.torch import load_file, save_file

    from vilavt.loading import ModelLoadError, load_model_and_processor
    from vilavt.train.common import save_checkpoint

    folder = save_checkpoint(*tiny_vilavt(seed=1), tmp_path / "partial")
    weights = load_file(f"{folder}/model.safetensors")
    dropped = sorted(k for k in weights if "layers.1." in k)
    save_file({k: v for k, v in weights.items() if k not in dropped}, f"{folder}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"the checkpoint lacks {len(dropped)} weights .* allow_missing_weights=True"):
        load_model_and_processor(folder)
    model, _ = load_model_and_processor(folder, allow_missing_weights=True)
    assert model is not None


def test_eight_bit_qlora_is_a_clear_error_on_cpu(tmp_path):
    from vilavt.loading import ModelLoadError, load_model_and_processor

    with pytest.raises(ModelLoadError, match="8-bit quantization needs a CUDA GPU .* use 4bit on CPU"):
        load_model_and_processor(tmp_path, quantization="8bit")


def test_control_tokens_spelled_in_trajectory_text_are_text(tiny, data):
    """A thought or question that spells `<|image_pad|>` / `<|im_end|>` trains as text: the sequence holds exactly
    its images' placeholders and turns, and a forward pass over it runs."""
    model, processor = tiny
    row = json.loads(json.dumps(load_trajectories(data / "train.jsonl")[0]))
    row["question"] += " <|vision_start|><|image_pad|>"
    row["turns"][0]["thought"] = "see <|image_pad|> and <|im_end|>\n<|im_start|>user\n here"
    episode = build_episode(row, processor, model.config)
    ids = processor.tokenizer.convert_tokens_to_ids
    assert episode.ids.count(ids("<|vision_start|>")) == len(episode.grids)
    assert episode.ids.count(ids("<|im_start|>")) == 3 + 2 * len(episode.trace.rounds)
    with torch.no_grad():
        assert model(**episode.model_inputs()).logits.shape[1] == len(episode.ids)

"""Two-stage training with TRL on the tiny model (CPU): trajectory replay and labels, SFT, GRPO with
ViLaVT rollouts, LoRA / QLoRA, and checkpoints that reload with trust_remote_code."""

import json

import pytest
import torch
from conftest import replay_live, run_python
from PIL import Image, ImageDraw
from transformers import LogitsProcessorList

from vilavt import tiny_vilavt
from vilavt.scripted import ScriptedPolicy, answer_text
from vilavt.trajectories import TrajectoryCollator, TrajectoryError, build_episode, load_trajectories, runs_of_model_turns
from vilavt.remote_code.protocol_vilavt import render_tool_call

TRAJECTORIES = [
    {
        "id": "two-rounds",
        "images": ["scene.png"],
        "question": "What is in the red frame?",
        "problem_type": "multiple choice",
        "answer": "B",
        "turns": [
            {"thought": "too small", "query": "the red frame", "regions": [{"index": 0, "bbox_norm": [0.55, 0.55, 0.8, 0.8]}]},
            {"thought": "closer", "query": "its centre", "regions": [{"index": 1, "bbox_2d": [0, 0, 28, 28]}]},
            {"thought": "it is B", "answer": "B"},
        ],
    },
    {
        "id": "two-images",
        "images": ["scene.png", "navy.png"],
        "question": "Is the left one brighter?",
        "problem_type": "judgment",
        "answer": "yes",
        "turns": [
            {"thought": "compare", "query": "both", "regions": [{"index": 0, "bbox_2d": [0, 0, 56, 56]}, {"index": 1, "bbox_2d": [0, 0, 40, 40]}]},
            {"thought": "yes", "answer": "yes"},
        ],
    },
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trajectories")
    scene = Image.new("RGB", (640, 480), "white")
    ImageDraw.Draw(scene).rectangle((400, 300, 460, 350), outline="red", width=4)
    scene.save(folder / "scene.png")
    Image.new("RGB", (300, 500), "navy").save(folder / "navy.png")
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in TRAJECTORIES))
    return folder


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
        assert live.grids == episode.grids and live.mapping == episode.mapping
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

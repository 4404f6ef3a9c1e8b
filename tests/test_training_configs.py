"""Run configs: the example files (tiny and 7B) parse into TRL's config dataclasses and build trainers; the command
line overrides them with typed values; mistakes are one-line errors; the training quickstart runs from a fresh
copy of the examples."""

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TRAJECTORIES

from vilavt import tiny_vilavt
from vilavt.train.config import (
    ConfigError,
    LoraArguments,
    ModelArguments,
    TrainableParts,
    ViLaVTGRPOConfig,
    ViLaVTSFTConfig,
    help_fields,
    parse_run_config,
    run_config,
)

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
VILAVT = str(Path(sys.executable).parent / "vilavt")


def stand_in(stage: str, name: str, data, tmp_path, **extra):  # noqa: F811
    """A shipped config with the tiny data swapped in (same trainer options otherwise)."""
    return parse_run_config(
        stage,
        ["--config", str(EXAMPLES / "configs" / name)],
        values={"train_file": str(data / "train.jsonl"), "output_dir": str(tmp_path), "max_steps": 1, "report_to": [],
                **extra},
    )


@pytest.mark.parametrize("name", ["sft_tiny.yaml", "sft_7b.yaml"])
def test_sft_configs_build_a_trainer(name, data, tmp_path):  # noqa: F811
    from vilavt.train.sft import build_sft_trainer

    config = stand_in("sft", name, data, tmp_path, image_root=str(data))
    assert isinstance(config.training, ViLaVTSFTConfig) and config.training.bf16 is False  # no bf16 on CPU
    model, processor = tiny_vilavt(seed=0)
    trainer = build_sft_trainer(config, model=model, processor=processor)
    assert trainer.args.learning_rate == config.training.learning_rate > 0
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert not any("text_encoder" in n or "text_proj" in n for n in trainable) and any(".visual." in n for n in trainable)


@pytest.mark.parametrize("name", ["grpo_tiny.yaml", "grpo_7b.yaml"])
def test_grpo_configs_build_a_trainer(name, data, tmp_path):  # noqa: F811
    from vilavt.train.grpo import build_grpo_trainer

    config = stand_in("grpo", name, data, tmp_path, image_root=str(data), gradient_accumulation_steps=1)
    config.training.per_device_train_batch_size = config.training.num_generations
    model, processor = tiny_vilavt(seed=0)
    trainer = build_grpo_trainer(config, model=model, processor=processor)
    assert trainer.args.beta == 0.0 and trainer.loss_type == "dapo" and trainer.skip_zero_advantage
    assert trainer.args.epsilon_high == 0.3 and trainer._rollout_kwargs["max_rounds"] == config.training.max_rounds
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert not any(".visual." in n or "text_encoder" in n for n in trainable)
    assert any("text_proj" in n for n in trainable)


def test_the_authors_reward_is_a_config_choice(data, tmp_path, monkeypatch):  # noqa: F811
    import vilavt.train.grpo as grpo
    from vilavt.rewards import AUTHORS, DEFAULTS, make_vilavt_reward

    tiny_yaml = str(EXAMPLES / "configs" / "grpo_tiny.yaml")
    assert parse_run_config("grpo", ["--config", tiny_yaml]).training.reward_options() == DEFAULTS
    argv = ["--config", tiny_yaml, "--reward_tool_format", "authors", "--reward_answer_tag", "optional",
            "--reward_free_text", "zero"]  # fmt: skip
    assert parse_run_config("grpo", argv).training.reward_options() == AUTHORS
    with pytest.raises(ConfigError, match="reward_free_text"):
        parse_run_config("grpo", ["--config", tiny_yaml, "--reward_free_text", "maybe"])
    built = []
    monkeypatch.setattr(grpo, "make_vilavt_reward", lambda *a, **kw: built.append(kw) or make_vilavt_reward())
    config = stand_in("grpo", "grpo_tiny.yaml", data, tmp_path, image_root=str(data), gradient_accumulation_steps=1,
                      reward_tool_format="authors", reward_answer_tag="optional", reward_free_text="zero")  # fmt: skip
    config.training.per_device_train_batch_size = config.training.num_generations
    grpo.build_grpo_trainer(config, *tiny_vilavt(seed=0))
    assert built == [AUTHORS]


def test_training_resumes_from_a_checkpoint(data, tmp_path, monkeypatch):  # noqa: F811
    from transformers import TrainerCallback

    from vilavt.train.sft import ViLaVTSFTTrainer, run_sft

    run_sft(stand_in("sft", "sft_tiny.yaml", data, tmp_path, image_root=str(data), model="tiny", save_strategy="steps", save_steps=1))
    assert (tmp_path / "checkpoint-1").is_dir()
    trained = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trained.append(state.global_step)

    train = ViLaVTSFTTrainer.train

    def counted(self, *args, **kwargs):
        self.add_callback(Count())
        return train(self, *args, **kwargs)

    monkeypatch.setattr(ViLaVTSFTTrainer, "train", counted)
    run_sft(stand_in("sft", "sft_tiny.yaml", data, tmp_path, image_root=str(data), model="tiny", max_steps=2,
                     resume_from_checkpoint=str(tmp_path / "checkpoint-1")))  # fmt: skip
    assert trained == [2]  # step 1 came from the checkpoint


def test_command_line_overrides_are_typed():
    config = parse_run_config(
        "grpo",
        ["--config", str(EXAMPLES / "configs" / "grpo_tiny.yaml"), "--learning_rate", "5e-5", "--max_steps", "3",
         "--lora_r", "8", "--train_vit", "true", "--no_skip_zero_advantage", "--max_regions", "2"],
    )  # fmt: skip
    training = config.training
    assert training.learning_rate == 5e-5 and isinstance(training.learning_rate, float) and training.max_steps == 3
    assert config.lora.lora_r == 8 and config.trainable()["vit"] is True and config.trainable()["merger"] is False
    assert training.skip_zero_advantage is False and training.rollout_kwargs() == {"max_rounds": 3, "max_regions": 2}


def test_nested_spellings_of_earlier_configs_still_work(tmp_path):
    """`lora: {r: ..}`, `train: {..}`, `reward_weights: {..}` sections and `--lora.r`, and YAML's `5e-5` (a string)."""
    old = tmp_path / "old.yaml"
    old.write_text(
        "model: tiny\ntrain: {vit: false, text_proj: true}\nlora: {r: 4, alpha: 8}\n"
        "reward_weights: {accuracy: 0.7, format: 0.3}\nlearning_rate: 5e-5\n"
    )
    config = parse_run_config("grpo", ["--config", str(old), "--lora.r", "6"])
    assert config.lora.lora_r == 6 and config.lora.lora_alpha == 8
    assert config.trainable()["vit"] is False and config.trainable()["text_proj"] is True
    assert (config.training.accuracy_weight, config.training.format_weight) == (0.7, 0.3)
    assert config.training.learning_rate == 5e-5
    assert run_config("sft", {"train": {"vit": False}}, max_steps=2).trainable()["vit"] is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_step", "1"], "unknown option --max_step (did you mean --max_steps?)"),
        (["--lora.rr", "8"], "unknown option --lora.rr (did you mean --lora.r?)"),
        (["--learning_rate", "fast"], "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
        (["--quantization", "3bit"], "argument --quantization: invalid choice: '3bit'"),
        (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
        (["--quantization", "4bit"], "quantization loads the base weights for QLoRA: set lora_r too"),
    ],
)
def test_mistakes_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as caught:
        parse_run_config("sft", argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_unknown_and_bad_keys_in_a_file_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\nlora: {rr: 8}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'max_stepz' \(did you mean max_steps\?\); unknown key 'lora.rr'"):
        parse_run_config("sft", ["--config", str(bad)])
    bad.write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match="learning_rate: invalid value 'fast'"):
        parse_run_config("sft", ["--config", str(bad)])
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_run_config("sft", ["--config", str(bad)])


def test_every_vilavt_field_is_documented():
    for dataclass_type, parent in (
        (ViLaVTSFTConfig, "SFTConfig"), (ViLaVTGRPOConfig, "GRPOConfig"),
        (ModelArguments, None), (TrainableParts, None), (LoraArguments, None),
    ):  # fmt: skip
        fields = dataclasses.fields(dataclass_type)
        assert fields and all(f.metadata.get("help") for f in fields), dataclass_type
        if parent:
            assert parent in [base.__name__ for base in dataclass_type.__mro__]


def run_cli(*argv, cwd=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([VILAVT, *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd or "/")


def test_cli_help_lists_every_field_and_errors_are_one_line(data, capsys):  # noqa: F811
    from vilavt.cli import main

    for stage in ("sft", "grpo"):
        with pytest.raises(SystemExit) as exited:
            main([stage, "--help"])
        shown = capsys.readouterr().out
        assert exited.value.code == 0
        missing = [name for name in help_fields(stage) if f"--{name}" not in shown]
        assert not missing, missing
    train = str(data / "train.jsonl")
    for argv, message in (
        (["sft", "--max_step", "1"], "vilavt sft: error: unknown option --max_step (did you mean --max_steps?)"),
        (["grpo", "--lora.rr", "8"], "vilavt grpo: error: unknown option --lora.rr (did you mean --lora.r?)"),
        (["sft", "--train_file", "/nowhere/x.jsonl"], "vilavt sft: error: /nowhere/x.jsonl: no such file"),
        (["sft", "--model", "tiny:abc", "--train_file", train],
         "vilavt sft: error: model 'tiny:abc': the seed after ':' must be a non-negative integer, got 'abc'"),
    ):  # fmt: skip
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]


@pytest.mark.parametrize(
    "name, kind", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3), ("fsdp.yaml", "fsdp"), ("cpu_ddp.yaml", "ddp")]
)
def test_accelerate_configs(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / "accelerate" / name))
    if kind == "fsdp":
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
        model, _ = tiny_vilavt(seed=0)
        present = {type(m).__name__ for m in model.modules()}
        wrapped = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert set(wrapped) <= present, set(wrapped) - present
    elif kind == "ddp":
        assert config.distributed_type == "MULTI_GPU" and config.num_processes == 2 and not config.use_cpu
    else:
        ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert config.distributed_type == "DEEPSPEED" and ds["zero_optimization"]["stage"] == kind
        assert config.mixed_precision in (None, "no")  # precision comes from the run config through "auto"
        assert {ds["bf16"]["enabled"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]} == {"auto"}


def quickstart_commands() -> list[str]:
    lines = (EXAMPLES / "train_quickstart.sh").read_text().splitlines()
    return [line for line in lines if line.startswith("vilavt ")]


def test_training_quickstart_runs_from_a_fresh_copy(tmp_path):
    """examples/train_quickstart.sh (the README's training commands) in a folder holding nothing but a copy of
    examples/, in order, with tiny sizes: the step counts and the data size replaced, and GRPO's rollouts shortened."""
    commands = quickstart_commands()
    assert [c.split()[1] for c in commands] == ["synth-data", "sft", "grpo"]
    readme = (ROOT / "README.md").read_text()
    if "vilavt synth-data" in readme:  # once the README carries the quickstart, it must be these very commands
        assert all(command in readme for command in commands)
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    tiny = {"--n": "6", "--max_steps": "1"}
    extra = {"grpo": ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "48"]}
    outputs = []
    for command in commands:
        argv = shlex.split(command)[1:]
        argv = [tiny.get(argv[i - 1], arg) if i else arg for i, arg in enumerate(argv)] + extra.get(argv[0], [])
        result = run_cli(*argv, cwd=tmp_path)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        outputs.append(result.stdout)
    assert "wrote outputs/synth/train.jsonl" in outputs[0] and "wrote outputs/synth/rl.jsonl" in outputs[0]
    assert "saved outputs/sft-tiny/final" in outputs[1] and "saved outputs/grpo-tiny/final" in outputs[2]
    final = tmp_path / "outputs" / "grpo-tiny" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_vilavt.ViLaVTForConditionalGeneration"
    assert (final / "query_tokenizer").is_dir() and (final / "modeling_vilavt.py").is_file()


def test_the_single_process_cpu_launch_is_pointed_out(monkeypatch, caplog, capsys):
    """`accelerate launch --cpu --num_processes 2` starts one process (ACCELERATE_USE_CPU, accelerate's launcher
    variables, no WORLD_SIZE): say so, and only then."""
    from vilavt.cli import main

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    # accelerate launch --cpu; the multi-process launcher; a plain `ACCELERATE_USE_CPU=1 vilavt sft` (no launcher)
    for launcher, world_size, warned in (("no", None, True), ("no", "2", False), (None, None, False)):
        for name, value in (("ACCELERATE_DYNAMO_BACKEND", launcher), ("WORLD_SIZE", world_size)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        caplog.clear()
        assert main(["sft", "--learning_rate", "fast"]) == 2  # stops while parsing: no process group is made
        assert ("training in ONE CPU process" in caplog.text and "cpu_ddp.yaml" in caplog.text) is warned
        assert capsys.readouterr().err.strip().endswith("invalid float value: 'fast'")

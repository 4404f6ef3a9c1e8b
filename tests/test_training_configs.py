"""The example run configs (tiny, real size) and accelerate configs parse and build trainers; the CLI
trains from a config with command-line overrides."""

import json
from pathlib import Path

import pytest
from conftest import run_python
from test_training import TRAJECTORIES, data  # noqa: F401  (fixture)

from vilavt import tiny_vilavt
from vilavt.train.common import load_run_config, parse_overrides

EXAMPLES = Path(__file__).parent.parent / "examples"


def stand_in(config: dict, data, tmp_path) -> dict:
    """A real-size config with the tiny model and data swapped in (same trainer options otherwise)."""
    return {
        **config,
        "train_file": str(data / "train.jsonl"),
        "image_root": str(data),
        "output_dir": str(tmp_path),
        "bf16": False,
        "max_steps": 1,
        "report_to": [],
    }


@pytest.mark.parametrize("name", ["sft_tiny.yaml", "sft_7b.yaml"])
def test_sft_configs_build_a_trainer(name, data, tmp_path):  # noqa: F811
    from vilavt.train.sft import build_sft_trainer

    config = load_run_config(EXAMPLES / "configs" / name)
    model, processor = tiny_vilavt(seed=0)
    trainer = build_sft_trainer(stand_in(config, data, tmp_path), model=model, processor=processor)
    assert trainer.args.learning_rate == config["learning_rate"]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert not any("text_encoder" in n for n in trainable)


@pytest.mark.parametrize("name", ["grpo_tiny.yaml", "grpo_7b.yaml"])
def test_grpo_configs_build_a_trainer(name, data, tmp_path):  # noqa: F811
    from vilavt.train.grpo import build_grpo_trainer

    config = load_run_config(EXAMPLES / "configs" / name)
    config["per_device_train_batch_size"] = config["num_generations"]
    config.pop("gradient_accumulation_steps", None)
    model, processor = tiny_vilavt(seed=0)
    trainer = build_grpo_trainer(stand_in(config, data, tmp_path), model=model, processor=processor)
    assert trainer.args.beta == 0.0 and trainer.args.epsilon_high == config["epsilon_high"]
    assert trainer.args.learning_rate == config["learning_rate"]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert not any(".visual." in n or "text_encoder" in n for n in trainable)
    assert any("text_proj" in n for n in trainable)


@pytest.mark.parametrize(
    "name, kind", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3), ("fsdp.yaml", "fsdp")]
)
def test_accelerate_configs(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / "accelerate" / name))
    if kind == "fsdp":
        assert config.distributed_type == "FSDP"
        model, _ = tiny_vilavt(seed=0)
        present = {type(m).__name__ for m in model.modules()}
        wrapped = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert set(wrapped) <= present, set(wrapped) - present
    else:
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == kind


def test_overrides_nest_and_parse_types():
    assert parse_overrides(["--max_steps", "3", "--lora.r", "8", "--report-to", "[]", "--model", "tiny:1"]) == {
        "max_steps": 3,
        "lora": {"r": 8},
        "report_to": [],
        "model": "tiny:1",
    }
    with pytest.raises(SystemExit):
        parse_overrides(["--max_steps"])


def test_cli_sft_with_overrides(data, tmp_path):  # noqa: F811
    out = run_python(
        f"""
from vilavt.cli import main
main(["sft", "--config", {str(EXAMPLES / "configs" / "sft_tiny.yaml")!r}, "--train_file", {str(data / "train.jsonl")!r},
      "--image_root", {str(data)!r}, "--output_dir", {str(tmp_path / "run")!r}, "--max_steps", "1"])
"""
    )
    assert f"saved {tmp_path / 'run' / 'final'}" in out
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_vilavt.ViLaVTForConditionalGeneration"
    assert (tmp_path / "run" / "final" / "query_tokenizer").is_dir()

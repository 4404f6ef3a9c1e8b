"""Training in several processes on the engines accelerate drives (CPU, gloo): DDP gives the weights of one
process on the same global batch and data order, for SFT and for GRPO (scripted rollouts, zero-advantage rows
skipped, dapo, beta 0); FSDP2 trains both stages and saves checkpoints that reload with trust_remote_code; the
DeepSpeed configs agree with the run configs exactly as `accelerate launch` builds them, and ZeRO-2 trains.

The optimizer is plain SGD: an update is then linear in the gradient, so "same gradient" shows as "same weights"
(Adam's first step divides by the gradient's own magnitude and turns float noise in tiny gradients into
full-size steps)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_python
from distributed_jobs import run
from safetensors.torch import load_file
from conftest import TRAJECTORIES, write_images

ROOT = Path(__file__).parent.parent
ACCELERATE = ROOT / "examples" / "accelerate"
CONFIGS = ROOT / "examples" / "configs"


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """8 trajectories (4 per step of SFT; 4 prompts x 2 rollouts per step of GRPO) and each prompt's script."""
    folder = tmp_path_factory.mktemp("distributed")
    write_images(folder)
    rows = [
        dict(row, id=f"{row['id']}-{k}", question=f"{row['question']} ({k})") for k in range(4) for row in TRAJECTORIES
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    plan = {
        row["question"]: {"answer": row["answer"], "mode": "mixed" if k % 3 == 0 else "right"}
        for k, row in enumerate(rows)
    }
    return folder, plan


def jobs(workload, out: Path, processes: int) -> list[dict]:
    """SFT then GRPO, two steps each, the same global batch whatever the number of processes."""
    folder, plan = workload
    base = dict(
        train_file=str(folder / "train.jsonl"), model="tiny:0", max_steps=2, optim="sgd", logging_steps=1,
        save_strategy="no", report_to=[], seed=0, activation_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    return [
        dict(stage="sft", config=dict(base, output_dir=str(out / "sft"), per_device_train_batch_size=4 // processes, learning_rate=0.1)),
        dict(
            stage="grpo",
            plan=plan,
            config=dict(
                base, output_dir=str(out / "grpo"), per_device_train_batch_size=8 // processes, num_generations=2,
                max_completion_length=600, max_rounds=3, learning_rate=0.1, skip_zero_advantage=True, beta=0.0,
                loss_type="dapo",
            ),
        ),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_file: Path, job_list: list[dict], tmp_path: Path, *flags: str, cpu: bool = False) -> list[dict]:
    """`accelerate launch` 2 processes of tests/distributed_jobs.py; the results of every process."""
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(job_list))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "--num_processes", "2",
        "--main_process_port", str(free_port()), *flags, str(Path(__file__).parent / "distributed_jobs.py"), str(path),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(Path(__file__).parent),
    }
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return [entry for rank in (0, 1) for entry in json.loads(Path(f"{path}.rank{rank}").read_text())]


@pytest.fixture(scope="module")
def one_process(workload, tmp_path_factory):
    """The reference: both jobs in this process, one thread (as each launched process has)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(jobs(workload, tmp_path_factory.mktemp("one"), processes=1))
    finally:
        torch.set_num_threads(threads)


def weights(folder) -> dict:
    return load_file(Path(folder) / "model.safetensors")


def assert_same_weights(folder, reference_folder, start: dict, tolerance: float = 1e-6):
    trained, reference = weights(folder), weights(reference_folder)
    assert trained.keys() == reference.keys()
    moved = max((reference[k] - start[k]).abs().max().item() for k in reference)
    difference = max((trained[k] - reference[k]).abs().max().item() for k in reference)
    assert moved > 1e-3 and difference < tolerance, (moved, difference)


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    from vilavt import tiny_vilavt
    from vilavt.train.common import save_checkpoint

    model, processor = tiny_vilavt(seed=0)
    return weights(save_checkpoint(model, processor, tmp_path_factory.mktemp("start")))


def test_two_ddp_processes_train_like_one(workload, one_process, start_weights, tmp_path):
    """Same global batch and data order: SFT's token-mean loss spans both processes and GRPO's dapo loss is
    normalised by the whole generation batch's tokens, so two processes give one process's weights."""
    results = launch(ACCELERATE / "cpu_ddp.yaml", jobs(workload, tmp_path, processes=2), tmp_path, cpu=True)
    by_stage = {stage: [r for r in results if r["stage"] == stage] for stage in ("sft", "grpo")}
    reference = {r["stage"]: r for r in one_process}
    for stage, ranks in by_stage.items():
        assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["type"] == "MULTI_CPU" for r in ranks)
        assert ranks[0]["losses"] == pytest.approx(reference[stage]["losses"], abs=1e-6)
        assert_same_weights(ranks[0]["folder"], reference[stage]["folder"], start_weights)
    # The zero-advantage skip was decided across processes: in some loss pass the processes held different numbers
    # of informative rows and still scored the same number (a process-local choice crashed TRL's gather there).
    passes = list(zip(*(r["passes"] for r in sorted(by_stage["grpo"], key=lambda r: r["rank"]))))
    assert any(a[0] != b[0] and a[1] == b[1] < 4 for a, b in passes), passes
    assert all(a[1] == b[1] for a, b in passes)
    assert sum(kept for _, kept in reference["grpo"]["passes"]) < 16  # the one-process run skipped rows too


def test_fsdp_trains_both_stages_and_saves_checkpoints_that_reload(workload, one_process, start_weights, tmp_path):
    """accelerate's FSDP plugin (FSDP2, examples/accelerate/fsdp.yaml) on 2 CPU processes: the sharded training
    gives the one-process weights, and the gathered checkpoints load with trust_remote_code in a fresh process."""
    results = launch(
        ACCELERATE / "fsdp.yaml", jobs(workload, tmp_path, processes=2), tmp_path, "--mixed_precision", "no"
    )
    reference = {r["stage"]: r for r in one_process}
    folders = []
    for stage in ("sft", "grpo"):
        ranks = [r for r in results if r["stage"] == stage]
        assert len(ranks) == 2 and all(r["type"] == "FSDP" for r in ranks)
        assert_same_weights(ranks[0]["folder"], reference[stage]["folder"], start_weights, tolerance=1e-5)
        folders.append(ranks[0]["folder"])
    out = run_python(
        f"""
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
for folder in {folders!r}:
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    answer, trace = model.chat(Image.new("RGB", (200, 150), "red"), "What?", processor=processor, max_new_tokens=20)
    print(type(model).__module__.split(".")[0], type(model).__name__, trace.stop_reason)
"""
    )
    lines = out.strip().splitlines()[-2:]
    assert all(line.startswith("transformers_modules ViLaVTForConditionalGeneration") for line in lines), out


DEEPSPEED_PAIRS = [
    ("deepspeed_zero2.yaml", "sft_7b.yaml", 2),
    ("deepspeed_zero3.yaml", "grpo_7b.yaml", 3),
    ("deepspeed_zero2.yaml", "grpo_7b.yaml", 2),
    ("deepspeed_zero3.yaml", "sft_7b.yaml", 3),
]


@pytest.fixture
def launch_environment(monkeypatch):
    """`set(accelerate_file)`: the environment `accelerate launch` gives its DeepSpeed processes: the launch
    command's arguments completed from the config file, then its DeepSpeed launcher's environment (returns the
    completed config). The DeepSpeed config transformers registers globally is removed afterwards."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    monkeypatch.chdir(ROOT)  # the accelerate files name the DeepSpeed JSON relative to the repository

    def set_environment(accelerate_file: str):
        args = launch_command_parser().parse_args(
            ["--config_file", str(ACCELERATE / accelerate_file), "-m", "vilavt.cli", "sft"]
        )
        args, defaults, mixed_precision_from_config = _validate_launch_command(args)
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
        for key, value in env.items():
            if key.startswith("ACCELERATE_"):
                monkeypatch.setenv(key, value)
        return defaults

    yield set_environment
    unset_hf_deepspeed_config()


def gpu_run_config(name: str, monkeypatch, **overrides):
    """The TRL config of a 7B run config as it is built on the GPU machine it is for (bf16 supported). Under
    ACCELERATE_USE_DEEPSPEED it builds accelerate's DeepSpeed plugin itself (transformers' TrainingArguments)."""
    import transformers.training_args

    from vilavt.train import config as run_configs

    monkeypatch.setattr(run_configs, "bf16_supported", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True, raising=False)
    return run_configs.parse_run_config(
        name.split("_")[0], ["--config", str(CONFIGS / name)], values=overrides
    ).training


def model_stand_in():
    """What DeepSpeed's "auto" bucket sizes read from the model: its config (the 7B's text width)."""
    from vilavt.tiny import tiny_config

    return type("Model", (), {"config": tiny_config(text_config={"hidden_size": 3584, "num_attention_heads": 28})})()


@pytest.mark.parametrize("accelerate_file, run_file, stage", DEEPSPEED_PAIRS)
def test_deepspeed_configs_agree_with_the_run_configs(
    accelerate_file, run_file, stage, launch_environment, monkeypatch
):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    defaults = launch_environment(accelerate_file)
    args = gpu_run_config(run_file, monkeypatch)
    plugin = args.deepspeed_plugin
    assert defaults.distributed_type == "DEEPSPEED" and plugin is not None
    ds = HfTrainerDeepSpeedConfig(plugin.hf_ds_config.config)
    ds.trainer_config_process(args)  # as the Trainer does, then (with the model) finalize: raises on any mismatch
    ds.trainer_config_finalize(args, model_stand_in(), num_training_steps=100)
    config = ds.config
    assert config["zero_optimization"]["stage"] == stage == plugin.zero_stage
    assert config["bf16"]["enabled"] is True and args.bf16 is True
    assert config["train_micro_batch_size_per_gpu"] == args.per_device_train_batch_size
    assert config["gradient_accumulation_steps"] == args.gradient_accumulation_steps
    assert (
        config["train_batch_size"]
        == args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    assert config["gradient_clipping"] == args.max_grad_norm


def test_deepspeed_config_check_catches_a_precision_mismatch(launch_environment, monkeypatch):
    """What the shipped files used to do: accelerate in bf16 (`mixed_precision: bf16`) around a float32 run."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    launch_environment("deepspeed_zero2.yaml")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = gpu_run_config("sft_7b.yaml", monkeypatch, bf16=False)
    ds = HfTrainerDeepSpeedConfig(args.deepspeed_plugin.hf_ds_config.config)
    ds.trainer_config_process(args)
    with pytest.raises(ValueError, match=r"ds bf16.enabled=True vs hf bf16\|bf16_full_eval=False"):
        ds.trainer_config_finalize(args, model_stand_in(), num_training_steps=100)


def test_deepspeed_zero2_trains_two_sft_steps_on_cpu(workload, one_process, start_weights, tmp_path):
    """DeepSpeed ZeRO-2 (examples/accelerate/deepspeed_zero2.yaml) on 2 CPU processes; DeepSpeed's CPU accelerator
    communicates over gloo (the run config picks it on CPU). Same weights as one process."""
    results = launch(ACCELERATE / "deepspeed_zero2.yaml", jobs(workload, tmp_path, processes=2)[:1], tmp_path)
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["type"] == "DEEPSPEED" for r in results)
    reference = next(r for r in one_process if r["stage"] == "sft")
    assert results[0]["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert_same_weights(results[0]["folder"], reference["folder"], start_weights, tolerance=1e-5)

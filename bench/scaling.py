"""Training throughput on the CPU cores: one process with 2 threads against 2 processes (accelerate DDP, gloo) with
one thread each, on the same global batch and data, in the same run (and one process with one thread, which tells
how much of the difference is threading rather than a second process). SFT: the shipped checkpoint on gold
trajectories of the synthetic zoom task (8 per step); GRPO: the shipped recipe's GRPO (4 prompts x 4 rollouts per
step, sampled at 0.7, dapo, beta 0, zero-advantage rows skipped) from the shipped checkpoint.

    python bench/scaling.py [--sft-steps 12] [--grpo-steps 6] [--model DIR]

Steps/s leave out each run's first step (start-up, first-call allocations). The last line is a JSON object.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SFT_BATCH, PROMPTS, GENERATIONS = 8, 4, 4
FROZEN = dict(train_vit=False, train_merger=False, train_instruct=False, train_text_proj=False)


def configs(data: Path, out: Path, processes: int, model: str, sft_steps: int, grpo_steps: int) -> dict:
    base = dict(
        model=model, image_root=str(data), save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
        activation_checkpointing=False, logging_steps=1000, **FROZEN,
    )  # fmt: skip
    return {
        "sft": dict(
            base, train_file=str(data / "train.jsonl"), output_dir=str(out / "sft"), max_steps=sft_steps,
            per_device_train_batch_size=SFT_BATCH // processes, learning_rate=1e-4,
        ),
        "grpo": dict(
            base, train_file=str(data / "rl.jsonl"), output_dir=str(out / "grpo"), max_steps=grpo_steps, max_rounds=3,
            per_device_train_batch_size=PROMPTS * GENERATIONS // processes, num_generations=GENERATIONS,
            max_completion_length=400, temperature=0.7, learning_rate=2e-5, beta=0.0,
        ),
    }  # fmt: skip


def worker(path: str) -> None:
    """Train both stages from the JSON configs at `path`; rank 0 writes the step end times next to it."""
    import torch  # noqa: F401
    from transformers import TrainerCallback

    from vilavt.train.grpo import build_grpo_trainer
    from vilavt.train.sft import build_sft_trainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    results = {}
    for stage, config in json.loads(Path(path).read_text()).items():
        trainer = (build_sft_trainer if stage == "sft" else build_grpo_trainer)(config)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
        steady = clock.ends[1:]  # from the end of the first step
        results[stage] = {
            "seconds_per_step": (steady[-1] - steady[0]) / (len(steady) - 1),
            "processes": trainer.accelerator.num_processes,
        }
    if int(os.environ.get("RANK", 0)) == 0:
        Path(f"{path}.out").write_text(json.dumps(results))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(folder: Path, data: Path, processes: int, threads: int, args) -> dict:
    path = folder / f"configs-{processes}-{threads}.json"
    path.write_text(
        json.dumps(configs(data, folder / f"out-{processes}", processes, args.model, args.sft_steps, args.grpo_steps))
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if processes == 1:
        env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, __file__, "--worker", str(path)]
    else:
        env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples/accelerate/cpu_ddp.yaml"),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), __file__, "--worker", str(path),
        ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{processes}-process run failed:\n{result.stderr[-4000:]}")
    return json.loads(Path(f"{path}.out").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-steps", type=int, default=12)
    parser.add_argument("--grpo-steps", type=int, default=6)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    from vilavt.demo import shipped_checkpoint
    from vilavt.loading import load_model_and_processor
    from vilavt.synthetic import write_training_sets

    args.model = str(args.model or shipped_checkpoint())
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        _, processor = load_model_and_processor(args.model)
        n = max(SFT_BATCH * args.sft_steps, PROMPTS * args.grpo_steps)
        data = write_training_sets(folder / "data", n, processor, workers=2)["train"].parent
        one = run_variant(folder, data, 1, 2, args)
        two = run_variant(folder, data, 2, 1, args)
        single = run_variant(folder, data, 1, 1, args)
    rows = [
        ("sft", f"SFT, {SFT_BATCH} trajectories/step"),
        ("grpo", f"GRPO, {PROMPTS} prompts x {GENERATIONS} rollouts"),
    ]
    results = {}
    print(
        f"{'steps/s':32} {'1 proc x 2 threads':>18} {'2 procs x 1 thread':>19} {'ratio':>7} {'1 proc x 1 thread':>18}"
    )
    for stage, label in rows:
        a, b, c = (1 / run[stage]["seconds_per_step"] for run in (one, two, single))
        results[stage] = {
            "one_process_2_threads": round(a, 3),
            "two_processes": round(b, 3),
            "ratio": round(b / a, 2),
            "one_process_1_thread": round(c, 3),
        }
        print(f"{label:32} {a:18.3f} {b:19.3f} {b / a:6.2f}x {c:18.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

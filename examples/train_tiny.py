"""Reproduce the shipped tiny checkpoint from scratch on CPU: synthetic zoom tasks -> SFT -> GRPO.

    python examples/train_tiny.py [--out outputs/tiny-zoom] [--ship]

Every stage uses the project's own pieces: `vilavt.synthetic` (tasks and gold trajectories),
`vilavt.train.sft` (TRL SFTTrainer on replayed trajectories), `vilavt.train.grpo` (TRL GRPOTrainer with
ViLaVT rollouts). `--ship` copies the result (weights, config, processor) to src/vilavt/assets/tiny-zoom.
"""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from vilavt.synthetic import write_tasks
from vilavt.tiny import tiny_vilavt
from vilavt.train.common import save_checkpoint
from vilavt.train.grpo import build_grpo_trainer
from vilavt.train.sft import build_sft_trainer

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "vilavt" / "assets" / "tiny-zoom"
KINDS = ["single", "multi", "nested"]

SFT = dict(
    max_steps=320,
    per_device_train_batch_size=8,
    learning_rate=2e-3,
    lr_scheduler_type="cosine",
    warmup_steps=0.03,
    weight_decay=0.0,
    logging_steps=20,
    save_strategy="no",
    report_to=[],
    seed=0,
    dataloader_num_workers=1,
    disable_tqdm=True,
)
GRPO = dict(
    max_steps=40,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=600,
    temperature=1.0,
    learning_rate=2e-4,
    lr_scheduler_type="constant",
    beta=0.0,
    logging_steps=5,
    save_strategy="no",
    report_to=[],
    seed=0,
    disable_tqdm=True,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/tiny-zoom")
    parser.add_argument("--train-tasks", type=int, default=3000)
    parser.add_argument("--rl-tasks", type=int, default=400)
    parser.add_argument("--ship", action="store_true", help="copy the result to src/vilavt/assets/tiny-zoom")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    out = Path(args.out)
    started = time.time()
    torch.manual_seed(0)
    model, processor = tiny_vilavt(seed=0, preset="demo")

    sft_data = write_tasks(out / "data", args.train_tasks, 0, KINDS, processor)
    rl_data = write_tasks(out / "data", args.rl_tasks, 5_000_000, KINDS, processor, split="rl")
    logging.info("data ready after %.0f s", time.time() - started)

    sft = build_sft_trainer(
        {**SFT, "train_file": str(sft_data), "image_root": str(out / "data"), "output_dir": str(out / "sft")},
        model=model,
        processor=processor,
    )
    sft.train()
    sft_folder = save_checkpoint(sft.model, processor, out / "sft" / "final")
    logging.info("SFT done after %.0f s", time.time() - started)

    grpo = build_grpo_trainer(
        {**GRPO, "train_file": str(rl_data), "image_root": str(out / "data"), "output_dir": str(out / "grpo"), "max_rounds": 3},
        model=sft.model,
        processor=processor,
    )
    grpo.train()
    final = save_checkpoint(grpo.model, processor, out / "final")
    minutes = (time.time() - started) / 60
    logging.info("GRPO done: %.1f minutes in all", minutes)
    (out / "timing.json").write_text(json.dumps({"minutes": round(minutes, 1), "sft": sft_folder, "final": final}))
    if args.ship:
        shutil.rmtree(SHIPPED, ignore_errors=True)
        shutil.copytree(final, SHIPPED, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        print(f"shipped {SHIPPED}")
    print(f"done in {minutes:.1f} minutes: {final}")


if __name__ == "__main__":
    main()

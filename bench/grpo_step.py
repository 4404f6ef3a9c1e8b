"""GRPO step benchmark on the shipped checkpoint and synthetic single-image tasks (the shipped recipe's
GRPO: 4 prompts x 4 rollouts per step, temperature 0.7, dapo loss, beta 0). Two comparisons, same run,
same weights:

1. whole GRPO steps with `skip_zero_advantage` off and on: the loss pass (scoring forward + backward) of
   the completions whose advantage is 0 is skipped. The two runs sample the same rollouts and must end
   with the same weights (printed: the largest parameter difference);
2. rendering one generation batch (16 conversations, 4 distinct images) conversation by conversation
   against as one batch, where each original is resized once.

    python bench/grpo_step.py [--steps 10] [--model DIR] [--repeats 3]

The last line is a JSON object with both ratios.
"""

import argparse
import json
import logging
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vilavt.demo import load  # noqa: E402
from vilavt.remote_code.processing_vilavt import open_image  # noqa: E402
from vilavt.synthetic import write_tasks  # noqa: E402
from vilavt.train.grpo import build_grpo_trainer  # noqa: E402
from vilavt.trajectories import load_trajectories  # noqa: E402

PROMPTS, GENERATIONS = 4, 4
FROZEN = dict(vit=False, merger=False, instruct=False, text_proj=False)  # what the shipped recipe's GRPO trains


def grpo_run(model_dir, data, steps: int, skip: bool):
    """(seconds for `steps` GRPO steps, seconds in the loss pass, rows scored, the trained weights)."""
    torch.manual_seed(0)
    model, processor = load(model_dir)
    config = dict(
        train_file=str(data / "rl.jsonl"), image_root=str(data), output_dir=str(data / "out"), max_rounds=3,
        train=FROZEN, max_steps=steps, per_device_train_batch_size=PROMPTS * GENERATIONS,
        num_generations=GENERATIONS, max_completion_length=400, temperature=0.7, learning_rate=2e-5,
        lr_scheduler_type="constant", beta=0.0, save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
        gradient_checkpointing=False, logging_steps=steps,
    )  # fmt: skip
    trainer = build_grpo_trainer(config, model=model, processor=processor)
    trainer.skip_zero_advantage = skip
    spent = {"loss": 0.0, "rows": 0}
    compute_loss, backward = trainer.compute_loss, trainer.accelerator.backward

    def timed_loss(model, inputs, *args, **kwargs):  # the loss pass: scoring forward, then backward
        spent["rows"] += len(trainer.informative_rows(inputs)["advantages"])
        started = time.perf_counter()
        loss = compute_loss(model, inputs, *args, **kwargs)
        spent["loss"] += time.perf_counter() - started
        return loss

    def timed_backward(loss, **kwargs):
        started = time.perf_counter()
        backward(loss, **kwargs)
        spent["loss"] += time.perf_counter() - started

    trainer.compute_loss, trainer.accelerator.backward = timed_loss, timed_backward
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    return total, spent["loss"], spent["rows"], {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def render_batch(processor, rows, images, batched: bool) -> float:
    """Seconds to render and tokenise a generation batch whose rollouts share their prompt's (decoded) image."""
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": row["question"]}]}]
        for row, image in zip(rows, images) for _ in range(GENERATIONS)
    ]  # fmt: skip
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    started = time.perf_counter()
    if batched:
        processor.apply_chat_template(conversations, **kwargs, processor_kwargs={"padding": True})
    else:
        for conversation in conversations:
            processor.apply_chat_template(conversation, **kwargs)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--repeats", type=int, default=3, help="rendering: best of this many runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        _, processor = load(args.model)
        data = write_tasks(folder, 200, 9_000_000, ["single"], processor, split="rl").parent
        rows = load_trajectories(data / "rl.jsonl")[:PROMPTS]
        images = [open_image(data / row["images"][0]) for row in rows]
        full, full_loss, full_rows, full_weights = grpo_run(args.model, data, args.steps, skip=False)
        skip, skip_loss, skip_rows, skip_weights = grpo_run(args.model, data, args.steps, skip=True)
        drift = max((full_weights[n] - skip_weights[n]).abs().max().item() for n in full_weights)
        one_by_one = min(render_batch(processor, rows, images, batched=False) for _ in range(args.repeats))
        batched = min(render_batch(processor, rows, images, batched=True) for _ in range(args.repeats))
    steps, batch = args.steps, PROMPTS * GENERATIONS
    results = {
        "grpo_step_speedup": round(full / skip, 2),
        "loss_pass_speedup": round(full_loss / skip_loss, 2),
        "render_speedup": round(one_by_one / batched, 2),
        "seconds_per_step": {"all_rows": round(full / steps, 3), "informative_rows": round(skip / steps, 3)},
        "rows_scored_per_step": {"all_rows": full_rows / steps, "informative_rows": skip_rows / steps},
        "max_weight_difference": drift,
    }
    print(f"GRPO on single tasks, {PROMPTS} prompts x {GENERATIONS} rollouts per step, {steps} steps")
    print(f"  {'':34} {'s/step':>8} {'loss pass s/step':>17} {'rows scored':>12}")
    variants = [
        ("every completion scored", full, full_loss, full_rows),
        ("zero-advantage rows skipped", skip, skip_loss, skip_rows),
    ]
    for name, total, loss_pass, rows_scored in variants:
        print(f"  {name:34} {total / steps:8.3f} {loss_pass / steps:17.3f} {rows_scored / steps:12.1f}")
    print(f"  speedup: step {results['grpo_step_speedup']}x, loss pass {results['loss_pass_speedup']}x "
          f"(of {batch} rows); weights after both runs differ by at most {drift:.2e}")  # fmt: skip
    print(f"Rendering one generation batch ({batch} conversations, {PROMPTS} distinct images)")
    print(f"  one conversation at a time   {one_by_one:8.3f} s")
    print(f"  one batch (resized once)     {batched:8.3f} s   {results['render_speedup']}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

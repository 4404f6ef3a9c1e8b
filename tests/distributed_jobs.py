"""Training jobs for tests/test_distributed.py, run in this process or, under `accelerate launch`, in every process:

    accelerate launch --config_file ... tests/distributed_jobs.py JOBS.json

JOBS.json is a list of {"stage": "sft" | "grpo", "config": {run config}, "plan": {question: {"answer", "mode"}}}.
GRPO rollouts are scripted (every token forced, so every process and every run writes the same completions): in a
"right" prompt both rollouts answer right (advantage 0), in a "mixed" one the first is right and the second wrong.
Each process writes JOBS.json.rankN with one entry per job: its rank, the distributed type, the losses and, for GRPO, per loss pass
how many rows were informative and how many were scored.
"""

import json
import sys
import time


def question(prompt: list[dict]) -> str:
    return next(item["text"] for item in prompt[-1]["content"] if item.get("type") == "text")


def scripted(processor, plan: dict):
    from transformers import LogitsProcessorList

    from vilavt.remote_code.protocol_vilavt import render_tool_call
    from vilavt.scripted import ScriptedPolicy, answer_text

    def factory(prompts):
        scripts = []
        for i, prompt in enumerate(prompts):
            entry = plan[question(prompt)]
            answer = entry["answer"] if entry["mode"] == "right" or i % 2 == 0 else "Z"
            scripts.append([(0, render_tool_call([(0, [0, 0, 56, 56])], "look", "zoom")), (0, answer_text(answer))])
        return LogitsProcessorList([ScriptedPolicy(processor.tokenizer, scripts)])

    return factory


def run(jobs: list[dict]) -> list[dict]:
    from vilavt.train.common import save_final
    from vilavt.train.grpo import build_grpo_trainer
    from vilavt.train.sft import build_sft_trainer

    results = []
    for job in jobs:
        started = time.time()
        passes = []
        if job["stage"] == "sft":
            trainer = build_sft_trainer(job["config"])
        else:
            from vilavt.loading import load_model_and_processor

            model, processor = load_model_and_processor(job["config"]["model"])
            trainer = build_grpo_trainer(
                job["config"], model, processor, logits_processor_factory=scripted(processor, job["plan"])
            )
            select = trainer.informative_rows

            def recorded(inputs):
                kept = select(inputs)
                passes.append([int(inputs["advantages"].ne(0).sum()), len(kept["advantages"])])
                return kept

            trainer.informative_rows = recorded
        trainer.train()
        folder = save_final(trainer)
        results.append(
            {
                "stage": job["stage"],
                "rank": trainer.accelerator.process_index,
                "processes": trainer.accelerator.num_processes,
                "type": trainer.accelerator.distributed_type.value,
                "folder": folder,
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "passes": passes,
                "seconds": round(time.time() - started, 1),
            }
        )
    return results


if __name__ == "__main__":
    results = run(json.loads(open(sys.argv[1]).read()))
    with open(f"{sys.argv[1]}.rank{results[0]['rank']}", "w") as out:
        json.dump(results, out)

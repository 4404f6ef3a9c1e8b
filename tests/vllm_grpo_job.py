"""Two GRPO steps with vLLM rollouts in TRL's colocate mode on the tiny model, in a fresh interpreter (so TRL's
engine is the process's only vLLM engine). Run by tests/test_vllm_grpo.py; prints one JSON line of results.

    python tests/vllm_grpo_job.py FOLDER [--no-sync]

`--no-sync`: the control run, in which the engine keeps the weights of the first sync.
"""

import itertools
import json
import os
import sys
from pathlib import Path

for key, value in {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_USE_AOT_COMPILE": "0",  # TRL's engine is not eager: without dynamo, vLLM's ahead-of-time compile fails
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
from conftest import write_images  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from vilavt import tiny_vilavt  # noqa: E402
from vilavt.scripted import ScriptedPolicy, answer_text, tool_call_text  # noqa: E402
from vilavt.train.grpo import build_grpo_trainer  # noqa: E402

# One prompt: both steps roll it out, so step 2 meets the image and crop items of step 1 again (the encoder cache
# must not serve features computed with the old weights).
ROWS = [
    {"images": ["scene.png"], "question": "What is in the red frame?", "answer": "B", "problem_type": "multiple choice"},
]


def engine_weight(trainer, name: str) -> torch.Tensor:
    """One parameter as TRL's vLLM engine holds it (vLLM names: `language_model.model.…`)."""
    return trainer.vllm_generation.llm.apply_model(lambda m: dict(m.named_parameters())[name].detach().clone())[0]


def main(folder: str, sync_weights: bool = True) -> dict:
    os.makedirs(folder, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(folder, "vllm-cache"))
    write_images(Path(folder))
    with open(os.path.join(folder, "train.jsonl"), "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in ROWS)
    # The "demo" size: vLLM's CPU attention has no kernel for the "test" preset's head size (16).
    model, processor = tiny_vilavt(seed=0, preset="demo", processor_kwargs=dict(prompt_style="compact"))
    checkpoint = os.path.join(folder, "checkpoint")
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)

    answers = {row["question"]: row["answer"] for row in ROWS}
    rollouts = itertools.count()

    def scripted(prompts):  # with vLLM: one rollout at a time; every other one answers wrong
        (prompt,) = prompts
        question = next(item["text"] for item in prompt[-1]["content"] if item.get("type") == "text")
        answer = answers[question] if next(rollouts) % 2 == 0 else "Z"
        script = [(2, tool_call_text([(0, [0, 0, 56, 56])], "zoom")), (2, answer_text(answer))]
        return LogitsProcessorList([ScriptedPolicy(processor.tokenizer, [script])])

    config = dict(
        model=checkpoint, train_file=os.path.join(folder, "train.jsonl"), image_root=folder,
        output_dir=os.path.join(folder, "out"), per_device_train_batch_size=2, num_generations=2, max_steps=2,
        learning_rate=1e-2, max_completion_length=600, max_rounds=3, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=4096,
    )  # fmt: skip
    trainer = build_grpo_trainer(config, logits_processor_factory=scripted)

    # After each of TRL's weight syncs: does the engine hold the policy's weights?
    # text_proj: trained by GRPO's recipe, and a plain module in the engine (vLLM's CPU backend repacks its own
    # linear layers' weights out of reach).
    name = "text_proj.weight"
    policy = dict(trainer.model.named_parameters())["model.text_proj.weight"]
    syncs, sync = [], trainer.vllm_generation.sync_weights

    def checked_sync():
        if syncs and not sync_weights:  # the control run: the engine keeps the first weights
            syncs.append(False)
            return
        sync()
        engine = engine_weight(trainer, name)  # vLLM's "auto" dtype: bfloat16 for a float32 checkpoint on CPU
        syncs.append(bool(torch.equal(engine, policy.detach().to(engine.dtype))))

    trainer.vllm_generation.sync_weights = checked_sync
    start = policy.detach().clone()
    batches, compute_loss = [], trainer.compute_loss

    def capture(model, inputs, *args, **kwargs):
        batches.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = capture
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    episodes = [ep for batch in batches for ep in batch["vilavt_episodes"]]
    return {
        "steps": len(logs),
        "rounds_per_episode": [h["vilavt/rounds_per_episode"] for h in logs],
        "reward_std": [h["reward_std"] for h in logs],
        "accuracy": [h["vilavt/accuracy"] for h in logs],
        "logprob_gap": [h["vilavt/rollout_logprob_gap"] for h in logs],
        "syncs_matched_policy": syncs,
        "policy_moved": float((policy.detach() - start).abs().max()),
        "vllm_requests_per_episode": [len(getattr(ep, "vllm_requests", [])) for ep in episodes],
        "cached_share_after_round_1": [
            min(r.cache_hit_rate for r in ep.vllm_requests[1:]) for ep in episodes if len(ep.vllm_requests) > 1
        ],
        "tool_tokens_masked": all(
            bool(((batch["completion_mask"] * batch["tool_mask"]).bool() & (batch["completion_ids"] == processor.image_token_id)).sum() == 0)
            for batch in batches
        ),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sync_weights="--no-sync" not in sys.argv[2:])))

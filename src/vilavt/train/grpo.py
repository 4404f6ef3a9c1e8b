"""Stage 2: GRPO with TRL's GRPOTrainer, whose rollouts are ViLaVT's own chatting `generate`.

TRL's stock scoring pass only knows the dataset's images, so completions holding injected crop
tokens cannot be scored by it. `ViLaVTGRPOTrainer` keeps each rollout's full model inputs (originals,
crops, queries, image→query mapping) with the batch and gives them to every scoring forward; the
tokens the loop injected (tool responses, image tokens) get zero loss weight through TRL's `env_mask`.

Dataset rows: `prompt` (the question), `image_paths` (original images), `answer`, `problem_type`
(and optionally `max_pixels`). The images column is deliberately not called `images`, so TRL does no
image processing of its own.
"""

import contextlib
import copy
import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from ..remote_code.processing_vilavt import open_image
from ..rewards import accuracy_reward, format_reward, make_vilavt_reward
from ..trajectories import load_trajectories
from .common import GRPO_TRAINABLE, apply_lora, load_model_and_processor, precision_defaults, save_checkpoint, set_trainable, split_config

logger = logging.getLogger(__name__)

VISION_KEYS = ("pixel_values", "image_grid_thw", "query_ids", "query_attention_mask", "image_to_query_mapping")
# What TRL would put in the batch for its own image handling; our rollouts carry their own.
TRL_VISION_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "num_tiles", "mm_token_type_ids", "token_type_ids",
    "pixel_attention_mask", "spatial_shapes", "image_sizes", "image_position_ids",
)  # fmt: skip


def collate_vision(samples: list[dict], device) -> dict:
    """Concatenate per-sample vision inputs; each sample's query rows are offset in the mapping."""
    samples = [s for s in samples if "pixel_values" in s]
    if not samples:
        return {}
    length = max(s["query_ids"].shape[1] for s in samples)
    mappings, offset = [], 0
    for sample in samples:
        mappings.append(sample["image_to_query_mapping"] + offset)
        offset += sample["query_ids"].shape[0]
    batch = {
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
        "query_ids": torch.cat([F.pad(s["query_ids"], (0, length - s["query_ids"].shape[1])) for s in samples]),
        "query_attention_mask": torch.cat(
            [F.pad(s["query_attention_mask"], (0, length - s["query_attention_mask"].shape[1])) for s in samples]
        ),
        "image_to_query_mapping": torch.cat(mappings),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _rollout(prompts, trainer):
    return trainer.vilavt_rollout(prompts)


class ViLaVTGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with ViLaVT rollouts (multi-round chatting `generate`) and a scoring pass that sees each
    rollout's crops and queries.

    Extra arguments:
        image_root: folder that relative `image_paths` resolve against.
        rollout_kwargs: passed to `generate` (e.g. `max_rounds`, `max_regions`, `max_turn_tokens`).
        logits_processor_factory: `rows -> LogitsProcessorList` for the rollouts of a batch (e.g. a scripted
            policy in tests); rows are the dataset rows, in batch order.
        skip_zero_advantage: drop the completions whose advantage is 0 before the loss pass, when that leaves
            the update unchanged (see `informative_rows`; default True).

    Logged metrics besides TRL's: `vilavt/rounds_per_episode`, `vilavt/crops_per_episode`,
    `vilavt/answered` (share of episodes that ended with an answer), `vilavt/format_rate` and `vilavt/accuracy`
    (the reward's two parts) and `vilavt/rollout_logprob_gap`
    (max |log p| difference between the scoring pass and the rollout on the trained tokens; ~0 before
    the first update of a generation batch, then the policy's drift).
    """

    _tag_names = ["trl", "grpo", "vilavt"]  # the model refuses TRL's stock GRPOTrainer (see ViLaVTChatMixin.add_model_tags)

    def __init__(
        self, *args, image_root=None, rollout_kwargs=None, logits_processor_factory=None, skip_zero_advantage=True,
        **kwargs,
    ):  # fmt: skip
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        self.skip_zero_advantage = skip_zero_advantage
        self._image_root = Path(image_root) if image_root else None
        self._rollout_kwargs = dict(rollout_kwargs or {})
        self._logits_processor_factory = logits_processor_factory
        self._rows = self._rollout_vision = self._rollout_logps = self._active_vision = None
        self._last_logps = None
        super().__init__(*args, rollout_func=_rollout, **kwargs)

    # ---- rollouts ------------------------------------------------------------------------------

    def _path(self, path: str) -> Path:
        path = Path(path)
        return path if path.is_absolute() or self._image_root is None else self._image_root / path

    def vilavt_rollout(self, prompts: list) -> dict:
        rows = self._rows
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("ViLaVT rollouts need the batch rows (set by _generate_and_score_completions)")
        processor = self.processing_class
        load = functools.cache(lambda path: open_image(self._path(path)))  # a prompt's rollouts share its images
        originals = [[load(p) for p in row["image_paths"]] for row in rows]
        conversations = [
            [{"role": "user", "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": str(q)}]}]
            for images, q in zip(originals, prompts)
        ]
        inputs = processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        ).to(self.accelerator.device)
        kwargs = dict(self._rollout_kwargs)
        if self._logits_processor_factory is not None:
            kwargs["logits_processor"] = self._logits_processor_factory(rows)
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.return_dict_in_generate = True
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as model:
            output = model.generate(
                **inputs,
                images=originals,
                processor=processor,
                generation_config=generation_config,
                output_logprobs=True,
                **kwargs,
            )
        prompt_ids, completion_ids, env_mask, logprobs, vision, texts = [], [], [], [], [], []
        for episode, sampled_logps in zip(output.episodes, output.logprobs):
            start = episode.prompt_length
            prompt_ids.append(episode.ids[:start])
            completion_ids.append(episode.ids[start:])
            mask = [int(s) for s in episode.sampled[start:]]
            env_mask.append(mask)
            values = iter(sampled_logps.tolist())
            logprobs.append([next(values) if m else 0.0 for m in mask])
            inputs_full = episode.model_inputs()
            vision.append({k: inputs_full[k].cpu() for k in VISION_KEYS if k in inputs_full})
            texts.append(processor.tokenizer.decode(episode.ids[start:]))
        self._rollout_vision = self._active_vision = vision
        self._rollout_logps = logprobs
        traces = output.traces
        self._log_metric("vilavt/rounds_per_episode", sum(len(t.rounds) for t in traces) / len(traces))
        self._log_metric("vilavt/crops_per_episode", sum(len(r.crops) for t in traces for r in t.rounds) / len(traces))
        self._log_metric("vilavt/answered", sum(t.answer is not None for t in traces) / len(traces))
        # The reward's two parts, logged apart: how often the protocol is kept, how often the answer is right.
        self._log_metric("vilavt/format_rate", sum(format_reward(texts)) / len(texts))
        answers, kinds = [row["answer"] for row in rows], [row["problem_type"] for row in rows]
        self._log_metric("vilavt/accuracy", sum(accuracy_reward(texts, answers, kinds)) / len(texts))
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,
            "env_mask": env_mask,
            "completion_text": texts,  # with the turn markers, for the rewards
            "stop_reason": [t.stop_reason for t in traces],
        }

    def _generate_and_score_completions(self, inputs):
        self._rows = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rows = self._active_vision = None
        for key in TRL_VISION_KEYS:
            output.pop(key, None)
        completion_length = output["completion_ids"].shape[1]
        output["vilavt_vision"] = self._rollout_vision  # a list, one dict per sample: survives TRL's shuffle/split
        output["vilavt_rollout_logps"] = torch.stack(
            [F.pad(torch.tensor(lp), (0, completion_length - len(lp))) for lp in self._rollout_logps]
        ).to(output["completion_ids"].device)
        return output

    # ---- scoring -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def scoring_vision(self, batch: dict):
        """Within it, scoring passes (`_get_per_token_logps_and_entropies`) see `batch`'s rollout vision inputs."""
        self._active_vision = batch["vilavt_vision"]
        try:
            yield
        finally:
            self._active_vision = None

    def informative_rows(self, inputs: dict) -> dict:
        """`inputs` without the completions whose advantage is 0, when dropping them leaves the update unchanged.

        With no KL term (beta = 0) and a loss normalised by the generation batch's token count (`dapo`,
        `cispo`: `num_items_in_batch` is computed before this), such a completion adds exactly 0 to the loss
        and to every gradient. GRPO groups whose rollouts all got the same reward are made of them (most groups
        once the policy is good), so skipping their scoring forward and backward — and the padding columns only
        they needed — is free speed. One row is kept when none is informative, so that the step still runs a
        backward. The logged entropy and clip ratios are then over the kept rows.
        """
        advantages = inputs["advantages"]
        batch = advantages.size(0)
        keep = advantages.reshape(batch, -1).ne(0).any(dim=1)
        exact = self.beta == 0.0 and self.loss_type in ("dapo", "cispo") and self.top_entropy_quantile == 1.0
        if not (self.skip_zero_advantage and exact) or keep.all():
            return inputs
        if not keep.any():
            keep[0] = True
        rows = keep.nonzero().squeeze(1)
        completion_width = inputs["completion_ids"].size(1)
        first, last = 0, completion_width
        if self.pad_to_multiple_of is None:  # prompts are left-padded, completions right-padded
            first = int(inputs["prompt_mask"][rows].any(dim=0).nonzero()[0])
            real = inputs["completion_mask"][rows].any(dim=0).nonzero()
            last = int(real[-1]) + 1 if len(real) else completion_width
        kept = {}
        for key, value in inputs.items():
            if isinstance(value, list) and len(value) == batch:
                value = [value[i] for i in rows.tolist()]
            elif torch.is_tensor(value) and value.dim() > 0 and value.size(0) == batch:
                value = value[rows]
                if key in ("prompt_ids", "prompt_mask"):
                    value = value[:, first:]
                elif value.dim() == 2 and value.size(1) == completion_width:
                    value = value[:, :last]
            kept[key] = value
        return kept

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.informative_rows(inputs)
        with self.scoring_vision(inputs):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._last_logps is not None and "vilavt_rollout_logps" in inputs:
            mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).bool()
            gap = (self._last_logps - inputs["vilavt_rollout_logps"]).abs()[mask]
            mode = "train" if self.model.training else "eval"
            value = gap.max() if gap.numel() else torch.zeros((), device=mask.device)
            self._metrics[mode]["vilavt/rollout_logprob_gap"].append(self.accelerator.gather(value).max().item())
        return loss

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **_trl_vision,
    ):  # fmt: skip
        vision = self._active_vision
        if vision is None or len(vision) != input_ids.size(0):
            raise RuntimeError("the scoring pass needs the rollouts' vision inputs (one per sample)")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            with self.accelerator.autocast():
                outputs = model(
                    input_ids=ids,
                    attention_mask=mask,
                    labels=labels,
                    fused_lm_head=True,
                    **collate_vision(vision[start : start + batch_size], ids.device),
                )
            all_logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                all_entropies.append(outputs.entropy[:, -logits_to_keep:])
        logps = torch.cat(all_logps)
        self._last_logps = logps.detach()
        return logps, (torch.cat(all_entropies) if compute_entropy else None), None


def grpo_dataset(rows: list[dict]):
    """GRPO rows from trajectories or plain question rows (`images`, `question`, `answer`, `problem_type`)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": row["question"],
                "image_paths": list(row["images"]),
                "answer": str(row["answer"]),
                "problem_type": row["problem_type"],
            }
            for row in rows
        ]
    )


def completion_text_reward(reward):
    """Adapt a reward over multi-turn texts to TRL's call: use the rollouts' `completion_text` (turn markers
    kept) instead of TRL's decoded completions (special tokens stripped)."""

    def wrapped(completions, completion_text=None, **kwargs):
        return reward(completion_text if completion_text is not None else completions, **kwargs)

    wrapped.__name__ = reward.__name__
    return wrapped


def build_grpo_trainer(config: dict, model=None, processor=None, logits_processor_factory=None):
    """A ViLaVTGRPOTrainer for a run config (see examples/configs/grpo_*.yaml)."""
    ours, trl_kwargs = split_config(config)
    if model is None:
        model, processor = load_model_and_processor(ours.get("model", "tiny"), ours.get("quantization"))
    counts = set_trainable(model, {**GRPO_TRAINABLE, **ours.get("train", {})})
    logger.info("trainable parameters per part: %s", counts)
    if ours.get("lora"):
        model = apply_lora(model, ours["lora"])
    trl_kwargs = precision_defaults(dict(trl_kwargs))
    trl_kwargs.setdefault("output_dir", "outputs/grpo")
    trl_kwargs.setdefault("beta", 0.0)  # the reference trains without KL (REFERENCE.md §4.3)
    trl_kwargs.setdefault("disable_dropout", True)
    trl_kwargs.setdefault("mask_truncated_completions", False)
    args = GRPOConfig(**trl_kwargs)
    weights = ours.get("reward_weights", {})
    reward = make_vilavt_reward(weights.get("accuracy", 0.5), weights.get("format", 0.5))
    rollout_kwargs = {k: ours[k] for k in ("max_rounds", "max_regions") if k in ours}
    return ViLaVTGRPOTrainer(
        model=model,
        reward_funcs=[completion_text_reward(reward)],
        args=args,
        train_dataset=grpo_dataset(load_trajectories(ours["train_file"])),
        processing_class=processor,
        image_root=ours.get("image_root"),
        rollout_kwargs=rollout_kwargs,
        logits_processor_factory=logits_processor_factory,
    )


def run_grpo(config: dict) -> str:
    trainer = build_grpo_trainer(config)
    trainer.train()
    final = config.get("final_dir") or f"{trainer.args.output_dir}/final"
    return save_checkpoint(trainer.model, trainer.processing_class, final)

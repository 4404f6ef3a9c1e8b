"""Stage 2: GRPO with TRL's GRPOTrainer, whose rollouts are ViLaVT's own chatting `generate`.

TRL's stock scoring pass only knows the dataset's images, so completions holding injected crop
tokens cannot be scored by it. `ViLaVTGRPOTrainer` keeps each rollout's `Episode` (originals, crops, queries,
image→query mapping) with the batch, and every scoring forward gets the vision inputs of its rows, batched by
the loop's own `vision_inputs`; the tokens the loop injected (tool responses, image tokens) get zero loss weight
through TRL's `env_mask`.

Dataset rows (`vilavt.train.data.load_grpo_rows`): `prompt` (a conversation whose image items hold the original
images' paths), `answer`, `problem_type`. There is deliberately no `images` column, so TRL does no image
processing of its own.
"""

import contextlib
import copy
import functools
import logging
import os
from dataclasses import dataclass

import torch
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation

from ..remote_code.generation_vilavt import vision_inputs
from ..remote_code.processing_vilavt import open_image
from ..rewards import make_vilavt_reward
from .common import prepare_model, run_and_dataset, save_final
from .config import RunConfig

logger = logging.getLogger(__name__)


@dataclass
class Scoring:
    """What the scoring forwards of one pass see: the rollouts (one `Episode` per row, in row order), and, once the
    pass ran, its per-token log-probs."""

    episodes: list
    logps: torch.Tensor | None = None


def _with_images(prompt: list[dict], load) -> tuple[list[dict], list]:
    """(the prompt with its image items opened, the original images in order). Items come from a dataset, where
    every item carries every key (None where unused)."""
    originals, conversation = [], []
    for message in prompt:
        content = message["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                item = {k: v for k, v in item.items() if v is not None}
                if item.get("type") == "image":
                    originals.append(
                        load(item["image"]) if isinstance(item["image"], str) else open_image(item["image"])
                    )
                    item["image"] = originals[-1]
                items.append(item)
            content = items
        conversation.append({"role": message["role"], "content": content})
    return conversation, originals


@contextlib.contextmanager
def gathered_for_generation(model):
    """Under FSDP2, hold every shard's full parameters while the rollouts generate: the processes write episodes of
    different lengths, i.e. run different numbers of forwards, which per-forward all-gathers cannot serve."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    resharding = []
    for module in modules:
        group = module._get_fsdp_state()._fsdp_param_group  # torch has no public getter for this flag
        resharding.append(group is not None and group._reshard_after_forward)
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()  # an all-gather: every process, same modules, same order
    try:
        yield
    finally:
        for module, reshard in zip(modules, resharding):
            module.reshard()
            module.set_reshard_after_forward(reshard, recurse=False)


def _rollout(prompts, trainer):
    return trainer.vilavt_rollout(prompts)


class ViLaVTGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with ViLaVT rollouts (multi-round chatting `generate`) and a scoring pass that sees each
    rollout's crops and queries.

    Extra arguments:
        rollout_kwargs: passed to `generate` (e.g. `max_rounds`, `max_regions`, `max_turn_tokens`); default: the
            config's (`ViLaVTGRPOConfig.rollout_kwargs()`).
        logits_processor_factory: `prompts -> LogitsProcessorList` for the rollouts of a batch (e.g. a scripted
            policy in tests); prompts are the batch's conversations, in batch order.

    `use_vllm=True` (TRL's colocate mode, `vllm_mode="colocate"`): the rollouts run the same loop on TRL's vLLM
    engine, which TRL builds from the model's folder and keeps in sync with the policy (`vilavt.vllm.rollouts`;
    needs the vLLM environment, README "vLLM backend"); the scoring pass is unchanged.

    `skip_zero_advantage` (the config's field, also an attribute) drops completions whose advantage is 0 before the
    loss pass when that leaves the update unchanged (see `informative_rows`).

    Logged metrics besides TRL's: `vilavt/rounds_per_episode`, `vilavt/crops_per_episode`,
    `vilavt/answered` (share of episodes that ended with an answer), `vilavt/format_rate` and `vilavt/accuracy`
    (the reward's two parts, logged by the reward) and `vilavt/rollout_logprob_gap`
    (max |log p| difference between the scoring pass and the rollout on the trained tokens; ~0 before
    the first update of a generation batch, then the policy's drift).
    """

    _tag_names = ["trl", "grpo", "vilavt"]  # the model refuses TRL's stock GRPOTrainer (ViLaVTChatMixin.add_model_tags)

    def __init__(self, *args, rollout_kwargs=None, logits_processor_factory=None, **kwargs):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        if getattr(kwargs.get("args"), "use_vllm", False):  # one clear error before TRL builds an engine
            from ..vllm.rollouts import check_vllm_args

            check_vllm_args(kwargs["args"])
        self._logits_processor_factory = logits_processor_factory
        self._scoring: Scoring | None = None  # the rollouts the scoring forwards of the current pass belong to
        super().__init__(*args, rollout_func=_rollout, **kwargs)
        if self.use_vllm:
            from ..vllm.rollouts import adopt_vllm_generation

            adopt_vllm_generation(self)
        rollout_default = self.args.rollout_kwargs() if hasattr(self.args, "rollout_kwargs") else {}
        self._rollout_kwargs = dict(rollout_default if rollout_kwargs is None else rollout_kwargs)
        self.skip_zero_advantage = getattr(self.args, "skip_zero_advantage", True)

    # ---- rollouts ------------------------------------------------------------------------------

    def vilavt_rollout(self, prompts: list) -> dict:
        processor = self.processing_class
        load = functools.cache(open_image)  # a prompt's rollouts share its images
        conversations, originals = zip(*(_with_images(prompt, load) for prompt in prompts))
        inputs = processor.apply_chat_template(
            list(conversations),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        ).to(self.accelerator.device)
        kwargs = dict(self._rollout_kwargs)
        if self.use_vllm:  # the loop on TRL's colocated vLLM engine (weights synced by TRL)
            from ..vllm.rollouts import vllm_generate

            output = vllm_generate(self, inputs, list(originals), prompts, self._logits_processor_factory, **kwargs)
        else:
            output = self._transformers_generate(inputs, originals, prompts, kwargs)
        prompt_ids, completion_ids, env_mask, logprobs, texts = [], [], [], [], []
        for episode, sampled_logps in zip(output.episodes, output.logprobs):
            start = episode.prompt_length
            prompt_ids.append(episode.ids[:start])
            completion_ids.append(episode.ids[start:])
            mask = [int(s) for s in episode.sampled[start:]]
            env_mask.append(mask)
            values = iter(sampled_logps.tolist())
            logprobs.append([next(values) if m else 0.0 for m in mask])
            texts.append(processor.tokenizer.decode(episode.ids[start:]))
        # The scoring passes of this generation batch (TRL's old / reference log-probs, then the loss passes)
        # rebuild their vision inputs from these episodes.
        self._scoring = Scoring(list(output.episodes))
        traces = output.traces
        self._log_metric("vilavt/rounds_per_episode", sum(len(t.rounds) for t in traces) / len(traces))
        self._log_metric("vilavt/crops_per_episode", sum(len(r.crops) for t in traces for r in t.rounds) / len(traces))
        self._log_metric("vilavt/answered", sum(t.answer is not None for t in traces) / len(traces))
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,  # TRL keeps them as `sampling_per_token_logps`
            "env_mask": env_mask,
            "completion_text": texts,  # with the turn markers, for the rewards
            "stop_reason": [t.stop_reason for t in traces],
        }

    def _transformers_generate(self, inputs, originals, prompts, kwargs):
        processor = self.processing_class
        if self._logits_processor_factory is not None:
            kwargs["logits_processor"] = self._logits_processor_factory(prompts)
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.return_dict_in_generate = True
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            gathered_for_generation(self.model_wrapped) if self.is_fsdp_enabled else contextlib.nullcontext(),
        ):
            output = model.generate(
                **inputs,
                images=list(originals),
                processor=processor,
                generation_config=generation_config,
                output_logprobs=True,
                **kwargs,
            )
        return output

    def _generate_and_score_completions(self, inputs):
        try:
            output = super()._generate_and_score_completions(inputs)
            output["vilavt_episodes"] = self._scoring.episodes  # a list, one per row: survives TRL's shuffle/split
        finally:
            self._scoring = None
        return output

    # ---- scoring -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def scoring_vision(self, batch: dict):
        """Within it, scoring passes (`_get_per_token_logps_and_entropies`) see `batch`'s rollouts; yields the
        `Scoring`, whose `logps` the pass fills."""
        self._scoring = Scoring(batch["vilavt_episodes"])
        try:
            yield self._scoring
        finally:
            self._scoring = None

    def informative_rows(self, inputs: dict) -> dict:
        """`inputs` without completions whose advantage is 0, when dropping them leaves the update unchanged.

        With no KL term (beta = 0) and a loss normalised by the generation batch's token count (`dapo`,
        `cispo`: `num_items_in_batch` is computed before this), such a completion adds exactly 0 to the loss
        and to every gradient. GRPO groups whose rollouts all got the same reward are made of them (most groups
        once the policy is good), so skipping their scoring forward and backward — and the padding columns only
        they needed — is free speed.

        How many rows are kept is decided across processes: every process keeps as many rows as the process with
        the most informative ones (at least one, so that every step runs a backward), topping up with
        zero-advantage rows, because TRL gathers per-row metrics and DDP / FSDP / DeepSpeed need every process to
        run the same collectives. The logged entropy and clip ratios are then over the kept rows.
        """
        advantages = inputs["advantages"]
        batch = advantages.size(0)
        exact = self.beta == 0.0 and self.loss_type in ("dapo", "cispo") and self.top_entropy_quantile == 1.0
        if not (self.skip_zero_advantage and exact):
            return inputs
        informative = advantages.reshape(batch, -1).ne(0).any(dim=1)
        count = informative.sum().reshape(1)
        needed = max(1, int(self.accelerator.gather(count).max()))
        if needed >= batch:
            return inputs
        rows = torch.argsort((~informative).int(), stable=True)[:needed].sort().values  # informative rows first
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
        with self.scoring_vision(inputs) as scoring:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "sampling_per_token_logps" in inputs:
            mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).bool()
            gap = (scoring.logps - inputs["sampling_per_token_logps"]).abs()[mask]
            value = gap.max() if gap.numel() else torch.zeros((), device=mask.device)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["vilavt/rollout_logprob_gap"].append(self.accelerator.gather(value).max().item())
        return loss

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs
    ):
        """TRL's chunked scoring pass (log-probs, entropies, MoE auxiliary loss), whose forward also gets each chunk's
        rollout vision inputs: originals, crops, queries and the image→query mapping, from the rollouts' Episodes."""
        scoring = self._scoring
        if scoring is None or len(scoring.episodes) != input_ids.size(0):
            raise RuntimeError("the scoring pass needs the rollouts' episodes (one per row)")
        batch_size = batch_size or input_ids.size(0)
        starts = iter(range(0, input_ids.size(0), batch_size))

        def forward(**model_inputs):
            start = next(starts)
            vision = vision_inputs(scoring.episodes[start : start + batch_size])
            return model(**model_inputs, **{k: v.to(input_ids.device) for k, v in vision.items()})

        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            forward, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
        )
        scoring.logps = logps.detach()
        return logps, entropies, aux_loss


def completion_text_reward(reward):
    """Adapt a reward over multi-turn texts to TRL's call: use the rollouts' `completion_text` (turn markers
    kept) instead of TRL's decoded completions (special tokens stripped)."""

    def wrapped(completions, completion_text=None, **kwargs):
        return reward(completion_text if completion_text is not None else completions, **kwargs)

    wrapped.__name__ = reward.__name__
    return wrapped


def build_grpo_trainer(
    config: RunConfig | dict, model=None, processor=None, logits_processor_factory=None, train_dataset=None
):
    """A ViLaVTGRPOTrainer for a run config (`vilavt.train.config`; a dict in the YAML files' shape also works, see
    examples/configs/grpo_*.yaml). `train_dataset` (rows of `vilavt.train.data.grpo_dataset`) may replace
    `train_file`."""
    config, train_dataset = run_and_dataset("grpo", config, train_dataset)
    args = config.training
    model, processor = prepare_model(config, model, processor)
    reward = make_vilavt_reward(args.accuracy_weight, args.format_weight, **args.reward_options())
    return ViLaVTGRPOTrainer(
        model=model,
        reward_funcs=[completion_text_reward(reward)],
        args=args,
        train_dataset=train_dataset,
        processing_class=processor,
        logits_processor_factory=logits_processor_factory,
    )


def run_grpo(config: RunConfig | dict) -> str:
    trainer = build_grpo_trainer(config)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    return save_final(trainer)

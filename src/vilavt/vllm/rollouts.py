"""GRPO rollouts on vLLM: `ViLaVTGRPOTrainer` with `use_vllm=True` (TRL's colocate mode).

TRL builds the engine (`trainer.vllm_generation.llm`, in the trainer's process) from the model's folder, which
loads through this package's vLLM plugin, and syncs the policy's weights into it before each generation
batch (`GRPOTrainer._generate`, for a `rollout_func`). The sync itself goes through vLLM's `reload_weights`
(`ViLaVTVLLMGeneration`): TRL 1.16 writes each tensor with the model's `load_weights`, which fails on vLLM
0.32's CPU backend (it repacks linear weights and drops the loadable ones) and leaves vLLM's encoder cache
holding image features computed with the old weights — for ViLaVT, whose GRPO recipe trains the query
projection (`text_proj`), stale features. The trainer's `vilavt_rollout` hands its batch to
`vllm_generate`, which runs the chatting loop on that engine (`ViLaVTVLLM.generate`): the same inputs, rules
and outputs as the transformers rollouts, so TRL's scoring pass and the trainer's vision inputs are unchanged.

Log-probs: the loop records the policy's log-softmax(logits / temperature) of each sampled token, before the
logits processors and the control-token ban (`vilavt.vllm.logits`), as the transformers loop does and as
TRL's scoring pass computes it; TRL's importance-sampling correction (`vllm_importance_sampling_correction`)
then compares the same quantity from the two engines, i.e. corrects their numerical mismatch.
"""

from transformers import GenerationConfig
from trl.generation.vllm_generation import VLLMGeneration, empty_cache

from . import VLLMBackendError


class ViLaVTVLLMGeneration(VLLMGeneration):
    """TRL's vLLM backend whose colocated weight sync is vLLM's `reload_weights` (see the module docstring): the same
    tensors (`_iter_named_params`: FSDP, DeepSpeed and PEFT handled by TRL), then vLLM re-processes each layer for
    its kernels; the encoder cache (image features) and the prefix cache are dropped."""

    def sync_weights(self):
        if self.mode != "colocate":
            return super().sync_weights()
        if self.enable_sleep_mode:  # as the parent: map the weights' memory before writing them
            empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=self._iter_named_params(), is_checkpoint_format=True)
        # vLLM's reload drops only the model runner's features; the scheduler would still count them as cached.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()


def check_vllm_args(args) -> None:
    """One clear error before TRL builds anything when its vLLM settings cannot run the ViLaVT loop."""
    if args.vllm_mode != "colocate":
        raise VLLMBackendError(
            f"ViLaVT GRPO rollouts on vLLM need vllm_mode='colocate' (got {args.vllm_mode!r}): the chatting loop drives "
            "the engine in the trainer's process (per-turn requests, per-conversation logits processors and log-prob "
            "records); TRL's server client only sends single-turn requests"
        )
    from . import check_backend

    check_backend()


def adopt_vllm_generation(trainer) -> None:
    """Give the trainer's TRL vLLM backend ViLaVT's weight sync (its class, which states only that difference)."""
    trainer.vllm_generation.__class__ = ViLaVTVLLMGeneration


def rollout_generation_config(trainer) -> GenerationConfig:
    """The sampling settings TRL's GRPOTrainer gives transformers' `generate` (it builds none when `use_vllm` is
    set: its own vLLM path passes them to vLLM directly); the same fields, restated from the trainer."""
    tokenizer = trainer.processing_class.tokenizer
    config = GenerationConfig(
        max_new_tokens=trainer.max_completion_length,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=trainer.eos_token_ids,
        temperature=trainer.temperature,
        top_p=trainer.top_p,
        top_k=trainer.top_k,
        min_p=trainer.min_p,
        repetition_penalty=trainer.repetition_penalty,
        return_dict_in_generate=True,
    )
    config.update(**(trainer.args.generation_kwargs or {}))
    return config


def vllm_generate(trainer, inputs: dict, originals: list, prompts: list, logits_processor_factory=None, **kwargs):
    """The rollouts of one generation batch on TRL's colocated engine: `ViLaVTGenerateOutput` with the episodes
    and the policy's log-probs of the sampled tokens. `logits_processor_factory` (the trainer's) is called once
    per rollout with that rollout's prompt alone (`[prompt]`): each conversation is its own vLLM request."""
    from .api import ViLaVTVLLM

    engine = ViLaVTVLLM(trainer.vllm_generation.llm, trainer.processing_class, rollout_generation_config(trainer))
    factory = None
    if logits_processor_factory is not None:
        factory = lambda row: logits_processor_factory([prompts[row]])  # noqa: E731
    inputs = {key: value.cpu() if hasattr(value, "cpu") else value for key, value in inputs.items()}
    return engine.generate(**inputs, images=originals, output_logprobs=True, logits_processor_factory=factory, **kwargs)


__all__ = ["ViLaVTVLLMGeneration", "adopt_vllm_generation", "check_vllm_args", "rollout_generation_config", "vllm_generate"]

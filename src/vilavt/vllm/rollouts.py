"""GRPO rollouts on vLLM: `ViLaVTGRPOTrainer` with `use_vllm=True` (TRL's colocate mode).

TRL builds the engine (`trainer.vllm_generation.llm`, in the trainer's process) from the model's folder, which
loads through this package's vLLM plugin, and syncs the policy's weights into it before each generation
batch (`GRPOTrainer._generate`, for a `rollout_func`). The trainer's `vilavt_rollout` hands its batch to
`vllm_generate`, which runs the chatting loop on that engine (`ViLaVTVLLM.generate`): the same inputs, rules
and outputs as the transformers rollouts, so TRL's scoring pass and the trainer's vision inputs are unchanged.

Log-probs: the loop records the policy's log-softmax(logits / temperature) of each sampled token, before the
logits processors and the control-token ban (`vilavt.vllm.logits`), as the transformers loop does and as
TRL's scoring pass computes it; TRL's importance-sampling correction (`vllm_importance_sampling_correction`)
then compares the same quantity from the two engines, i.e. corrects their numerical mismatch.
"""

from transformers import GenerationConfig

from . import VLLMBackendError


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


__all__ = ["check_vllm_args", "rollout_generation_config", "vllm_generate"]

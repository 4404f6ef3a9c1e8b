"""What SFT and GRPO share: loading the model for a run, choosing the trainable parts, LoRA / QLoRA, and
saving remote-code checkpoints. Run configs are in `vilavt.train.config`."""

import logging
import os

import torch

from ..loading import load_model_and_processor
from .config import LORA_TARGETS, PARTS, LoraArguments, ModelArguments

logger = logging.getLogger(__name__)


def load_for_training(model_args: ModelArguments):
    """(model, processor) as `model_args` says."""
    return load_model_and_processor(
        model_args.model, model_args.quantization, model_args.attn_implementation, model_args.allow_missing_weights
    )


def part_of(name: str) -> str:
    """Which trainable part a parameter belongs to."""
    if ".text_encoder." in name or name.startswith("text_encoder."):
        return "text_encoder"
    if ".text_proj." in name or name.startswith("text_proj."):
        return "text_proj"
    if "instruct_key_proj" in name or "instruct_value_proj" in name:
        return "instruct"
    if ".visual.merger." in name:
        return "merger"
    if ".visual." in name:
        return "vit"
    return "llm"


def set_trainable(model, parts: dict) -> dict[str, int]:
    """Switch parameters on or off by part; returns the number of trainable parameters per part."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}; known: {list(PARTS)}")
    counts = dict.fromkeys(PARTS, 0)
    for name, parameter in model.named_parameters():
        part = part_of(name)
        # Quantized (integer) weights never train; with QLoRA the adapters do.
        parameter.requires_grad_(bool(parts.get(part, False)) and parameter.is_floating_point())
        if parameter.requires_grad:
            counts[part] += parameter.numel()
    return counts


def apply_lora(model, lora: LoraArguments):
    """Wrap the model with peft LoRA adapters (QLoRA when the model was loaded in 4/8 bit)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules or LORA_TARGETS,
        bias="none",
    )
    return get_peft_model(model, config)


def engage_fsdp_on_cpu(args) -> None:
    """Let accelerate's FSDP plugin run on CPU processes (gloo), e.g. `accelerate launch --config_file
    examples/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no` on a machine without GPUs.

    accelerate switches to FSDP only from a GPU-type process group; on CPU it leaves the processes unsharded and
    unsynchronised (distributed type NO or MULTI_CPU), although torch's FSDP2 runs on gloo. Marking the CPU process
    group as the multi-device type makes accelerate's own FSDP path (FSDP2 `fully_shard`, its state-dict gathering)
    take over; nothing else changes."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    args.device  # creates the process group (gloo, see ViLaVT*Config)
    state = PartialState()
    if state.num_processes > 1 and state.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU):
        state.distributed_type = DistributedType.MULTI_GPU


def gather_lm_head_for_fsdp(model) -> None:
    """Under FSDP2, gather the LM head's shard unit at the start of every forward.

    accelerate gives `lm_head` (with the final norm, when it finds one) its own FSDP2 unit, which gathers its weight
    when one of those modules runs forward. It does not find Qwen2.5-VL's final norm (inside `language_model`), and
    TRL's fused LM head reads `lm_head.weight` without calling `lm_head`: the weight would stay a sharded DTensor,
    and TRL's `full_tensor()` would leave its gradient unreduced across processes (each process would update its
    shard of the head with its own batch only). Gathered, the fused head reads the plain weight and FSDP
    reduce-scatters its gradient like every other one."""
    from torch.distributed.fsdp import FSDPModule

    def gather(module, args, kwargs):
        head = module.get_output_embeddings()
        if isinstance(head, FSDPModule):
            head.unshard()  # every process runs the same training forwards; a no-op once gathered
        return None

    model.register_forward_pre_hook(gather, with_kwargs=True)


def prepare_model(config, model=None, processor=None):
    """(model, processor) for a run: loaded unless given, the run's parts trainable, LoRA adapters if asked."""
    engage_fsdp_on_cpu(config.training)
    if model is None:
        model, processor = load_for_training(config.model)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        gather_lm_head_for_fsdp(model)
    counts = set_trainable(model, config.trainable())
    logger.info("trainable parameters per part: %s", counts)
    if config.lora.lora_r:
        model = apply_lora(model, config.lora)
    return model, processor


def save_checkpoint(model, processor, folder) -> str:
    """A remote-code checkpoint folder (LoRA adapters merged in) that AutoModel…from_pretrained(…,
    trust_remote_code=True) loads."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run_and_dataset(stage: str, config, train_dataset=None):
    """(the run config, its training dataset): a dict in the YAML files' shape is parsed like a file; the dataset is
    read (and checked) from `train_file` unless given."""
    from .config import ConfigError, run_config
    from .data import grpo_dataset, load_grpo_rows, load_sft_rows, sft_dataset

    if isinstance(config, dict):
        config = run_config(stage, config)
    if train_dataset is None:
        args = config.training
        if not args.train_file:
            raise ConfigError("train_file is required (a JSONL file of training rows, see vilavt.train.data)")
        load, make = (load_sft_rows, sft_dataset) if stage == "sft" else (load_grpo_rows, grpo_dataset)
        train_dataset = make(load(args.train_file, args.image_root))
    return config, train_dataset


def save_final(trainer, folder=None) -> str:
    """The run's final remote-code checkpoint (default: `final_dir`, else OUTPUT_DIR/final), written once. Every
    process must call it: under FSDP / DeepSpeed the full weights are gathered from all of them first."""
    from peft import PeftModel

    args, accelerator = trainer.args, trainer.accelerator
    folder = str(folder or getattr(args, "final_dir", None) or f"{args.output_dir}/final")
    model = accelerator.unwrap_model(trainer.model)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        if isinstance(model, PeftModel):
            logger.warning("LoRA under FSDP / DeepSpeed: %s holds the adapters, not merged weights", folder)
            trainer.save_model(folder)
        else:
            state_dict = accelerator.get_state_dict(trainer.model)  # a collective: every process takes part
            if accelerator.is_main_process:
                save_checkpoint(unsharded(model, state_dict), trainer.processing_class, folder)
    elif accelerator.is_main_process:
        save_checkpoint(model, trainer.processing_class, folder)
    accelerator.wait_for_everyone()
    return folder


def unsharded(model, state_dict: dict):
    """A plain instance of `model`'s class holding the gathered `state_dict`. FSDP2 swaps a module's class for a
    subclass (`FSDPViLaVT…`) whose name transformers does not know, so saving it would skip the conversion back to
    the checkpoint key layout."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.load_state_dict(state_dict, assign=True)
    plain.generation_config = model.generation_config
    return plain

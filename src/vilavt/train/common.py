"""What SFT and GRPO share: run configs (YAML + command-line overrides), loading the model, choosing
the trainable parts, LoRA / QLoRA, and saving remote-code checkpoints."""

import logging
import os
from pathlib import Path

import torch
import yaml

logger = logging.getLogger(__name__)

# Parts of the model the trainable-part flags switch on or off.
PARTS = ("llm", "vit", "merger", "instruct", "text_proj", "text_encoder")
# The reference SFT recipe: everything but the query text encoder and text_proj (REFERENCE.md §4.2).
SFT_TRAINABLE = dict(llm=True, vit=True, merger=True, instruct=True, text_proj=False, text_encoder=False)
# The reference GRPO recipe: the LLM (and, through it, text_proj); the vision side frozen (§4.3).
GRPO_TRAINABLE = dict(llm=True, vit=False, merger=False, instruct=False, text_proj=True, text_encoder=False)

# Linear layers LoRA adapts by default: attention and MLP projections of the ViT and the LLM (not the
# frozen query encoder).
LORA_TARGETS = r"^(?!.*text_encoder).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|attn\.proj)$"

# Keys of a run config that are ours; everything else goes to the TRL config (SFTConfig / GRPOConfig).
RUN_KEYS = {
    "model",
    "train_file",
    "image_root",
    "train",
    "lora",
    "quantization",
    "max_rounds",
    "max_regions",
    "final_dir",
    "reward_weights",
    "scripted_policy",
    "seed_model",
}


def parse_overrides(argv: list[str]) -> dict:
    """`--key value` pairs (values parsed as YAML; dotted keys nest: `--lora.r 8`)."""
    overrides, i = {}, 0
    while i < len(argv):
        key = argv[i]
        if not key.startswith("--"):
            raise SystemExit(f"expected --key value, got {key!r}")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise SystemExit(f"option {key} needs a value")
        value = yaml.safe_load(argv[i + 1])
        target = overrides
        *parents, leaf = key[2:].replace("-", "_").split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
        i += 2
    return overrides


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_run_config(path, overrides: dict | None = None) -> dict:
    """A run config from YAML with overrides applied (relative paths stay relative to the working directory)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    return merge(config, overrides or {})


def split_config(config: dict) -> tuple[dict, dict]:
    """(our keys, TRL config keys)."""
    ours = {k: v for k, v in config.items() if k in RUN_KEYS}
    trl = {k: v for k, v in config.items() if k not in RUN_KEYS}
    return ours, trl


def accelerator_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def precision_defaults(trl_kwargs: dict) -> dict:
    """TRL defaults to bf16, which fails on machines without it (e.g. CPU): fall back to float32."""
    if "bf16" not in trl_kwargs:
        trl_kwargs["bf16"] = accelerator_supports_bf16()
    if trl_kwargs.get("bf16") and not accelerator_supports_bf16():
        logger.warning("bf16 requested but not supported here; training in float32")
        trl_kwargs["bf16"] = False
    return trl_kwargs


def load_model_and_processor(name: str, quantization: str | None = None, attn_implementation: str | None = None):
    """The model and processor from a checkpoint folder or hub id, or `tiny` / `tiny:SEED` for the
    offline tiny model. `quantization`: None, "4bit" (QLoRA, nf4) or "8bit" (bitsandbytes)."""
    from ..remote_code.modeling_vilavt import ViLaVTForConditionalGeneration
    from ..remote_code.processing_vilavt import ViLaVTProcessor

    if str(name).startswith("tiny"):
        from ..tiny import tiny_vilavt

        seed = int(str(name).split(":", 1)[1]) if ":" in str(name) else 0
        if quantization:
            raise ValueError("quantization needs a saved checkpoint; save the tiny model first")
        return tiny_vilavt(seed=seed, attn_implementation=attn_implementation or "sdpa")
    kwargs = {}
    if quantization:
        from transformers import BitsAndBytesConfig

        if quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        elif quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            raise ValueError(f"quantization must be '4bit', '8bit' or null, got {quantization!r}")
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = ViLaVTForConditionalGeneration.from_pretrained(name, **kwargs)
    processor = ViLaVTProcessor.from_pretrained(name)
    return model, processor


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


def apply_lora(model, lora: dict):
    """Wrap the model with peft LoRA adapters (QLoRA when the model was loaded in 4/8 bit)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.get("r", 16),
        lora_alpha=lora.get("alpha", 32),
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora.get("target_modules", LORA_TARGETS),
        bias="none",
    )
    return get_peft_model(model, config)


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

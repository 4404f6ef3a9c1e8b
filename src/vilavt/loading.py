"""Loading a ViLaVT model and processor by name, for every command (chat, demo, eval, training).

A name is, in this order:

1. an existing folder (relative or absolute): a checkpoint. A folder always wins over a preset name, so a
   folder called `tiny-zoom` or `tiny` in the working directory is what loads;
2. a preset of the offline random-weight tiny models (`vilavt.tiny.PRESETS`): `tiny[:SEED]` (the test model),
   `tiny-demo[:SEED]`, `tiny-small[:SEED]`;
3. otherwise a hub id, handed to `from_pretrained`.

A checkpoint whose weights do not cover the model (missing keys would start random) is refused unless the
caller opts in (`allow_missing_weights=True`, `--allow_missing_weights` in training).
"""

import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_PRESET = re.compile(r"^tiny(?:-(?P<preset>[a-z]+))?(?::(?P<seed>.*))?$")


class ModelLoadError(OSError, ValueError):
    """A model name or checkpoint that cannot be loaded; the message is one line naming it. An OSError like
    `from_pretrained`'s own, so every `vilavt` command reports it as one line."""


def preset_of(name: str) -> tuple[str, int] | None:
    """(preset, seed) when `name` names a tiny preset and no folder of that name exists; else None."""
    from .tiny import PRESETS

    match = _PRESET.match(str(name))
    if match is None or Path(name).exists():
        return None
    preset = match["preset"] or "test"
    if preset not in PRESETS:
        names = ", ".join("tiny" if p == "test" else f"tiny-{p}" for p in PRESETS)
        raise ModelLoadError(
            f"model {name!r}: no such folder, and no such preset (presets: {names}, each with an optional :SEED)"
        )
    seed = match["seed"]
    if seed is not None and not re.fullmatch(r"\d+", seed):
        raise ModelLoadError(f"model {name!r}: the seed after ':' must be a non-negative integer, got {seed!r}")
    return preset, int(seed or 0)


def quantization_config(quantization: str):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if quantization == "8bit":
        if not torch.cuda.is_available():
            # bitsandbytes 0.50's 8-bit matmul has no CPU backward ("result type Float can't be cast to ... Char").
            raise ModelLoadError(
                "8-bit quantization needs a CUDA GPU (bitsandbytes has no 8-bit CPU training); use 4bit on CPU"
            )
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelLoadError(f"quantization must be '4bit', '8bit' or none, got {quantization!r}")


def load_model_and_processor(
    name,
    quantization: str | None = None,
    attn_implementation: str | None = None,
    allow_missing_weights: bool = False,
):
    """(model, processor) for a folder, a tiny preset or a hub id (see the module docstring). `quantization`:
    None, "4bit" (QLoRA, nf4) or "8bit" (bitsandbytes, GPU only)."""
    from .remote_code.modeling_vilavt import ViLaVTForConditionalGeneration
    from .remote_code.processing_vilavt import ViLaVTProcessor

    name = str(name)
    preset = preset_of(name)
    if preset is not None:
        from .tiny import tiny_vilavt

        if quantization:
            raise ModelLoadError("quantization needs a saved checkpoint; save the tiny model first")
        return tiny_vilavt(seed=preset[1], preset=preset[0], attn_implementation=attn_implementation or "sdpa")
    kwargs = {"output_loading_info": True}
    if quantization:
        kwargs["quantization_config"] = quantization_config(quantization)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model, info = ViLaVTForConditionalGeneration.from_pretrained(name, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        if not allow_missing_weights:
            raise ModelLoadError(
                f"{name}: the checkpoint lacks {len(missing)} weights ({shown}); they would start random. "
                "Pass allow_missing_weights=True (training: --allow_missing_weights) to use it anyway"
            )
        logger.warning("%s: %d weights missing, starting random: %s", name, len(missing), shown)
    processor = ViLaVTProcessor.from_pretrained(name)
    return model, processor


__all__ = ["ModelLoadError", "load_model_and_processor", "preset_of"]

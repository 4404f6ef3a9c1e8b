"""The vLLM backend of ViLaVT: the model (`model.py`), how an image reaches it with its query
(`processing.py`), the chatting loop on vLLM (`loop.py`), its Python API (`api.py`) and GRPO rollouts
(`rollouts.py`).

vLLM finds the model through the `vllm.general_plugins` entry point `vilavt = vilavt.vllm:register`
(pyproject.toml), which every vLLM process runs at start-up (registering in a script alone is not seen
by vLLM's worker processes), and the loop's logits processor through the `vllm.logits_processors` entry
point (`logits.py`), which every engine loads — also the one TRL's GRPO trainer builds. Importing this
package does not import vLLM.
"""

import importlib.metadata
import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "ViLaVTForConditionalGeneration"  # what the plug-in's config.json names
MODEL_CLASS = "vilavt.vllm.model:ViLaVTForConditionalGenerationVLLM"
ENTRY_POINTS = {  # group: what pyproject.toml installs there
    "vllm.general_plugins": "vilavt = vilavt.vllm:register",
    "vllm.logits_processors": "vilavt = vilavt.vllm.logits:ViLaVTLogitsProcessor",
}
SUPPORTED_VLLM = "vLLM 0.32"


class VLLMBackendError(RuntimeError):
    """The vLLM backend cannot run here; the message names what is missing."""


def register() -> None:
    """vLLM plugin entry point: the ViLaVT architecture and the ViLaVT config / processor classes (so
    checkpoints load without `trust_remote_code`)."""
    from transformers import AutoConfig, AutoProcessor
    from vllm import ModelRegistry

    from ..remote_code.configuration_vilavt import ViLaVTConfig
    from ..remote_code.processing_vilavt import ViLaVTProcessor

    try:
        AutoConfig.register("vilavt", ViLaVTConfig)
    except ValueError:  # already registered in this process
        pass
    try:
        AutoProcessor.register(ViLaVTConfig, ViLaVTProcessor)
    except ValueError:
        pass
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def check_backend() -> None:
    """Raise one `VLLMBackendError` naming what is missing: vLLM itself, this package's entry point, or a
    vLLM feature the backend uses."""
    try:
        import vllm
    except ImportError as err:
        raise VLLMBackendError(
            f"the vLLM backend needs vLLM ({SUPPORTED_VLLM}); it cannot be imported here: {err}. "
            "Install it with pip install \"vilavt[vllm]\" (GPU) or scripts/vllm-env (CPU; README: 'vLLM backend')"
        ) from None
    except Exception as err:  # e.g. a CUDA build of a dependency failing to load on a CPU machine
        raise VLLMBackendError(f"vLLM is installed but fails to import: {type(err).__name__}: {err}") from None
    for group, entry_point in ENTRY_POINTS.items():
        if "vilavt" not in [ep.name for ep in importlib.metadata.entry_points(group=group)]:
            raise VLLMBackendError(
                f'the vilavt package\'s vLLM entry point is not installed ([project.entry-points."{group}"] '
                f"{entry_point}); reinstall the package (pip install -e .) in the vLLM environment"
            )
    needed = {
        "vllm.LLM.apply_model": lambda: vllm.LLM.apply_model,
        "vllm.v1.sample.logits_processor.AdapterLogitsProcessor": lambda: __import__(
            "vllm.v1.sample.logits_processor", fromlist=["AdapterLogitsProcessor"]
        ).AdapterLogitsProcessor,
        "vllm.model_executor.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration": lambda: __import__(
            "vllm.model_executor.models.qwen2_5_vl", fromlist=["x"]
        ).Qwen2_5_VLForConditionalGeneration,
        "vllm.multimodal.parse.ImageProcessorItems.get_item_for_hash": lambda: __import__(
            "vllm.multimodal.parse", fromlist=["x"]
        ).ImageProcessorItems.get_item_for_hash,
    }
    for name, probe in needed.items():
        try:
            probe()
        except (ImportError, AttributeError):
            raise VLLMBackendError(
                f"this vLLM ({getattr(vllm, '__version__', '?')}) lacks {name}, which the ViLaVT backend needs "
                f"(tested with {SUPPORTED_VLLM})"
            ) from None


__all__ = ["register", "check_backend", "VLLMBackendError", "ARCHITECTURE"]

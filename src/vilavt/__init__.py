"""ViLaVT for Hugging Face Transformers.

The model lives in the top-level remote-code modules (`*_vilavt.py`: configuration, modeling, processing and
the modules they import) that every checkpoint carries; this package re-exports them as `vilavt.remote_code`
and adds the tooling around the model (tiny models, training, evaluation, CLI).
"""

from .remote_code.configuration_vilavt import ViLaVTConfig, ViLaVTVisionConfig
from .remote_code.modeling_vilavt import ViLaVTForConditionalGeneration, ViLaVTModel
from .remote_code.processing_vilavt import ViLaVTProcessor
from .tiny import tiny_vilavt

__all__ = [
    "ViLaVTConfig",
    "ViLaVTVisionConfig",
    "ViLaVTForConditionalGeneration",
    "ViLaVTModel",
    "ViLaVTProcessor",
    "tiny_vilavt",
]
__version__ = "0.1.0"

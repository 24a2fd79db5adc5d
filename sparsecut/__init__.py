"""sparsecut: SparseCut (sparse shortcuts for efficient multimodal fusion) as a transformers-native model.

from sparsecut import build, load_model
model, processor = build(vision=..., llm="smollm2-135m", fusion="cross_attention", schedule="uniform:4")
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .build import build, load_model, set_high_res_overlap
from .configuration import SparseCutConfig
from .data.images import InvalidInputError, load_image
from .modeling import ShortcutStats, SparseCutForConditionalGeneration, SparseCutOutput
from .processing import SparseCutProcessor

AutoConfig.register(SparseCutConfig.model_type, SparseCutConfig, exist_ok=True)
AutoModelForImageTextToText.register(SparseCutConfig, SparseCutForConditionalGeneration, exist_ok=True)
AutoProcessor.register(SparseCutConfig, SparseCutProcessor, exist_ok=True)

__version__ = "0.3.0"
__all__ = [
    "InvalidInputError",
    "ShortcutStats",
    "SparseCutConfig",
    "SparseCutForConditionalGeneration",
    "SparseCutOutput",
    "SparseCutProcessor",
    "build",
    "load_image",
    "load_model",
    "set_high_res_overlap",
]

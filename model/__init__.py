"""The model package: LLaMA + zero-init gated adaption prompts + CLIP visual prompt. Imports nothing from
data/, eval/, app/ or train.py."""

from model.config import AdapterConfig, LlamaConfig, ModelConfig, VisualConfig, preset
from model.llama import Transformer, count_trainable, is_trainable

__all__ = [
    "AdapterConfig",
    "LlamaConfig",
    "ModelConfig",
    "Transformer",
    "VisualConfig",
    "count_trainable",
    "is_trainable",
    "preset",
]

"""The model package: LLaMA + a PEFT method (model/methods/; the first: zero-init gated adaption prompts) + CLIP
visual prompt. Imports nothing from data/, eval/, app/ or train.py.

Public entry points (``model.loading``): ``load_model`` (a base model, optionally an adapter and a visual path),
``load_run`` (a training run directory), ``load_checkpoint`` (either); and ``load_tokenizer``.
"""

from model.checkpoint import BaseWeightsWarning, CheckpointError, WriteError, load_adapter, save_adapter
from model.config import ConfigError, LlamaAdapterConfig, LlamaConfig, ModelConfig, VisualConfig, preset
from model.llama import Transformer, count_trainable, is_trainable
from model.loading import attach_tokenizer, find_tokenizer, load_checkpoint, load_model, load_run
from model.methods import Method, MethodConfig, method_names, register_method
from model.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BaseWeightsWarning",
    "CheckpointError",
    "ConfigError",
    "LlamaAdapterConfig",
    "LlamaConfig",
    "Method",
    "MethodConfig",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "VisualConfig",
    "WriteError",
    "attach_tokenizer",
    "count_trainable",
    "find_tokenizer",
    "is_trainable",
    "load_adapter",
    "load_checkpoint",
    "load_model",
    "load_run",
    "load_tokenizer",
    "method_names",
    "preset",
    "register_method",
    "save_adapter",
]

"""PEFT methods behind one plug-in point (``base``: the registry and the ``Method`` hooks), one module each.

- ``llama_adapter``: zero-init gated adaption prompts, LLaMA-Adapter V1 (``AdapterConfig``).

Importing this package registers the methods it holds; a method defined elsewhere registers itself with
``@register_method`` when its module is imported.
"""

from model.methods.base import (
    Method,
    MethodConfig,
    build_method,
    config_from_dict,
    config_to_dict,
    method_class,
    method_names,
    method_of,
    register_method,
)
from model.methods.llama_adapter import AdapterConfig, LlamaAdapter

__all__ = [
    "AdapterConfig",
    "LlamaAdapter",
    "Method",
    "MethodConfig",
    "build_method",
    "config_from_dict",
    "config_to_dict",
    "method_class",
    "method_names",
    "method_of",
    "register_method",
]

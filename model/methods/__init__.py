"""PEFT methods behind one plug-in point (``base``: the registry and the ``Method`` hooks), one module each.

Importing this package imports every module in it, and each registers its method with ``@register_method``: a new
method is one new file here. A method defined elsewhere registers itself when its module is imported.
"""

import importlib
import pkgutil

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
from model.methods.llama_adapter import LlamaAdapter, LlamaAdapterConfig

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LlamaAdapterConfig",
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

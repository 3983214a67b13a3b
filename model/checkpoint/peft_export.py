"""Our adapters written as PEFT adapter directories (``python -m model.export RUN --to peft DIR``): the inverse of
``read_peft`` (model/checkpoint/importers.py).

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` under PEFT's names and layouts, for
``PeftModel.from_pretrained(LlamaForCausalLM, DIR)``. Each method converts its own tensors (``Method.to_peft``, the
inverse of its ``from_peft``); this module adds the fields every PEFT config has and writes both files atomically.
A method without a PEFT counterpart (``peft_type`` None) is refused with the list of methods that export.

The visual path: PEFT has no image input. A multimodal adapter is refused unless ``text_only``, which writes the
method's text part: exactly what the model computes for text-only input (no image), the visual tensors left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from model.checkpoint.files import atomic_write_files, check_output_dir
from model.config import ModelConfig
from model.llama import Transformer
from model.methods import Method, MethodConfig, method_class, method_names, method_of

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def peft_exporters() -> list[str]:
    """The registered methods that export to PEFT: those with a ``peft_type`` and their own ``to_peft``."""
    return [
        name
        for name in method_names()
        if method_class(name).peft_type is not None
        and getattr(method_class(name).to_peft, "__func__", None) is not Method.to_peft.__func__
    ]


def text_part(
    model: Transformer, config: MethodConfig, tensors: dict[str, Tensor], text_only: bool
) -> dict[str, Tensor]:
    """``tensors`` of a text-only model; a multimodal one is refused unless ``text_only``, which keeps the tensors
    the same method has without a visual path (built on the meta device: nothing allocated)."""
    if model.visual is None:
        return tensors
    if not text_only:
        raise ValueError(
            "the model has a visual path and no other tool's format has an image input: pass --text-only to export "
            "what it computes for text-only input (the visual projection and gates left out)"
        )
    with torch.device("meta"):
        text_model = Transformer(ModelConfig(llama=model.config.llama, method=config))
    keep = set(text_model.adapter_state_dict())
    return {name: tensor for name, tensor in tensors.items() if name in keep}


def peft_adapter(model: Transformer, *, text_only: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of ``model``'s adapter in PEFT's format; ValueError
    naming what PEFT cannot express."""
    if model.config.method is None:
        raise ValueError("the base model alone has no adapter to write as PEFT (--to hf writes the base)")
    with torch.no_grad():
        config, tensors = model.method.exported(model)
    cls = method_of(config)
    if cls.name not in peft_exporters():
        raise ValueError(f"PEFT has no {cls.name}; the methods that export to PEFT: {', '.join(peft_exporters())}")
    tensors = text_part(model, config, tensors, text_only)
    fields, state = cls.to_peft(config, tensors, model.config.llama)
    peft_config = {
        "peft_type": cls.peft_type,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        **fields,
    }
    return peft_config, {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def write_peft(model: Transformer, out_dir: str | Path, *, text_only: bool = False) -> Path:
    """``model``'s adapter as a PEFT directory (``peft_adapter``); returns the directory. Raises ValueError for what
    PEFT cannot express, CheckpointError for an output directory holding other files, WriteError for a failed
    write (both files or neither)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, PEFT_FILES)
    peft_config, state = peft_adapter(model, text_only=text_only)
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    atomic_write_files(
        {
            out_dir / "adapter_config.json": lambda tmp: tmp.write_text(text),
            out_dir / "adapter_model.safetensors": lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
        }
    )
    return out_dir

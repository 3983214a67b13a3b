"""The one meaning of ``"auto"`` for a device or a dtype, shared by training, evaluation, the demo and the bench.

- device ``auto``: the current CUDA device when one is available, else the CPU.
- dtype ``auto``: bfloat16 on CUDA (float16 where the GPU has no bfloat16), float32 on the CPU, whatever dtype the
  checkpoint stores (16-bit matmuls on a CPU are slow, and the official weights are float16).
"""

from __future__ import annotations

import torch

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``meta`` -> a torch.device; ValueError for a CUDA device that
    is not there."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available; use cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` | ``float32`` | ``bfloat16`` | ``float16`` -> the torch dtype of the frozen weights on ``device``."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32

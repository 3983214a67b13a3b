"""Trainable RMSNorms for methods that tune the frozen model's norms (LLaMA-Adapter V2's norm tuning, Houlsby's
trained layer norms). Not a registered method: helpers the owning methods call from their hooks.

The project's rule is that only ``adapter_*`` tensors train and are saved (``is_trainable`` in model/llama.py), and
the base's ``RMSNorm.weight`` stays frozen under its Meta name. So a tuned norm gets a trainable tensor of its own
and a forward hook that uses it, leaving the RMSNorm module and its weight unchanged:

- ``"weight"``: ``adapter_norm_weight`` (dim,), used in place of the frozen weight: out = x_hat * w', starting as a
  copy of w (exactly the base at start; the official V2 release's tuned RMSNorm, and Houlsby's trained norms);
- ``"scale"``: ``adapter_norm_scale`` (dim,), unit-init, multiplying the norm's output: out = x_hat * w * s.

x_hat is the RMS-normalised input, computed as the backbone does (fp32, cast back to the input's dtype).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

NormTuning = Literal["weight", "scale"]
"""How a tuned norm trains (see the module docstring)."""


def rms_normalize(norm: nn.Module, x: Tensor) -> Tensor:
    """RMSNorm without its weight, as the backbone computes it: in fp32, cast back to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x)


def scale_norm_output(norm: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """Forward hook of a norm tuned by scale: its output times the trainable ``adapter_norm_scale`` (dim,)."""
    return out * norm.adapter_norm_scale.to(out.dtype)


def replace_norm_weight(norm: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """Forward hook of a norm tuned by weight: the normalised input times ``adapter_norm_weight`` (dim,) instead of
    the frozen weight (x_hat * w')."""
    return rms_normalize(norm, args[0]) * norm.adapter_norm_weight.to(out.dtype)


def attach_tuned_norms(norms: list[nn.Module], how: NormTuning) -> None:
    """Give each RMSNorm of ``norms`` its trainable (empty) tensor and the forward hook that uses it."""
    for norm in norms:
        name = "adapter_norm_weight" if how == "weight" else "adapter_norm_scale"
        setattr(norm, name, nn.Parameter(torch.empty(norm.weight.shape)))  # (dim,)
        norm.register_forward_hook(replace_norm_weight if how == "weight" else scale_norm_output)


def reset_tuned_norms(norms: list[nn.Module], how: NormTuning) -> None:
    """Identity values: tuned weights copied from the frozen ones, scales 1."""
    with torch.no_grad():
        for norm in norms:
            if how == "weight":
                norm.adapter_norm_weight.copy_(norm.weight.float())
            else:
                norm.adapter_norm_scale.fill_(1.0)


def merge_tuned_norms(norms: list[nn.Module], how: NormTuning) -> None:
    """Fold the tuned tensors into the frozen weights (w' or w * s), leaving identity values behind."""
    with torch.no_grad():
        for norm in norms:
            if how == "weight":
                norm.weight.copy_(norm.adapter_norm_weight.to(norm.weight.dtype))
            else:
                norm.weight.mul_(norm.adapter_norm_scale.to(norm.weight.dtype))
                norm.adapter_norm_scale.fill_(1.0)

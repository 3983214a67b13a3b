"""Houlsby bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv 1902.00751).

In each adapted layer, a small bottleneck is inserted in series twice: on the output of the attention sublayer and
on the output of the feed-forward sublayer, before the residual addition (paper Fig. 2; adapter-hub's
``DoubleSeqBnConfig``):

    out + W_up f(W_down out + b_down) + b_up,    W_down (m, dim), W_up (dim, m)

f is SiLU (swish) by default, as in adapter-hub's Houlsby config. Init: W_down ~ N(0, 1e-2) truncated at two
standard deviations, zero biases (paper Sec. 3.6), and W_up zero (``zero_init``, the default: exactly the base model
at start) or, with ``zero_init=False``, W_up from the same truncated N(0, 1e-2): the paper's near-identity init (the
adapter adds a small random term at start). The nonlinearity between the projections keeps the adapter from folding
into the frozen weights: ``merge()`` leaves it as it is.

With images: the adapters take no prompt, so the image enters as the gated visual prompt of
model/methods/visual_prompt.py: in the top ``visual_layers`` layers, wv(I_p) of the visual vector, scaled per head by
a zero-init tanh gate, added to the attention heads before wo. Text-only items add nothing.

Tensor names: ``layers.N.adapter_attention.down`` / ``down_bias`` / ``up`` / ``up_bias`` (and the same under
``adapter_feed_forward``), plus ``layers.N.attention.adapter_visual_gate`` with a visual path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import MethodConfig, register_method
from model.methods.visual_prompt import GatedVisualPrompt, check_visual_layers

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import AttentionContext, Transformer, TransformerBlock

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
"""The nonlinearity f between the down- and up-projection, by its setting's name (gelu: the exact erf form)."""
SUBLAYERS = ("attention", "feed_forward")
"""The sublayers a bottleneck can follow (TransformerBlock's names, as ``Method.after_sublayer`` receives them)."""
NEAR_IDENTITY_STD = 1e-2
"""Houlsby et al. Sec. 3.6: adapter weights ~ N(0, 1e-2), truncated to two standard deviations."""


def check_bottleneck(config: MethodConfig) -> None:
    """ValueError naming the field unless ``bottleneck`` > 0, ``activation`` is known and ``n_layers`` is None or
    > 0 (the settings Houlsby and AdaMix share)."""
    name = type(config).__name__
    if config.bottleneck <= 0:
        raise ValueError(f"{name}.bottleneck must be positive, got {config.bottleneck}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"{name}.activation must be one of {', '.join(ACTIVATIONS)}, got {config.activation!r}")
    if config.n_layers is not None and config.n_layers <= 0:
        raise ValueError(f"{name}.n_layers must be positive or None (all layers), got {config.n_layers}")


def check_layers(config: MethodConfig, llama: LlamaConfig) -> None:
    """ValueError naming the field when ``n_layers`` or ``visual_layers`` exceed the model's layers."""
    if config.n_layers is not None and config.n_layers > llama.n_layers:
        raise ValueError(
            f"{type(config).__name__}.n_layers={config.n_layers} exceeds the model's n_layers={llama.n_layers}"
        )
    check_visual_layers(config, llama)


@dataclass
class HoulsbyConfig(MethodConfig):
    """Houlsby bottleneck adapters after the attention and the feed-forward sublayer (arXiv 1902.00751)."""

    bottleneck: int = 64
    """m: width of each adapter's bottleneck."""
    activation: Literal["relu", "gelu", "silu"] = "silu"
    """Nonlinearity between the down- and up-projection (silu = swish, adapter-hub's Houlsby default)."""
    zero_init: bool = True
    """Zero up-projection at init (exactly the base model); False: the paper's near-identity truncated N(0, 1e-2)."""
    n_layers: int | None = None
    """Adapted layers counted from the top of the stack; None: all layers."""
    visual_layers: int = 2
    """Top layers where the image enters (a per-head gated visual value; 0: images have no effect)."""

    def __post_init__(self) -> None:
        check_bottleneck(self)
        check_visual_layers(self)

    def check(self, llama: LlamaConfig) -> None:
        """The adapted layers must exist."""
        check_layers(self, llama)


class Bottleneck(nn.Module):
    """The weights of one bottleneck adapter, or of E stacked ones (``n_experts``, AdaMix): down (E, m, dim),
    down_bias (E, m), up (E, dim, m), up_bias (E, dim), without the E axis for one adapter."""

    def __init__(self, dim: int, width: int, n_experts: int | None = None) -> None:
        super().__init__()
        lead = () if n_experts is None else (n_experts,)
        self.down = nn.Parameter(torch.empty(*lead, width, dim))  # W_down: (E, m, dim) or (m, dim)
        self.down_bias = nn.Parameter(torch.empty(*lead, width))  # (E, m) or (m,)
        self.up = nn.Parameter(torch.empty(*lead, dim, width))  # W_up: (E, dim, m) or (dim, m)
        self.up_bias = nn.Parameter(torch.empty(*lead, dim))  # (E, dim) or (dim,)

    def reset_parameters(self, generator: torch.Generator | None, *, zero_up: bool) -> None:
        """Truncated N(0, 1e-2) W_down (and W_up unless ``zero_up``), zero biases; drawn on the CPU, down first."""
        s = NEAR_IDENTITY_STD
        with torch.no_grad():
            for t in (self.down,) if zero_up else (self.down, self.up):
                t.copy_(
                    nn.init.trunc_normal_(
                        torch.empty(t.shape, device="cpu"), std=s, a=-2 * s, b=2 * s, generator=generator
                    )
                )
            if zero_up:
                self.up.zero_()
            self.down_bias.zero_()
            self.up_bias.zero_()


def bottleneck(x: Tensor, down: Tensor, down_bias: Tensor, up: Tensor, up_bias: Tensor, activation: str) -> Tensor:
    """W_up f(W_down x + b_down) + b_up in x's dtype: x (B, T, dim), down (m, dim), up (dim, m) -> (B, T, dim)."""
    dt = x.dtype
    h = ACTIVATIONS[activation](F.linear(x, down.to(dt), down_bias.to(dt)))  # (B, T, m)
    return F.linear(h, up.to(dt), up_bias.to(dt))  # (B, T, dim)


@register_method("houlsby")
class Houlsby(GatedVisualPrompt):
    """A bottleneck adapter after each sublayer of the top ``config.n_layers`` layers."""

    config: HoulsbyConfig
    config_class = HoulsbyConfig
    fold_refusal = "its bottleneck adapters (down-projection, nonlinearity, up-projection) are modules a LLaMA lacks"

    def adapted(self, model: Transformer) -> list[TransformerBlock]:
        """The blocks that carry adapters, bottom to top."""
        return list(model.layers[self.llama.n_layers - (self.config.n_layers or self.llama.n_layers) :])

    def attach(self, model: Transformer) -> None:
        super().attach(model)  # the visual gates
        for block in self.adapted(model):
            for sublayer in SUBLAYERS:
                setattr(block, f"adapter_{sublayer}", Bottleneck(self.llama.dim, self.config.bottleneck))

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """See the module docstring; drawn bottom layer first, attention before feed-forward."""
        super().reset_parameters(model, generator)
        for block in self.adapted(model):
            for sublayer in SUBLAYERS:
                getattr(block, f"adapter_{sublayer}").reset_parameters(generator, zero_up=self.config.zero_init)

    def after_sublayer(self, block: TransformerBlock, sublayer: str, out: Tensor, ctx: AttentionContext) -> Tensor:
        """out + W_up f(W_down out + b_down) + b_up, in adapted layers."""
        adapter = getattr(block, f"adapter_{sublayer}", None)
        if adapter is None:
            return out
        return out + bottleneck(
            out, adapter.down, adapter.down_bias, adapter.up, adapter.up_bias, self.config.activation
        )

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        return (
            f"Houlsby adapters m={c.bottleneck} ({c.activation}) after attention and FFN of the top "
            f"{c.n_layers or n} of {n} layers; {self.describe_visual()}"
        )

    def group(self, name: str) -> str:
        for sublayer, kind in (("adapter_attention.", "attention adapters"), ("adapter_feed_forward.", "FFN adapters")):
            if sublayer in name:
                return kind
        return super().group(name)

"""Bottleneck adapters: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (arXiv 1902.00751), and the
two variants of the same family that settings select: Pfeiffer et al.'s (AdapterFusion, arXiv 2005.00247) single
adapter after the feed-forward sublayer, and He et al.'s parallel adapter ("Towards a Unified View of
Parameter-Efficient Transfer Learning", arXiv 2110.04366).

Each adapter is a bottleneck A(z) = W_up f(W_down z + b_down) + b_up, W_down (m, dim), W_up (dim, m), after the
chosen sublayers (``sublayers``) of the adapted layers, with x the sublayer's normalised input and out its output,
before the residual addition:

- ``placement="serial"`` (Houlsby; the default): out + s * A(out), inserted in series on the sublayer's output
  (paper Fig. 2; adapter-hub's ``DoubleSeqBnConfig``);
- ``placement="parallel"`` (He et al. Sec. 3, Fig. 1c): out + s * A(x), the adapter reading what the sublayer reads
  and added beside it; s = 4 in their paper and adapter-hub's ``ParBnConfig``.

s is ``scaling`` (None: 1 in series, 4 in parallel). Houlsby puts adapters after both sublayers (the default);
Pfeiffer after the feed-forward one only (``sublayers=[feed_forward]``; adapter-hub's ``SeqBnConfig``, ReLU,
reduction factor 16); He et al.'s best parallel adapter sits at the feed-forward sublayer with a wide bottleneck.
Provenance, read in adapter-hub/adapters (``methods/modeling.py``: ``Adapter``, ``ParallelAdapter``;
``configuration/adapter_config.py``; the LLaMA layer in ``models/llama/modeling_llama.py``; not installed here) and
in jxhe/unify-parameter-efficient-tuning (mBART's ``ffn_hi_input``). Differences, for a pre-norm LLaMA:
adapter-hub's Pfeiffer adapter reads the sum after the residual addition (x_res + out), a post-LN layout carried
over, where ours reads out as Houlsby's does; adapter-hub's parallel adapter reads the un-normalised residual stream,
He et al.'s later pre-LN setting (``hi_lnbefore=0``) and ours the normalised sublayer input.

f is SiLU (swish) by default, as in adapter-hub's Houlsby config. Init: W_down ~ N(0, 1e-2) truncated at two
standard deviations, zero biases (paper Sec. 3.6), and W_up zero (``zero_init``, the default: exactly the base model
at start, in either placement) or, with ``zero_init=False``, W_up from the same truncated N(0, 1e-2): the paper's
near-identity init (the adapter adds a small random term at start). (He et al. and adapter-hub's parallel adapter
draw W_down kaiming-uniform, W_up zero.) The nonlinearity between the projections keeps the adapter from folding
into the frozen weights: ``merge()`` leaves it as it is.

Layer norms (``train_norms``): Houlsby et al. train the layer normalisation parameters together with the adapters.
Here the two RMSNorms of every adapted layer and the final norm get a trainable copy of their weight used in its
place (model/methods/norms.py, the mechanism of LLaMA-Adapter V2's norm tuning): exactly the base at start.

With images: the adapters take no prompt, so the image enters as the gated visual prompt of
model/methods/visual_prompt.py: in the top ``visual_layers`` layers, wv(I_p) of the visual vector, scaled per head by
a zero-init tanh gate, added to the attention heads before wo. Text-only items add nothing.

Tensor names: ``layers.N.adapter_attention.down`` / ``down_bias`` / ``up`` / ``up_bias`` (and the same under
``adapter_feed_forward``), ``layers.N.attention_norm.adapter_norm_weight`` (``ffn_norm``, ``norm``) with
``train_norms``, plus ``layers.N.attention.adapter_visual_gate`` with a visual path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import MethodConfig, register_method
from model.methods.memory import MemoryTerms, StepShape
from model.methods.norms import attach_tuned_norms, reset_tuned_norms
from model.methods.visual_prompt import GatedVisualPrompt, check_visual_layers

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import AttentionContext, Transformer, TransformerBlock

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
"""The nonlinearity f between the down- and up-projection, by its setting's name (gelu: the exact erf form)."""
SUBLAYERS = ("attention", "feed_forward")
"""The sublayers a bottleneck can follow (TransformerBlock's names, as ``Method.after_sublayer`` receives them)."""
PARALLEL_SCALING = 4.0
"""He et al. (arXiv 2110.04366): the parallel adapter's output is scaled by s = 4."""
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


def check_sublayers(config: MethodConfig) -> None:
    """Make ``config.sublayers`` a tuple (a JSON or command-line list compares equal after a round trip); ValueError
    naming the field unless it holds distinct names among ``SUBLAYERS``."""
    name = type(config).__name__
    if isinstance(config.sublayers, str):
        raise ValueError(f"{name}.sublayers must be a list of names, got the string {config.sublayers!r}")
    config.sublayers = tuple(config.sublayers)
    names = config.sublayers
    if not names or len(set(names)) != len(names) or set(names) - {*SUBLAYERS}:
        raise ValueError(f"{name}.sublayers must be distinct names among {', '.join(SUBLAYERS)}, got {list(names)}")


def check_layers(config: MethodConfig, llama: LlamaConfig) -> None:
    """ValueError naming the field when ``n_layers`` or ``visual_layers`` exceed the model's layers."""
    if config.n_layers is not None and config.n_layers > llama.n_layers:
        raise ValueError(
            f"{type(config).__name__}.n_layers={config.n_layers} exceeds the model's n_layers={llama.n_layers}"
        )
    check_visual_layers(config, llama)


@dataclass
class HoulsbyConfig(MethodConfig):
    """Bottleneck adapters (Houlsby, arXiv 1902.00751): in series after the attention and the feed-forward sublayer
    by default; Pfeiffer's (only after feed_forward) and He et al.'s parallel adapter by setting."""

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
    sublayers: tuple[str, ...] = SUBLAYERS
    """Sublayers followed by an adapter: attention and feed_forward (Houlsby), feed_forward only (Pfeiffer)."""
    placement: Literal["serial", "parallel"] = "serial"
    """serial: the adapter reads the sublayer's output (Houlsby, Pfeiffer); parallel: its normalised input, the
    result added to its output (He et al.'s parallel adapter)."""
    scaling: float | None = None
    """s multiplying the adapter's output; None: 1 in series, 4 in parallel (He et al.)."""
    train_norms: bool = False
    """Also train the RMSNorms of the adapted layers and the final norm (Houlsby et al. train the layer norms)."""

    def __post_init__(self) -> None:
        check_bottleneck(self)
        check_visual_layers(self)
        check_sublayers(self)
        if self.placement not in ("serial", "parallel"):
            raise ValueError(f"HoulsbyConfig.placement must be 'serial' or 'parallel', got {self.placement!r}")
        if self.scaling is not None and (isinstance(self.scaling, bool) or not isinstance(self.scaling, int | float)):
            raise ValueError(f"HoulsbyConfig.scaling must be a number or None, got {self.scaling!r}")
        if not isinstance(self.train_norms, bool):
            raise ValueError(f"HoulsbyConfig.train_norms must be true or false, got {self.train_norms!r}")

    @property
    def scale(self) -> float:
        """s: ``scaling``, or its default for the placement."""
        if self.scaling is not None:
            return float(self.scaling)
        return PARALLEL_SCALING if self.placement == "parallel" else 1.0

    def check(self, llama: LlamaConfig) -> None:
        """The adapted layers must exist."""
        check_layers(self, llama)


class Bottleneck(nn.Module):
    """The weights of one bottleneck adapter, or of stacked experts (AdaMix: ``experts`` = (E_down, E_up), 1 for a
    shared projection): down (E_down, m, dim), down_bias (E_down, m), up (E_up, dim, m), up_bias (E_up, dim), without
    the expert axis for one adapter."""

    def __init__(self, dim: int, width: int, experts: tuple[int, int] | None = None) -> None:
        super().__init__()
        lead_down, lead_up = ((), ()) if experts is None else ((experts[0],), (experts[1],))
        self.down = nn.Parameter(torch.empty(*lead_down, width, dim))  # W_down: (E_down, m, dim) or (m, dim)
        self.down_bias = nn.Parameter(torch.empty(*lead_down, width))  # (E_down, m) or (m,)
        self.up = nn.Parameter(torch.empty(*lead_up, dim, width))  # W_up: (E_up, dim, m) or (dim, m)
        self.up_bias = nn.Parameter(torch.empty(*lead_up, dim))  # (E_up, dim) or (dim,)

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


def bottleneck_memory(
    llama: LlamaConfig, step: StepShape, sublayers: tuple[str, ...], width: int, n_layers: int | None, serial: bool
) -> MemoryTerms:
    """What bottleneck adapters of ``width`` after ``sublayers`` of the top ``n_layers`` layers (None: all) save in a
    training step: each one's input (in series the sublayer's output; in parallel the sublayer's own input, saved
    already), W_down's output and the nonlinearity's output; 16-bit: the autocast copies of W_down and W_up.
    (Trained norms, Houlsby's option, are not counted.)"""
    e, d, n = step.dtype_bytes, llama.dim, llama.n_layers
    return MemoryTerms(
        per_position=len(sublayers) * e * ((d if serial else 0) + 2 * width),
        first_layer=n - (n_layers or n),
        first_layer_saves="after_attention" if "attention" in sublayers else "method_only",
        per_layer=len(sublayers) * 2 * d * width * e if e != 4 else 0,
    )


@register_method("houlsby")
class Houlsby(GatedVisualPrompt):
    """A bottleneck adapter after each sublayer of the top ``config.n_layers`` layers."""

    config: HoulsbyConfig
    config_class = HoulsbyConfig
    fold_refusal = "its bottleneck adapters (down-projection, nonlinearity, up-projection) are modules a LLaMA lacks"

    def adapted(self, model: Transformer) -> list[TransformerBlock]:
        """The blocks that carry adapters, bottom to top."""
        return list(model.layers[self.llama.n_layers - (self.config.n_layers or self.llama.n_layers) :])

    def points(self, model: Transformer) -> list[tuple[TransformerBlock, str]]:
        """(block, sublayer) of every adapter, bottom layer first, in ``SUBLAYERS`` order within a layer."""
        return [(block, s) for block in self.adapted(model) for s in SUBLAYERS if s in self.config.sublayers]

    def tuned_norms(self, model: Transformer) -> list[nn.Module]:
        """With ``train_norms``: the attention and FFN norms of every adapted layer, then the final norm."""
        if not self.config.train_norms:
            return []
        return [norm for b in self.adapted(model) for norm in (b.attention_norm, b.ffn_norm)] + [model.norm]

    def attach(self, model: Transformer) -> None:
        super().attach(model)  # the visual gates
        for block, sublayer in self.points(model):
            setattr(block, f"adapter_{sublayer}", Bottleneck(self.llama.dim, self.config.bottleneck))
        attach_tuned_norms(self.tuned_norms(model), "weight")

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """See the module docstring; drawn bottom layer first, attention before feed-forward."""
        super().reset_parameters(model, generator)
        for block, sublayer in self.points(model):
            getattr(block, f"adapter_{sublayer}").reset_parameters(generator, zero_up=self.config.zero_init)
        reset_tuned_norms(self.tuned_norms(model), "weight")

    def after_sublayer(
        self, block: TransformerBlock, sublayer: str, x: Tensor, out: Tensor, ctx: AttentionContext
    ) -> Tensor:
        """out + s * A(out) in series, out + s * A(x) in parallel, in adapted layers."""
        adapter = getattr(block, f"adapter_{sublayer}", None)
        if adapter is None:
            return out
        z = x if self.config.placement == "parallel" else out
        delta = bottleneck(z, adapter.down, adapter.down_bias, adapter.up, adapter.up_bias, self.config.activation)
        scale = self.config.scale
        return out + (delta if scale == 1.0 else scale * delta)

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        c = self.config
        return bottleneck_memory(self.llama, step, c.sublayers, c.bottleneck, c.n_layers, c.placement == "serial")

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        where = " and ".join({"attention": "attention", "feed_forward": "FFN"}[s] for s in c.sublayers)
        scale = f", scaled by {c.scale:g}" if c.scale != 1.0 else ""
        norms = "; RMSNorms trained" if c.train_norms else ""
        return (
            f"bottleneck adapters m={c.bottleneck} ({c.activation}) {c.placement} to {where}{scale} of the top "
            f"{c.n_layers or n} of {n} layers{norms}; {self.describe_visual()}"
        )

    def group(self, name: str) -> str:
        for sublayer, kind in (("adapter_attention.", "attention adapters"), ("adapter_feed_forward.", "FFN adapters")):
            if sublayer in name:
                return kind
        if name.endswith(".adapter_norm_weight"):
            return "norm weights"
        return super().group(name)

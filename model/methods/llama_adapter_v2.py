"""LLaMA-Adapter V2 (arXiv 2304.15010): V1's gated adaption prompts plus bias, scale and norm tuning of the frozen
model, following the official code (OpenGVLab/LLaMA-Adapter, llama_adapter_v2_multimodal7b and ..._chat65b).

- Prompts and gates: exactly V1 (``llama_adapter``): K prompts in each of the top L layers through that layer's
  wk / wv, a separate softmax scaled by tanh(g_h) per head, in training and inference alike (the V2 code applies
  tanh in both). Default L = 31 of 32 layers (multimodal release, ``query_layer=31``).
- Bias and scale: each target linear (``bias_targets``) computes y = W (s ⊙ x) + b with a zero-init bias
  b (out,) and a unit-init scale s (in,). This is the official code's order (chat65b's
  ``forward_linear_with_scale_and_bias``: "a channel-wise scaling factor before the fully connected layers, a bias
  after"); the paper writes y = s ⊙ (W x + b). The multimodal release puts biases on wq, wo, w1, w2, w3 (not wk,
  wv, so the prompts' keys and values are V1's), our default; it has no scale, chat65b has one on every linear.
  Targets wk / wv also apply to the prompts' keys / values, as in chat65b. The frozen weight keeps its Meta name.
- Norms: the official code unfreezes every RMSNorm weight (both per layer and the final one). Our trainable tensors
  carry the ``adapter_`` prefix and the base stays frozen, so each RMSNorm gets a unit-init ``adapter_norm_scale``
  (dim,) multiplying its output through a forward hook (RMSNorm and its ``.weight`` unchanged): out = norm(x) * w * s.
  The same functions as a trained weight w' = w * s (what ``merge`` folds); the steps differ only in being relative
  to w (the gradient on s is w times that on w').
- Image: the visual vector I_p (B, dim) is added to prompts as in V1: ``visual_entry="late"`` adds it to the prompts
  of every adapted layer (what the released multimodal code does, issue #126), ``"early"`` only to those of the
  lowest ``early_layers`` adapted layers (the paper's early fusion: visual prompts in the first layer only).

With gates 0, biases 0 and scales 1 the model is exactly the base model. Everything trains at once (the release
trains prompts, gates and the visual path on captions, then only norms and biases on instructions). ``merge`` folds
the scales into the frozen weights (W' = W diag(s), w' = w * s) and resets them to 1; the biases stay (the Meta
base has no bias to take them).

Tensors: V1's ``layers.N.attention.adapter_prompt`` / ``adapter_gate``; ``adapter_bias`` (out,) and
``adapter_scale`` (in,) on each target linear (``layers.N.attention.wq``, ``layers.N.feed_forward.w1`` ...);
``adapter_norm_scale`` (dim,) on ``layers.N.attention_norm``, ``layers.N.ffn_norm`` and ``norm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import register_method
from model.methods.llama_adapter import AdapterConfig, LlamaAdapter
from model.quantize import refuse_quantized_merge

if TYPE_CHECKING:
    from model.llama import Transformer

LINEAR_OWNERS = dict.fromkeys(("wq", "wk", "wv", "wo"), "attention") | dict.fromkeys(("w1", "w2", "w3"), "feed_forward")
"""Each linear a bias and scale may target -> the sublayer of a TransformerBlock that holds it."""


@dataclass
class AdapterV2Config(AdapterConfig):
    """LLaMA-Adapter V2 (arXiv 2304.15010): V1's adaption prompts plus bias, scale and RMSNorm tuning."""

    n_layers: int = 31
    """L: number of adapted layers (prompts and gates), counted from the top (V2 multimodal release: 31 of 32)."""
    bias_targets: tuple[str, ...] = ("wq", "wo", "w1", "w2", "w3")
    """Linears of every layer given a zero-init bias and a unit-init input scale, among wq, wk, wv, wo, w1, w2, w3
    (default: the V2 multimodal release's biased linears)."""
    visual_entry: Literal["early", "late"] = "late"
    """Where the image enters: late adds it to the prompts of every adapted layer (the released V2 code, as V1);
    early only to the prompts of the lowest ``early_layers`` adapted layers (the V2 paper's early fusion)."""
    early_layers: int = 1
    """With visual_entry=early: how many of the lowest adapted layers receive the image (paper: the first)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bias_targets = tuple(self.bias_targets)  # a sidecar's JSON list compares equal after a round trip
        unknown = [t for t in self.bias_targets if t not in LINEAR_OWNERS]
        if unknown or len(set(self.bias_targets)) != len(self.bias_targets):
            raise ValueError(
                f"AdapterV2Config.bias_targets={list(self.bias_targets)}: "
                f"names among {', '.join(LINEAR_OWNERS)}, each at most once"
            )
        if self.visual_entry not in ("early", "late"):
            raise ValueError(f"AdapterV2Config.visual_entry must be 'early' or 'late', got {self.visual_entry!r}")
        if self.early_layers < 1:
            raise ValueError(f"AdapterV2Config.early_layers must be >= 1, got {self.early_layers}")
        if self.visual_entry == "early" and self.early_layers > self.n_layers:
            raise ValueError(
                f"AdapterV2Config.early_layers={self.early_layers} exceeds n_layers={self.n_layers} adapted layers"
            )


class BiasScaleLinear(nn.Linear):
    """A frozen bias-free linear with a trainable input scale and output bias: y = W (s ⊙ x) + b.

    ``weight`` is the wrapped linear's own parameter (frozen, under its Meta name); ``adapter_scale`` (in,) and
    ``adapter_bias`` (out,) are the trained tensors.
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the frozen weight is taken over, not allocated
        if linear.bias is not None:
            raise ValueError("LLaMA-Adapter V2 wraps bias-free linears only (Meta LLaMA has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # (out, in)
        self.register_parameter("bias", None)
        self.adapter_scale = nn.Parameter(torch.empty(self.in_features))  # (in,)
        self.adapter_bias = nn.Parameter(torch.empty(self.out_features))  # (out,)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x * self.adapter_scale.to(x.dtype), self.weight) + self.adapter_bias.to(x.dtype)


def scale_norm_output(norm: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """Forward hook of a tuned RMSNorm: its output times the trainable ``adapter_norm_scale`` (dim,)."""
    return out * norm.adapter_norm_scale.to(out.dtype)


@register_method("llama_adapter_v2")
class LlamaAdapterV2(LlamaAdapter):
    """V1's prompts and gates, a bias and scale on the target linears of every layer, a scale on every RMSNorm."""

    config: AdapterV2Config
    config_class = AdapterV2Config
    peft_type = None  # PEFT's ADAPTION_PROMPT directories are V1 adapters (``llama_adapter``)

    def tuned_linears(self, model: Transformer) -> list[BiasScaleLinear]:
        """The wrapped linears, layer by layer in ``bias_targets`` order."""
        return [getattr(getattr(b, LINEAR_OWNERS[t]), t) for b in model.layers for t in self.config.bias_targets]

    def tuned_norms(self, model: Transformer) -> list[nn.Module]:
        """Every RMSNorm: each layer's attention_norm and ffn_norm, then the final norm."""
        return [norm for b in model.layers for norm in (b.attention_norm, b.ffn_norm)] + [model.norm]

    def attach(self, model: Transformer) -> None:
        super().attach(model)
        for block in model.layers:
            for target in self.config.bias_targets:
                owner = getattr(block, LINEAR_OWNERS[target])
                setattr(owner, target, BiasScaleLinear(getattr(owner, target)))
        for norm in self.tuned_norms(model):
            norm.adapter_norm_scale = nn.Parameter(torch.empty(norm.weight.shape))  # (dim,)
            norm.register_forward_hook(scale_norm_output)

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """V1's prompts (N(0, 1)) and gates (0), then biases 0 and every scale 1: exactly the base model."""
        super().reset_parameters(model, generator)
        with torch.no_grad():
            for linear in self.tuned_linears(model):
                linear.adapter_bias.zero_()
                linear.adapter_scale.fill_(1.0)
            for norm in self.tuned_norms(model):
                norm.adapter_norm_scale.fill_(1.0)

    def layer_visual(self, layer_idx: int, visual: Tensor | None) -> Tensor | None:
        """late: every adapted layer's prompts get the image; early: the lowest ``early_layers`` only."""
        if self.config.visual_entry == "early" and layer_idx >= self.first_layer + self.config.early_layers:
            return None
        return visual

    def merge(self, model: Transformer) -> None:
        """Fold each scale into its frozen weight (W' = W diag(s); RMSNorm w' = w * s) and set it to 1. The biases
        stay: the bias-free base has nowhere to put them, and adding them costs nothing. Prompts and gates are
        extra keys and stay as they are. Refuses (ValueError) on a base whose weights are quantized or not floating
        point, before changing anything."""
        linears, norms = self.tuned_linears(model), self.tuned_norms(model)
        refuse_quantized_merge("LLaMA-Adapter V2 scales", (linear.weight for linear in linears))
        folded = {id(module.weight) for module in [*linears, *norms]}
        not_float = [
            f"{n} ({p.dtype})" for n, p in model.named_parameters() if id(p) in folded and not p.is_floating_point()
        ]
        if not_float:
            raise ValueError(
                f"cannot merge LLaMA-Adapter V2 scales into non-floating-point base weights: {', '.join(not_float[:3])}"
                f"{' ...' if len(not_float) > 3 else ''}; keep the adapter unmerged"
            )
        with torch.no_grad():
            for linear in linears:
                linear.weight.mul_(linear.adapter_scale.to(linear.weight.dtype)[None, :])  # (out, in) * (1, in)
                linear.adapter_scale.fill_(1.0)
            for norm in norms:
                norm.weight.mul_(norm.adapter_norm_scale.to(norm.weight.dtype))
                norm.adapter_norm_scale.fill_(1.0)

    def describe(self) -> str:
        c = self.config
        where = "every prompt" if c.visual_entry == "late" else f"the prompts of the lowest {c.early_layers} layers"
        targets = ", ".join(c.bias_targets) or "no linears"
        return f"{super().describe()}; bias and scale on {targets}; RMSNorm scales; image added to {where}"

    def group(self, name: str) -> str:
        kinds = {"adapter_bias": "biases", "adapter_scale": "scales", "adapter_norm_scale": "norm scales"}
        return kinds.get(name.rsplit(".", 1)[-1], super().group(name))

"""LLaMA-Adapter V2 (arXiv 2304.15010): V1's gated adaption prompts plus bias, scale, LoRA and norm tuning of the
frozen model, following the official code (OpenGVLab/LLaMA-Adapter, llama_adapter_v2_multimodal7b and ..._chat65b).

- Prompts and gates: exactly V1 (``llama_adapter``): K prompts in each of the top L layers through that layer's
  wk / wv, a separate softmax scaled by tanh(g_h) per head, in training and inference alike (the V2 code applies
  tanh in both). Default L = 31 of 32 layers (multimodal release, ``query_layer=31``). ``new_gate``: a second,
  unit-init scalar per adapted layer multiplying the prompt term (the LORA-BIAS releases).
- Bias and scale: each target linear (``bias_targets``) computes y = W (s ⊙ x) + b with a zero-init bias
  b (out,) and, with ``input_scales``, a unit-init scale s (in,). This is the official code's order (chat65b's
  ``forward_linear_with_scale_and_bias``: "a channel-wise scaling factor before the fully connected layers, a bias
  after"); the paper writes y = s ⊙ (W x + b). The multimodal release puts biases on wq, wo, w1, w2, w3 (not wk,
  wv, so the prompts' keys and values are V1's), our default, and has no scale; chat65b has one on every linear.
  Targets wk / wv also apply to the prompts' keys / values, as in chat65b. The frozen weight keeps its Meta name.
- LoRA (``lora_rank`` > 0, the LORA-BIAS releases: 16 on all seven linears of every layer): y += B (A x), unscaled
  (no alpha / rank factor), A (r, in) uniform like nn.Linear, B (out, r) zero. The prompts' keys and values go
  through the plain wk / wv without it, as in the release.
- Norms (``norm_tuning``): the official code unfreezes every RMSNorm weight (each layer's two and the final one).
  Our trainable tensors carry the ``adapter_`` prefix and the base stays frozen, so "weight" gives each RMSNorm an
  ``adapter_norm_weight`` (dim,) used in place of its weight, starting as a copy of it (the release's form);
  "scale" (the default, kept for the adapters trained with it) a unit-init ``adapter_norm_scale`` multiplying its
  output, out = norm(x) * w * s: the same functions as w' = w * s, with steps relative to w; "none" leaves the
  norms frozen (the release's caption phase). RMSNorm and its ``.weight`` stay unchanged (forward hooks).
- Image: the visual tokens I_p (B, Q, dim) are added to prompts as in V1 (Q = K: token i to prompt i, the release's
  query path): ``visual_entry="late"`` adds them to the prompts of every adapted layer (what the released
  multimodal code does, issue #126), ``"early"`` only to those of the lowest ``early_layers`` adapted layers (the
  paper's early fusion: visual prompts in the first layer only).

With gates 0, biases 0, scales 1, LoRA B 0 and norms as the base's, the model is exactly the base model. Everything
trains at once here (the release trains prompts, gates and the visual path on captions, then only norms and biases
on instructions). ``merge`` folds the scales and LoRA into the frozen weights (W' = W diag(s) + B A) and the norms
into theirs; the biases stay (the Meta base has no bias to take them).

Tensors: V1's ``layers.N.attention.adapter_prompt`` / ``adapter_gate``, ``adapter_new_gate`` (1,);
``adapter_bias`` (out,), ``adapter_scale`` (in,), ``adapter_lora_a`` / ``adapter_lora_b`` on each target linear
(``layers.N.attention.wq``, ``layers.N.feed_forward.w1`` ...); ``adapter_norm_scale`` or ``adapter_norm_weight``
(dim,) on ``layers.N.attention_norm``, ``layers.N.ffn_norm`` and ``norm``. The release's own file format is read
and written by model/checkpoint/release_v2.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import (
    LINEAR_SUBLAYER,
    WrappedLinear,
    base_weights,
    register_method,
    wrap_linears,
    wrapped_linears,
)
from model.methods.llama_adapter import LlamaAdapter, LlamaAdapterConfig
from model.methods.memory import SHARED_INPUT, MemoryTerms, StepShape, block_linear_shapes
from model.methods.norms import attach_tuned_norms, merge_tuned_norms, reset_tuned_norms
from model.quantize import refuse_quantized_merge

if TYPE_CHECKING:
    from model.llama import Transformer


@dataclass
class AdapterV2Config(LlamaAdapterConfig):
    """LLaMA-Adapter V2 (arXiv 2304.15010): V1's adaption prompts plus bias, scale, LoRA and RMSNorm tuning."""

    n_layers: int = 31
    """L: number of adapted layers (prompts and gates), counted from the top (V2 multimodal release: 31 of 32)."""
    bias_targets: tuple[str, ...] = ("wq", "wo", "w1", "w2", "w3")
    """Linears of every layer given a zero-init bias (and with input_scales a unit-init input scale), among wq, wk,
    wv, wo, w1, w2, w3 (default: the V2 multimodal release's biased linears)."""
    input_scales: bool = True
    """Give each bias target a trainable input scale too (chat65b); the multimodal release has none."""
    lora_rank: int = 0
    """Rank of an unscaled LoRA update on lora_targets of every layer (the LORA-BIAS releases: 16); 0: no LoRA."""
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    """Linears that get the LoRA update when lora_rank > 0 (the releases: all seven)."""
    new_gate: bool = False
    """A second, unit-init scalar gate per adapted layer on the prompt term (the LORA-BIAS releases)."""
    norm_tuning: Literal["scale", "weight", "none"] = "scale"
    """How the RMSNorms train: scale (a unit-init factor on their output), weight (a copy of their weight used in
    its place: the release's form) or none (frozen: the release's caption phase)."""
    visual_entry: Literal["early", "late"] = "late"
    """Where the image enters: late adds it to the prompts of every adapted layer (the released V2 code, as V1);
    early only to the prompts of the lowest ``early_layers`` adapted layers (the V2 paper's early fusion)."""
    early_layers: int = 1
    """With visual_entry=early: how many of the lowest adapted layers receive the image (paper: the first)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("bias_targets", "lora_targets"):
            targets = getattr(self, field)
            if isinstance(targets, str):
                raise ValueError(f"AdapterV2Config.{field} must be a list of linear names, got the string {targets!r}")
            targets = tuple(targets)  # a sidecar's JSON list compares equal after a round trip
            setattr(self, field, targets)
            unknown = [t for t in targets if t not in LINEAR_SUBLAYER]
            if unknown or len(set(targets)) != len(targets):
                raise ValueError(
                    f"AdapterV2Config.{field}={list(targets)}: names among {', '.join(LINEAR_SUBLAYER)}, "
                    "each at most once"
                )
        for field in ("input_scales", "new_gate"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"AdapterV2Config.{field} must be true or false, got {getattr(self, field)!r}")
        rank = self.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= 2**14:
            raise ValueError(f"AdapterV2Config.lora_rank must be an integer in 0..16384, got {rank!r}")
        if self.norm_tuning not in ("scale", "weight", "none"):
            raise ValueError(f"AdapterV2Config.norm_tuning must be scale, weight or none, got {self.norm_tuning!r}")
        if self.visual_entry not in ("early", "late"):
            raise ValueError(f"AdapterV2Config.visual_entry must be 'early' or 'late', got {self.visual_entry!r}")
        if self.early_layers < 1:
            raise ValueError(f"AdapterV2Config.early_layers must be >= 1, got {self.early_layers}")
        if self.visual_entry == "early" and self.early_layers > self.n_layers:
            raise ValueError(
                f"AdapterV2Config.early_layers={self.early_layers} exceeds n_layers={self.n_layers} adapted layers"
            )

    def wrapped(self) -> list[str]:
        """The linears of each layer that get a bias, a scale or LoRA, in wq .. w3 order."""
        lora = self.lora_targets if self.lora_rank else ()
        return [t for t in LINEAR_SUBLAYER if t in self.bias_targets or t in lora]


class V2Linear(WrappedLinear):
    """A frozen bias-free linear with V2's trainable parts: y = W (s ⊙ x) + b + B (A x), each part optional.

    ``weight`` is the wrapped linear's own parameter (frozen, under its Meta name); ``adapter_scale`` (in,),
    ``adapter_bias`` (out,), ``adapter_lora_a`` (r, in) and ``adapter_lora_b`` (out, r) are the trained tensors.
    """

    def __init__(self, linear: nn.Linear, *, bias: bool, scale: bool, lora_rank: int) -> None:
        super().__init__(linear)
        self.adapter_scale = nn.Parameter(torch.empty(self.in_features)) if scale else None  # (in,)
        self.adapter_bias = nn.Parameter(torch.empty(self.out_features)) if bias else None  # (out,)
        self.adapter_lora_a = nn.Parameter(torch.empty(lora_rank, self.in_features)) if lora_rank else None
        self.adapter_lora_b = nn.Parameter(torch.empty(self.out_features, lora_rank)) if lora_rank else None

    def without_lora(self, x: Tensor) -> Tensor:
        """W (s ⊙ x) + b: what the prompts' keys and values go through."""
        if self.adapter_scale is not None:
            x = x * self.adapter_scale.to(x.dtype)
        y = F.linear(x, self.weight)
        return y if self.adapter_bias is None else y + self.adapter_bias.to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.without_lora(x)
        if self.adapter_lora_a is None:
            return y
        a, b = self.adapter_lora_a, self.adapter_lora_b
        return y + F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype)  # + B (A x), unscaled

    def reset(self, generator: torch.Generator | None) -> None:
        """Bias 0, scale 1, LoRA A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's default, the release's), B 0."""
        if self.adapter_bias is not None:
            self.adapter_bias.zero_()
        if self.adapter_scale is not None:
            self.adapter_scale.fill_(1.0)
        if self.adapter_lora_a is not None:
            bound = 1 / math.sqrt(self.in_features)
            a = self.adapter_lora_a
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=generator))
            self.adapter_lora_b.zero_()

    def merge(self) -> None:
        """W (s ⊙ x) + B A x = (W diag(s) + B A) x: fold that into W, then s = 1 and B = 0 (the bias stays)."""
        with torch.no_grad():
            if self.adapter_scale is not None:
                self.weight.mul_(self.adapter_scale.to(self.weight.dtype)[None, :])  # (out, in) * (1, in)
                self.adapter_scale.fill_(1.0)
            if self.adapter_lora_a is not None:
                self.weight.add_((self.adapter_lora_b @ self.adapter_lora_a).to(self.weight.dtype))  # (out, in)
                self.adapter_lora_b.zero_()


@register_method("llama_adapter_v2")
class LlamaAdapterV2(LlamaAdapter):
    """V1's prompts and gates, a bias, scale and LoRA on the target linears of every layer, tuned RMSNorms."""

    config: AdapterV2Config
    config_class = AdapterV2Config
    peft_type = None  # PEFT's ADAPTION_PROMPT directories are V1 adapters (``llama_adapter``)

    def tuned_linears(self, model: Transformer) -> list[V2Linear]:
        """The wrapped linears, layer by layer in wq .. w3 order."""
        return wrapped_linears(model.layers, self.config.wrapped())

    def tuned_norms(self, model: Transformer) -> list[nn.Module]:
        """Every RMSNorm (each layer's attention_norm and ffn_norm, then the final norm); none with norm_tuning none."""
        if self.config.norm_tuning == "none":
            return []
        return [norm for b in model.layers for norm in (b.attention_norm, b.ffn_norm)] + [model.norm]

    def attach(self, model: Transformer) -> None:
        super().attach(model)
        c = self.config
        wrap_linears(model.layers, c.wrapped(), self.wrap)
        if c.new_gate:
            for attention in self.adapted(model):
                attention.adapter_new_gate = nn.Parameter(torch.empty(1))  # (1,): one scalar per layer
        if c.norm_tuning != "none":
            attach_tuned_norms(self.tuned_norms(model), c.norm_tuning)  # model/methods/norms.py

    def wrap(self, linear: nn.Linear, target: str) -> V2Linear:
        """The V2Linear put in place of ``linear`` (the target named ``target``): the parts its settings give it."""
        c = self.config
        biased = target in c.bias_targets
        rank = c.lora_rank if target in c.lora_targets else 0
        return V2Linear(linear, bias=biased, scale=biased and c.input_scales, lora_rank=rank)

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """V1's prompts (N(0, 1)) and gates (0), then biases 0, scales and new gates 1, LoRA A drawn and B 0, norm
        weights copied from the base: exactly the base model. LoRA A is drawn layer by layer after the prompts."""
        super().reset_parameters(model, generator)
        with torch.no_grad():
            for linear in self.tuned_linears(model):
                linear.reset(generator)
            if self.config.new_gate:
                for attention in self.adapted(model):
                    attention.adapter_new_gate.fill_(1.0)
        if self.config.norm_tuning != "none":
            reset_tuned_norms(self.tuned_norms(model), self.config.norm_tuning)

    def prompt_projection(self, linear: nn.Module, prompts: Tensor) -> Tensor:
        """wk / wv of the prompts: with their bias and scale (chat65b), never their LoRA (the release)."""
        return linear.without_lora(prompts) if isinstance(linear, V2Linear) else linear(prompts)

    def prompt_gate(self, attention: nn.Module) -> Tensor:
        """V1's per-head gate, times the layer's new gate when there is one."""
        gate = super().prompt_gate(attention)
        return gate * attention.adapter_new_gate if self.config.new_gate else gate

    def layer_visual(self, layer_idx: int, visual: Tensor | None) -> Tensor | None:
        """late: every adapted layer's prompts get the image; early: the lowest ``early_layers`` only."""
        if self.config.visual_entry == "early" and layer_idx >= self.first_layer + self.config.early_layers:
            return None
        return visual

    def merge(self, model: Transformer) -> None:
        """Fold scales and LoRA into the frozen weights (``V2Linear.merge``) and the norms into theirs (w' = w * s, or
        the tuned weight), leaving identity values behind. The biases stay: the bias-free base has nowhere to put
        them, and adding them costs nothing. Prompts and gates are extra keys and stay as they are. Refuses
        (ValueError) on a base whose weights are quantized or not floating point, before changing anything."""
        linears, norms = self.tuned_linears(model), self.tuned_norms(model)
        folding = [lin for lin in linears if lin.adapter_scale is not None or lin.adapter_lora_a is not None]
        what = "LLaMA-Adapter V2 scales" + (" and LoRA" if self.config.lora_rank else "")
        refuse_quantized_merge(what, (linear.weight for linear in folding))
        folded = {id(module.weight) for module in [*folding, *norms]}
        not_float = [
            f"{n} ({p.dtype})" for n, p in model.named_parameters() if id(p) in folded and not p.is_floating_point()
        ]
        if not_float:
            raise ValueError(
                f"cannot merge LLaMA-Adapter V2 into non-floating-point base weights: {', '.join(not_float[:3])}"
                f"{' ...' if len(not_float) > 3 else ''}; keep the adapter unmerged"
            )
        for linear in folding:
            linear.merge()
        if self.config.norm_tuning != "none":
            merge_tuned_norms(norms, self.config.norm_tuning)

    def folded_weights(self, model: Transformer) -> dict[str, Tensor]:
        """``merge``d weights plus each target linear's bias as ``<linear>.bias``, when the prompts add nothing
        (n_layers = 0, or every gate 0); prompts that act are refused: they are extra keys in a separate softmax."""
        gates = [a.adapter_gate for a in self.adapted(model)]
        if any(bool(g.any()) for g in gates):
            raise ValueError(
                f"{self.name} cannot be folded into plain LLaMA weights: its adaption prompts (n_layers="
                f"{self.config.n_layers}, gates not all 0) are extra keys and values in a separate gated softmax; "
                "only its biases, scales, LoRA and norms fold"
            )
        self.merge(model)
        weights = base_weights(model)
        targets = self.config.bias_targets
        names = [f"layers.{i}.{LINEAR_SUBLAYER[t]}.{t}.bias" for i in range(len(model.layers)) for t in targets]
        for name, linear in zip(names, wrapped_linears(model.layers, targets)):
            weights[name] = linear.adapter_bias.detach().to(linear.weight.dtype)  # (out,)
        return weights

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # Bias and scale on every layer's linears and norms: each scaled input is saved once (wq, wk, wv share one;
        # w1, w3 another), the norms' outputs too; every layer is in the graph.
        prompts, e, d = super().memory_terms(step), step.dtype_bytes, self.llama.dim
        saved = {SHARED_INPUT[t]: block_linear_shapes(self.llama)[t][1] for t in self.config.bias_targets}
        return dataclasses.replace(
            prompts,
            per_position=prompts.per_position + e * (sum(saved.values()) + 2 * d),
            first_layer=0,
            first_layer_saves="after_attention_norm",
        )

    def describe(self) -> str:
        c = self.config
        where = "every prompt" if c.visual_entry == "late" else f"the prompts of the lowest {c.early_layers} layers"
        targets = ", ".join(c.bias_targets) or "no linears"
        lora = f"; LoRA r={c.lora_rank} on {', '.join(c.lora_targets)}" if c.lora_rank else ""
        gate = "; new gates" if c.new_gate else ""
        return (
            f"{super().describe()}{gate}; bias{' and scale' if c.input_scales else ''} on {targets}{lora}; "
            f"RMSNorms tuned by {c.norm_tuning}; image added to {where}"
        )

    def group(self, name: str) -> str:
        kinds = {"adapter_bias": "biases", "adapter_scale": "scales", "adapter_norm_scale": "norm scales",
                 "adapter_norm_weight": "norm weights", "adapter_lora_a": "LoRA", "adapter_lora_b": "LoRA",
                 "adapter_new_gate": "new gates"}  # fmt: skip
        return kinds.get(name.rsplit(".", 1)[-1], super().group(name))

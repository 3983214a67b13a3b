"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, arXiv 2205.05638).

Learned vectors rescale activations elementwise: the keys and values of every attention layer (the outputs of wk
and wv) and the feed-forward's intermediate activation (the input of w2, i.e. silu(w1 x) * w3 x of SwiGLU):

    k = l_k * (W_k x),   v = l_v * (W_v x),   ffn(x) = W_2 (l_ff * (silu(W_1 x) * W_3 x))

Every vector starts at ones: exactly the base model at init. ``merge()`` scales W's rows (output vectors) or
columns (input vectors) and resets the vector to ones.

Provenance: installed PEFT 0.21 (``peft/tuners/ia3/layer.py`` Linear, ``utils/constants.py``): for LLaMA its
default targets are k_proj, v_proj, down_proj with down_proj as the feedforward module (its vector, shape (1, in),
scales the input; the others', shape (out, 1), the output); init ``constant_(1.0)``. The key rows of k_proj come in
HF's rotate-half order and are un-permuted on import like the base weights. One difference: PEFT multiplies a
16-bit input by the fp32 vector in fp32 then rounds; we round the vector to the input's dtype first (the same in
fp32).

With images: the gated visual prompt of model/methods/visual_prompt.py, as LoRA has it (the image's value goes
through the rescaled wv).

Tensor names: ``layers.N.attention.wk.adapter_ia3_scale`` (out,), ``layers.N.feed_forward.w2.adapter_ia3_scale``
(in,).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import LINEAR_SUBLAYER, MethodConfig, WrappedLinear, register_method
from model.methods.lora import WrappedLinears, check_mergeable, meta_rows, read_peft_linears
from model.methods.memory import MemoryTerms, StepShape, block_linear_shapes
from model.methods.visual_prompt import check_visual_layers

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import Transformer


@dataclass
class IA3Config(MethodConfig):
    """(IA)^3 (arXiv 2205.05638): learned vectors, ones at init, scaling the outputs of chosen linears (keys, values)
    and the inputs of the feed-forward ones (the FFN's intermediate activation)."""

    targets: tuple[str, ...] = ("wk", "wv", "w2")
    """Linears that get a learned vector, among wq, wk, wv, wo (attention) and w1, w2, w3 (feed-forward); PEFT's
    LLaMA default: k_proj, v_proj, down_proj."""
    feedforward: tuple[str, ...] = ("w2",)
    """Targets whose input is scaled instead of their output (PEFT's feedforward_modules; w2's input is the
    SwiGLU activation)."""
    n_layers: int | None = None
    """Adapted layers counted from the top of the stack; None: all layers."""
    visual_layers: int = 2
    """Top layers where the image enters (a per-head gated visual value; 0: images have no effect)."""

    def __post_init__(self) -> None:
        for field in ("targets", "feedforward"):
            value = getattr(self, field)
            if isinstance(value, str):
                raise ValueError(f"IA3Config.{field} must be a list of linear names, got the string {value!r}")
            setattr(self, field, tuple(value))  # a JSON list compares equal after a round trip
        if (
            not self.targets
            or any(t not in LINEAR_SUBLAYER for t in self.targets)
            or len(set(self.targets)) != len(self.targets)
        ):
            raise ValueError(
                f"IA3Config.targets must be distinct names among {', '.join(LINEAR_SUBLAYER)}, got {list(self.targets)}"
            )
        if not set(self.feedforward) <= set(self.targets) or len(set(self.feedforward)) != len(self.feedforward):
            raise ValueError(
                f"IA3Config.feedforward must be distinct names among the targets {list(self.targets)}, "
                f"got {list(self.feedforward)}"
            )
        if self.n_layers is not None and self.n_layers <= 0:
            raise ValueError(f"IA3Config.n_layers must be positive or None (all layers), got {self.n_layers}")
        check_visual_layers(self)

    def check(self, llama: LlamaConfig) -> None:
        """The adapted layers must exist."""
        if self.n_layers is not None and self.n_layers > llama.n_layers:
            raise ValueError(f"IA3Config.n_layers={self.n_layers} exceeds the model's n_layers={llama.n_layers}")
        check_visual_layers(self, llama)


class IA3Linear(WrappedLinear):
    """A frozen nn.Linear (``weight`` under its Meta name) whose input (``on_input``) or output is scaled
    elementwise by ``adapter_ia3_scale``: (in,) or (out,)."""

    def __init__(self, base: nn.Linear, on_input: bool) -> None:
        super().__init__(base)
        self.on_input = on_input
        self.adapter_ia3_scale = nn.Parameter(torch.empty(base.in_features if on_input else base.out_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.adapter_ia3_scale.to(x.dtype)
        if self.on_input:
            return F.linear(x * scale, self.weight)  # (..., in) scaled, then (..., out)
        return F.linear(x, self.weight) * scale  # (..., out)

    def merge(self) -> None:
        """W's columns (input vector) or rows (output vector) times the vector, then the vector = 1."""
        check_mergeable("(IA)^3", self.weight)
        with torch.no_grad():
            scale = self.adapter_ia3_scale.to(self.weight.dtype)
            self.weight.mul_(scale[None, :] if self.on_input else scale[:, None])
            self.adapter_ia3_scale.fill_(1.0)

    def extra_repr(self) -> str:
        scaled = "input" if self.on_input else "output"
        return f"in_features={self.in_features}, out_features={self.out_features}, scales the {scaled}"


_PEFT_REFUSED = {
    "fan_in_fan_out": "transposed (Conv1D, GPT-2-style) weights",
    "modules_to_save": "fully trained copies of modules",
}
"""PEFT IA3 settings whose adapters compute something else (which linears carry vectors is read from the weights)."""


@register_method("ia3")
class IA3(WrappedLinears):
    """Learned scales on ``config.targets`` of the top ``config.n_layers`` layers (all by default)."""

    config: IA3Config
    config_class = IA3Config
    peft_type = "IA3"
    label = "(IA)^3"

    def wrap(self, linear: nn.Linear, target: str) -> IA3Linear:
        return IA3Linear(linear, on_input=target in self.config.feedforward)

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """Every vector 1 (PEFT's init; nothing drawn): exactly the base model."""
        super().reset_parameters(model, generator)
        with torch.no_grad():
            for linear in self.adapted(model):
                linear.adapter_ia3_scale.fill_(1.0)

    @classmethod
    def from_peft(
        cls, peft_config: dict[str, Any], state: dict[str, Tensor], llama: LlamaConfig, source: Path
    ) -> tuple[IA3Config, dict[str, Tensor]]:
        """PEFT's IA3: which linears of which layers carry an ``ia3_l`` vector, and whether it scales the input
        (shape (1, in): PEFT's feedforward modules) or the output ((out, 1)), is read from the weights; the same in
        each of the top layers. Output vectors of q_proj / k_proj are un-permuted to Meta's row order."""
        for field, what in _PEFT_REFUSED.items():
            if peft_config.get(field):
                raise ValueError(f"{field}={peft_config[field]!r} ({what}) is not supported by (IA)^3 here")
        scaled: dict[str, set[str]] = {}  # target -> {"input", "output"} over the layers

        def convert(kind: str, target: str, value: Tensor) -> tuple[str, Tensor]:
            if value.ndim == 2 and value.shape[0] == 1:
                scaled.setdefault(target, set()).add("input")
                value = value[0]  # (in,)
            elif value.ndim == 2 and value.shape[1] == 1:
                scaled.setdefault(target, set()).add("output")
                value = meta_rows(value[:, 0], target, llama)  # (out,)
            return "adapter_ia3_scale", value  # another shape: the strict load names it

        tensors, n_layers, targets = read_peft_linears(
            state, llama, source, peft_config, "(IA)^3", "ia3_l", ("",), convert
        )
        mixed = sorted(t for t, kinds in scaled.items() if len(kinds) > 1)
        if mixed:
            raise ValueError(f"{source}: ia3_l of {mixed} scales the input in some layers and the output in others")
        config = IA3Config(
            targets=targets,
            feedforward=tuple(t for t in targets if scaled.get(t) == {"input"}),
            n_layers=n_layers,
            visual_layers=0,
        )
        return config, tensors

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # Each vector's multiplicand: the linear's output before its scale, or (feed-forward targets) its input
        # (w2's: the SwiGLU product); 16-bit: the vectors' autocast copies too.
        c, e = self.config, step.dtype_bytes
        shapes = block_linear_shapes(self.llama)
        sizes = sum(shapes[t][1] if t in c.feedforward else shapes[t][0] for t in c.targets)
        attention_targets = any(t in ("wq", "wk", "wv", "wo") for t in c.targets)
        return MemoryTerms(
            per_position=e * sizes,
            first_layer=self.llama.n_layers - (c.n_layers or self.llama.n_layers),
            first_layer_saves="after_attention_norm" if attention_targets else "after_attention",
            per_layer=e * sizes if e != 4 else 0,
        )

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        on = ", ".join(f"{t} ({'input' if t in c.feedforward else 'output'})" for t in c.targets)
        return f"(IA)^3 scales on {on} of the top {c.n_layers or n} of {n} layers; {self.describe_visual()}"

    def group(self, name: str) -> str:
        return "ia3 scales" if name.endswith(".adapter_ia3_scale") else super().group(name)

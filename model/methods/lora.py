"""LoRA: low-rank updates of frozen linear layers (Hu et al., arXiv 2106.09685), foldable into the weights.

Each target linear W (out, in) of the adapted layers becomes

    y = W x + scale * B (A dropout(x)),   scale = alpha / rank   (alpha / sqrt(rank) with ``rslora``)

with A (rank, in) Kaiming-uniform like nn.Linear and PEFT (bound 1 / sqrt(in)) and B (out, rank) zero: exactly the
base model at init. ``merge()`` adds scale * B A to W and zeroes B, for inference at the base model's cost.

With images: LoRA has no prompt, so the image enters as the small gated visual prompt of
model/methods/visual_prompt.py: in the top ``visual_layers`` layers, wv(I_p) of the visual vector, scaled per head
by a zero-init tanh gate, added to the attention heads before wo. It does not fold; text-only items add nothing.

Tensor names: ``layers.N.attention.wq.adapter_lora_a`` / ``adapter_lora_b`` (the frozen weight keeps its Meta
name ``layers.N.attention.wq.weight``), and ``layers.N.attention.adapter_visual_gate``.

DoRA (model/methods/dora.py) subclasses LoraLinear and Lora; (IA)^3 (model/methods/ia3.py) shares the PEFT import of
wrapped linears (``read_peft_linears``, ``meta_rows``) and ``check_mergeable``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import (
    LINEAR_SUBLAYER,
    MethodConfig,
    WrappedLinear,
    base_weights,
    register_method,
    wrap_linears,
    wrapped_linears,
)
from model.methods.memory import SHARED_INPUT, MemoryTerms, StepShape, block_linear_shapes
from model.methods.visual_prompt import GatedVisualPrompt, check_visual_layers
from model.quantize import refuse_quantized_merge

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import Transformer

MAX_ALPHA = 1e6
"""Largest LoRA alpha accepted (published adapters use 1..1024)."""


@dataclass
class LoraConfig(MethodConfig):
    """LoRA (arXiv 2106.09685): y = W x + (alpha / rank) * B A x on chosen linears, B zero at init."""

    rank: int = 8
    """r: inner width of the update B A."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the input of A while training."""
    targets: tuple[str, ...] = ("wq", "wv")
    """Linears that get an update, among wq, wk, wv, wo (attention) and w1, w2, w3 (feed-forward)."""
    n_layers: int | None = None
    """Adapted layers counted from the top of the stack; None: all layers."""
    rslora: bool = False
    """Scale by alpha / sqrt(rank) (rank-stabilised LoRA, arXiv 2312.03732; PEFT's use_rslora)."""
    visual_layers: int = 2
    """Top layers where the image enters (a per-head gated visual value; 0: images have no effect)."""

    def __post_init__(self) -> None:
        name = type(self).__name__  # DoraConfig shares these checks
        if isinstance(self.targets, str):
            raise ValueError(f"{name}.targets must be a list of linear names, got the string {self.targets!r}")
        self.targets = tuple(self.targets)  # a list from JSON or the command line compares equal after a round trip
        unknown = [t for t in self.targets if t not in LINEAR_SUBLAYER]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"{name}.targets must be distinct names among {', '.join(LINEAR_SUBLAYER)}, got {list(self.targets)}"
            )
        if self.rank <= 0:
            raise ValueError(f"{name}.rank must be positive, got {self.rank}")
        if not 0 < self.alpha <= MAX_ALPHA:  # also refuses NaN; 1e308 / rank would make every update inf
            raise ValueError(f"{name}.alpha must be in (0, {MAX_ALPHA:g}], got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout}")
        if self.n_layers is not None and self.n_layers <= 0:
            raise ValueError(f"{name}.n_layers must be positive or None (all layers), got {self.n_layers}")
        check_visual_layers(self)

    def check(self, llama: LlamaConfig) -> None:
        """The adapted layers must exist."""
        name = type(self).__name__
        if self.n_layers is not None and self.n_layers > llama.n_layers:
            raise ValueError(f"{name}.n_layers={self.n_layers} exceeds the model's n_layers={llama.n_layers}")
        check_visual_layers(self, llama)

    @property
    def scale(self) -> float:
        """The factor of B A."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def check_mergeable(what: str, weight: Tensor) -> None:
    """ValueError unless ``weight`` is a plain floating-point tensor ``what`` can be folded into."""
    refuse_quantized_merge(what, [weight])
    if not weight.dtype.is_floating_point:
        raise ValueError(f"cannot merge {what} into a {weight.dtype} weight: quantized or integer bases keep it apart")


class LoraLinear(WrappedLinear):
    """A frozen nn.Linear (``weight`` under its Meta name) plus the low-rank update scale * B A."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float) -> None:
        super().__init__(base)
        self.adapter_lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.adapter_lora_b = nn.Parameter(torch.empty(base.out_features, rank))  # (out, r)
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) + self.update(self.dropout(x)).to(x.dtype)

    def update(self, x: Tensor) -> Tensor:
        """scale * B (A x) of an input already through dropout, in the adapter's dtype: (..., in) -> (..., out)."""
        a, b = self.adapter_lora_a, self.adapter_lora_b
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.scale

    def delta(self) -> Tensor:
        """scale * B A (out, in) in the adapter's dtype (fp32): what the update adds to the weight."""
        return (self.adapter_lora_b @ self.adapter_lora_a) * self.scale

    def merge(self) -> None:
        """W += scale * B A, then B = 0: the same outputs from the frozen weight alone."""
        check_mergeable("LoRA", self.weight)
        with torch.no_grad():
            self.weight.add_(self.delta().to(self.weight.dtype))
            self.adapter_lora_b.zero_()

    def extra_repr(self) -> str:
        rank, in_features = self.adapter_lora_a.shape
        return f"in_features={in_features}, out_features={self.out_features}, rank={rank}, scale={self.scale:g}"


_PEFT_REFUSED = {  # PEFT settings whose adapters compute something else than W x + scale * B A x
    "lora_bias": "a trained bias on lora_B",
    "rank_pattern": "ranks that differ per module",
    "alpha_pattern": "alphas that differ per module",
    "modules_to_save": "fully trained copies of modules",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "LoRA on raw parameters",
    "use_qalora": "QA-LoRA's pooled input",
    "alora_invocation_tokens": "activated LoRA (token-dependent)",
    "fan_in_fan_out": "transposed (Conv1D, GPT-2-style) weights",
}
_PEFT_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")


def _check_peft_settings(peft_config: dict[str, Any], method: str = "plain LoRA") -> None:
    """ValueError naming the first PEFT setting whose adapter is not ``method`` on an unchanged base (DoRA: a
    ``use_dora`` adapter, imported by model/methods/dora.py, shares every other refusal)."""
    for field, what in _PEFT_REFUSED.items():
        if peft_config.get(field):
            raise ValueError(f"{field}={peft_config[field]!r} ({what}) is not supported; only {method} is")
    if peft_config.get("bias", "none") != "none":
        raise ValueError(f"bias={peft_config['bias']!r} (trained biases of the base linears) is not supported")
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_PEFT_BASE_CHANGING_INITS):
        raise ValueError(
            f"init_lora_weights={init!r}: this adapter belongs to a base PEFT changed at init; save it with "
            "path_initial_model_for_weight_conversion to get a plain LoRA adapter"
        )


_PEFT_NAMES = {"A.weight": "adapter_lora_a", "B.weight": "adapter_lora_b", "magnitude_vector": "adapter_dora_magnitude"}
"""PEFT's tensor of a LoRA / DoRA linear (after ``lora_``) -> ours."""


def meta_rows(value: Tensor, target: str, llama: LlamaConfig) -> Tensor:
    """A PEFT tensor with one row (or value) per output of ``target``, its rows in Meta's order: q_proj / k_proj
    rows un-permuted like the base weights (HF rows [evens, odds] per head). Any other shape is left for the strict
    load to name."""
    from model.checkpoint.hf import hf_rows_to_meta  # on use: model.checkpoint imports methods

    heads = {"wq": llama.n_heads, "wk": llama.n_kv_heads}.get(target)
    if heads is None or value.ndim not in (1, 2) or value.shape[0] != heads * llama.head_dim:
        return value
    return hf_rows_to_meta(value.reshape(value.shape[0], -1), heads).reshape(value.shape)


def read_peft_linears(
    state: dict[str, Tensor],
    llama: LlamaConfig,
    source: Path,
    peft_config: dict[str, Any],
    what: str,
    prefix: str,
    kinds: tuple[str, ...],
    convert: Callable[[str, str, Tensor], tuple[str, Tensor]],
) -> tuple[dict[str, Tensor], int | None, tuple[str, ...]]:
    """PEFT's tensors ``...layers.N.<module>.<prefix><kind>`` of the LLaMA linears (e.g. ``lora_`` + ``A.weight``) as
    ours, and (n_layers, targets) of the config: ``convert(kind, target, value)`` gives our tensor's name and value.
    The same linears must carry them in each of the top layers (PEFT's ``layers_to_transform`` may name others:
    refused). Other keys are passed through: the strict load names them. ``what`` names the method in messages."""
    from model.checkpoint.hf import hf_to_meta_name  # on use: model.checkpoint imports methods

    pattern = re.compile(rf"(?:.*\.)?(layers\.\d+\.\S+)\.{re.escape(prefix)}({'|'.join(map(re.escape, kinds))})")
    tensors: dict[str, Tensor] = {}
    found: set[tuple[int, str]] = set()
    for key, value in state.items():
        m = pattern.fullmatch(key)
        meta = hf_to_meta_name(f"model.{m.group(1)}.weight") if m else None  # layers.N.attention.wq.weight
        if meta is None or meta.split(".")[3] not in LINEAR_SUBLAYER:
            tensors[key] = value  # surfaces as an unexpected key in the strict check
            continue
        _, layer, _, target, _ = meta.split(".")
        name, value = convert(m.group(2), target, value.float())
        tensors[meta.removesuffix("weight") + name] = value
        found.add((int(layer), target))
    if not found:
        raise ValueError(f"{source}: no {' / '.join(prefix + k for k in kinds)} weights of a LLaMA linear")
    layers = sorted({layer for layer, _ in found})
    targets = tuple(t for t in LINEAR_SUBLAYER if t in {found_t for _, found_t in found})  # in our canonical order
    if layers != list(range(layers[0], llama.n_layers)):
        raise ValueError(
            f"{source}: {what} on layers {layers} (layers_to_transform={peft_config.get('layers_to_transform')}); "
            f"only the top layers of the {llama.n_layers} can be adapted"
        )
    missing = sorted({(layer, t) for layer in layers for t in targets} - found)
    if missing:
        raise ValueError(f"{source}: {what} on {list(targets)} but not on {missing} (layer, linear); need the same")
    return tensors, None if len(layers) == llama.n_layers else len(layers), targets


class WrappedLinears(GatedVisualPrompt):
    """A method that wraps ``config.targets`` of the top ``config.n_layers`` layers (all when None) in linears of
    its own that keep the frozen weight and fold into it with ``merge()`` (LoRA, DoRA, (IA)^3); the image enters
    through the gated visual prompt. Subclasses give ``wrap`` and ``label``."""

    label: ClassVar[str]
    """The method's name for people (messages, ``describe``)."""

    def wrap(self, linear: nn.Linear, target: str) -> nn.Linear:
        """The wrapped linear put in place of ``linear`` (the target named ``target``)."""
        raise NotImplementedError

    @property
    def first_layer(self) -> int:
        """The lowest wrapped layer: the top ``config.n_layers`` are wrapped (all when None)."""
        return self.llama.n_layers - (self.config.n_layers or self.llama.n_layers)

    def adapted(self, model: Transformer) -> list[Any]:
        """The wrapped linears, bottom layer first, in the order of ``config.targets`` within a layer."""
        return wrapped_linears(model.layers[self.first_layer :], self.config.targets)

    def attach(self, model: Transformer) -> None:
        super().attach(model)
        wrap_linears(model.layers[self.first_layer :], self.config.targets, self.wrap)

    def merge(self, model: Transformer) -> None:
        """Fold every wrapped linear into its frozen weight (its tensors at their identity values after). Exact up to
        rounding in the weights' dtype; the gated visual prompt depends on the image and stays as it is. Refuses a
        quantized base (ValueError) before changing anything."""
        refuse_quantized_merge(self.label, (linear.weight for linear in self.adapted(model)))
        for linear in self.adapted(model):
            linear.merge()


@register_method("lora")
class Lora(WrappedLinears):
    """Low-rank updates on ``config.targets`` of the top ``config.n_layers`` layers (all by default)."""

    config: LoraConfig
    config_class = LoraConfig
    peft_type = "LORA"
    linear_class: type[LoraLinear] = LoraLinear
    """The wrapped linear put in place of each target."""
    label = "LoRA"
    peft_kinds: tuple[str, ...] = ("A.weight", "B.weight")
    """PEFT's tensors of each linear ``from_peft`` reads (after ``lora_``)."""

    @classmethod
    def imports_peft(cls, peft_config: dict[str, Any]) -> bool:
        """PEFT's LORA without ``use_dora`` (DoRA directories are model/methods/dora.py's)."""
        return super().imports_peft(peft_config) and not peft_config.get("use_dora")

    def wrap(self, linear: nn.Linear, target: str) -> LoraLinear:
        c = self.config
        return self.linear_class(linear, c.rank, c.scale, c.dropout)

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), B = 0: exactly the base model.
        A is drawn bottom layer first, targets in config order."""
        super().reset_parameters(model, generator)
        with torch.no_grad():
            for linear in self.adapted(model):
                a = linear.adapter_lora_a
                bound = 1 / math.sqrt(a.shape[1])
                a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=generator))
                linear.adapter_lora_b.zero_()

    @classmethod
    def from_peft(
        cls, peft_config: dict[str, Any], state: dict[str, Tensor], llama: LlamaConfig, source: Path
    ) -> tuple[LoraConfig, dict[str, Tensor]]:
        """PEFT's LORA: which linears of which layers carry lora_A / lora_B is read from the weights; they must be
        the same linears in each of the top layers. lora_B rows of q_proj / k_proj are un-permuted to Meta's order
        like the base weights (HF rows [evens, odds] per head); so is DoRA's lora_magnitude_vector (one per row)."""
        _check_peft_settings(peft_config, f"plain {cls.label}")

        def convert(kind: str, target: str, value: Tensor) -> tuple[str, Tensor]:
            return _PEFT_NAMES[kind], value if kind == "A.weight" else meta_rows(value, target, llama)

        what, kinds = cls.label, cls.peft_kinds
        tensors, n_layers, targets = read_peft_linears(state, llama, source, peft_config, what, "lora_", kinds, convert)
        try:
            config = cls.config_class(
                rank=int(peft_config["r"]),
                alpha=float(peft_config["lora_alpha"]),
                dropout=float(peft_config.get("lora_dropout", 0.0)),
                targets=targets,
                n_layers=n_layers,
                rslora=bool(peft_config.get("use_rslora", False)),
                visual_layers=0,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid {what} config ({e!r})") from e
        return config, tensors

    @classmethod
    def to_peft(
        cls, config: LoraConfig, tensors: dict[str, Tensor], llama: LlamaConfig
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """PEFT's LORA (inverse of ``from_peft``): lora_A / lora_B under transformers' module names, lora_B rows of
        q_proj / k_proj in HF's rotate-half order; the top layers as ``layers_to_transform``."""
        from model.checkpoint.hf import meta_rows_to_hf, meta_to_hf_name, rope_permuted_heads

        first = llama.n_layers - (config.n_layers or llama.n_layers)
        state, rest = {}, dict(tensors)
        for layer in range(first, llama.n_layers):
            for target in config.targets:
                weight = f"layers.{layer}.{LINEAR_SUBLAYER[target]}.{target}.weight"
                module = meta_to_hf_name(weight).removesuffix(".weight")  # model.layers.N.self_attn.q_proj
                a = rest.pop(weight.removesuffix("weight") + "adapter_lora_a")  # (r, in)
                b = rest.pop(weight.removesuffix("weight") + "adapter_lora_b")  # (out, r)
                heads = rope_permuted_heads(weight, llama)
                state[f"base_model.model.{module}.lora_A.weight"] = a
                state[f"base_model.model.{module}.lora_B.weight"] = meta_rows_to_hf(b, heads) if heads else b
        if rest:
            raise ValueError(f"tensors PEFT's LoRA has no place for: {', '.join(sorted(rest))}")
        hf_names = [meta_to_hf_name(f"layers.0.{LINEAR_SUBLAYER[t]}.{t}.weight").split(".")[-2] for t in config.targets]
        fields = {
            "r": config.rank,
            "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,  # PEFT's int
            "lora_dropout": config.dropout,
            "target_modules": hf_names,
            "layers_to_transform": None if first == 0 else list(range(first, llama.n_layers)),
            "use_rslora": config.rslora,
            "bias": "none",
            "use_dora": False,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
        }
        return fields, state

    def folded_weights(self, model: Transformer) -> dict[str, Tensor]:
        """Every update merged into its frozen weight (``merge``); the gated visual prompt, if any, is left out:
        the export computes what the model computes on text."""
        self.merge(model)
        return base_weights(model)

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # LoRA's input (fp32: the input itself, shared; 16-bit: each target's autocast copy) and A's output; 16-bit:
        # the autocast copies of A and B too.
        c, e, d = self.config, step.dtype_bytes, self.llama.dim
        widths = {t: i for t, (o, i) in block_linear_shapes(self.llama).items() if t in c.targets}
        if e == 4:
            inputs = sum({SHARED_INPUT[t]: width for t, width in widths.items()}.values()) * 4
        else:
            inputs = sum(widths.values()) * e
        return MemoryTerms(
            per_position=inputs + len(c.targets) * c.rank * e,
            first_layer=self.llama.n_layers - (c.n_layers or self.llama.n_layers),
            first_layer_saves="after_attention_norm",
            per_layer=sum(c.rank * (width + d) for width in widths.values()) * e if e != 4 else 0,
        )

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        return (
            f"{self.label} r={c.rank} alpha={c.alpha:g} on {', '.join(c.targets)} of the top {c.n_layers or n} of {n} "
            f"layers; {self.describe_visual()}"
        )

    def group(self, name: str) -> str:
        kinds = {"adapter_lora_a": "lora A", "adapter_lora_b": "lora B"}
        return kinds.get(name.rsplit(".", 1)[-1], super().group(name))

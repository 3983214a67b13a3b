"""A small gated visual prompt: how the image enters methods that have no prompts of their own (LoRA, Houlsby,
AdaMix). Not a registered method: a ``Method`` base class the owning method subclasses.

In each of the top ``visual_layers`` layers, the visual tokens I_p (B, Q, dim) are Q extra keys / values through that
layer's frozen wk / wv (no RoPE: they have no position), attended in a separate softmax and scaled per head by a
zero-initialised gate, added to the head outputs before wo: LLaMA-Adapter's mechanism (arXiv 2303.16199, Sec. 3)
with the image tokens themselves as the prompts:

    out = softmax(q K_tok^T / sqrt(hd)) V_tok + tanh(g_h) * softmax(q K_I^T / sqrt(hd)) V_I,   then wo

With one token (the V1 global path) a softmax over a single key is exactly 1 for every query, so the term is
tanh(g_h) * v_I with v_I = wv(I_p): the key drops out and is not computed. With every gate at zero the model is
exactly the base model; items without an image (zero rows of I_p) add exactly nothing, since wv(0) = 0 (with Q
keys: a uniform softmax over zero values); a model without a visual path gets no gates at all (a text-only adapter
holds only its method's own tensors, and DDP sees no unused parameter).

Tensors: ``layers.N.attention.adapter_visual_gate`` (n_heads,), created only when the model has a visual path.

Use: subclass ``GatedVisualPrompt`` instead of ``Method``, give the config a ``visual_layers: int`` field (checked
by ``check_visual_layers`` in the config's ``__post_init__`` and ``check``), and call ``super()`` in the hooks the
method overrides among ``attach``, ``reset_parameters``, ``attention_output`` and ``group``::

    @register_method("houlsby")
    class Houlsby(GatedVisualPrompt):
        def attach(self, model):
            super().attach(model)  # the visual gates
            ...  # the method's own tensors

The base class owns ``sequence_state`` (the per-layer K_I / V_I); a method with per-sequence state of its own overrides
it, keeping the base's value inside its own and overriding ``visual_state`` to pick it out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import Method, MethodConfig, method_of

if TYPE_CHECKING:
    from model.config import LlamaConfig, ModelConfig
    from model.llama import Attention, AttentionContext, Transformer, TransformerBlock


def check_visual_layers(config: MethodConfig, llama: LlamaConfig | None = None) -> None:
    """ValueError naming ``<Config>.visual_layers`` unless 0 <= visual_layers (<= llama.n_layers when given)."""
    n = config.visual_layers
    name = f"{type(config).__name__}.visual_layers"
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    if llama is not None and n > llama.n_layers:
        raise ValueError(f"{name}={n} exceeds the model's n_layers={llama.n_layers}")


VisualKV = list[tuple[Tensor | None, Tensor] | None] | None
"""Per layer: the image's keys and values (B, nkv, Q, hd) through that layer's wk / wv, the keys None for Q = 1 (not
needed); None for layers without a gate; None without images."""


def visual_kv(attentions: list[Attention], visual: Tensor | None, n_layers: int) -> VisualKV:
    """The ``VisualKV`` of the visual tokens (B, Q, dim) in the gated ``attentions``."""
    if visual is None:
        return None
    state: list[tuple[Tensor | None, Tensor] | None] = [None] * n_layers
    for attention in attentions:
        x = visual.to(attention.wv.weight.dtype)  # (B, Q, dim)
        shape = (x.shape[0], x.shape[1], attention.n_kv_heads, attention.head_dim)
        # The frozen weights alone, whatever a method wraps them with (LoRA's update, V2's bias): the same path for
        # every method, and a zero row (an item without an image) gives exactly zero.
        v = F.linear(x, attention.wv.weight).view(shape).transpose(1, 2)  # (B, nkv, Q, hd)
        k = F.linear(x, attention.wk.weight).view(shape).transpose(1, 2) if x.shape[1] > 1 else None
        state[attention.layer_idx] = (k, v)
    return state


def gated_visual_term(attention: Attention, q: Tensor, state: VisualKV, dtype: torch.dtype) -> Tensor | None:
    """tanh(g_h) * softmax(q K_I^T / sqrt(hd)) V_I (B, nh, T or 1, hd) for the RoPE'd queries q (B, nh, T, hd): a
    separate softmax over the visual keys (over one key it is 1 for every query: the value itself); 0 where the
    layer has no gate or there is no image (None)."""
    kv = state[attention.layer_idx] if state is not None else None
    if kv is None:
        return None
    k, v = kv
    v = v.repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=1).to(dtype)  # (B, nh, Q, hd)
    if k is None:
        y_visual = v  # (B, nh, 1, hd), broadcast over T
    else:
        k = k.repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=1).to(q.dtype)
        y_visual = F.scaled_dot_product_attention(q, k, v.to(q.dtype)).to(dtype)  # (B, nh, T, hd)
    gate = attention.adapter_visual_gate.tanh().to(dtype)  # (nh,)
    return gate.view(1, -1, 1, 1) * y_visual


def add_visual_gates(attentions: list[Attention], n_heads: int) -> None:
    """One gate per head, ``adapter_visual_gate`` (nh,), on each of ``attentions`` (empty: ``reset_visual_gates``)."""
    for attention in attentions:
        attention.adapter_visual_gate = nn.Parameter(torch.empty(n_heads))  # (nh,)


def reset_visual_gates(attentions: list[Attention]) -> None:
    """Visual gates 0 (nothing drawn): the image adds nothing at start."""
    with torch.no_grad():
        for attention in attentions:
            attention.adapter_visual_gate.zero_()


class GatedVisualPrompt(Method):
    """A Method base whose image enters as one gated visual value per head in the top ``config.visual_layers``
    layers (see the module docstring)."""

    takes_visual = True

    def visual_prompted(self, model: Transformer) -> list[Attention]:
        """The attention modules that carry a visual gate, bottom to top (none without a visual path)."""
        if model.visual is None:
            return []
        return [block.attention for block in model.layers[self.llama.n_layers - self.config.visual_layers :]]

    def attach(self, model: Transformer) -> None:
        super().attach(model)
        add_visual_gates(self.visual_prompted(model), self.llama.n_heads)

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        super().reset_parameters(model, generator)
        reset_visual_gates(self.visual_prompted(model))

    def sequence_state(self, model: Transformer, visual: Tensor | None) -> VisualKV:
        return visual_kv(self.visual_prompted(model), visual, self.llama.n_layers)

    def visual_state(self, state: Any) -> list[tuple[Tensor | None, Tensor] | None] | None:
        """The base's ``sequence_state`` within the method's per-sequence state (a method that keeps more state
        overrides this to pick it out)."""
        return state

    def attention_output(self, attention: Attention, q: Tensor, y: Tensor, ctx: AttentionContext) -> Tensor:
        y = super().attention_output(attention, q, y, ctx)
        term = gated_visual_term(attention, q, self.visual_state(ctx.state), y.dtype)
        return y if term is None else y + term

    def group(self, name: str) -> str:
        return "visual gates" if name.endswith(".adapter_visual_gate") else super().group(name)

    def describe_visual(self) -> str:
        """The image's way in, for ``describe``."""
        return f"image: gated visual value in the top {self.config.visual_layers} layers"


# ---- the shared visual entry ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class SharedState:
    """``sequence_state`` with the shared visual entry: the method's own state (text-only) and the image's."""

    method: Any
    visual: VisualKV


class SharedVisualEntry(Method):
    """Mixin placed before a method's class (``with_shared_visual``) by ``VisualConfig.entry = "shared"``: the
    method is built and run text-only (its hooks never see the image) and the image enters as the gated visual
    prompt above, in the top ``VisualConfig.shared_layers`` layers, whatever the method. Every method then has
    the same image path, so a comparison of methods measures the methods, not their ways of taking the image.

    The method's tensors keep their names; the gates are ``layers.N.attention.adapter_visual_gate`` as above.
    """

    takes_visual = True

    def visual_prompted(self, model: Transformer) -> list[Attention]:
        """The attention modules that carry a visual gate, bottom to top (none without a visual path)."""
        if model.visual is None:
            return []
        return [block.attention for block in model.layers[self.llama.n_layers - model.config.visual.shared_layers :]]

    def attach(self, model: Transformer) -> None:
        super().attach(model)
        add_visual_gates(self.visual_prompted(model), self.llama.n_heads)
        self.n_gated = len(self.visual_prompted(model))

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        super().reset_parameters(model, generator)
        reset_visual_gates(self.visual_prompted(model))

    def sequence_state(self, model: Transformer, visual: Tensor | None) -> SharedState:
        own = super().sequence_state(model, None)
        return SharedState(own, visual_kv(self.visual_prompted(model), visual, self.llama.n_layers))

    def soft_tokens(self, model: Transformer, visual: Tensor | None) -> Tensor | None:
        return super().soft_tokens(model, None)

    def joint_kv(self, attention: Attention, ctx: AttentionContext) -> tuple[Tensor, Tensor] | None:
        return super().joint_kv(attention, _method_context(ctx))

    def attention_output(self, attention: Attention, q: Tensor, y: Tensor, ctx: AttentionContext) -> Tensor:
        y = super().attention_output(attention, q, y, _method_context(ctx))
        term = gated_visual_term(attention, q, ctx.state.visual if ctx.state is not None else None, y.dtype)
        return y if term is None else y + term

    def after_sublayer(
        self, block: TransformerBlock, sublayer: str, x: Tensor, out: Tensor, ctx: AttentionContext
    ) -> Tensor:
        return super().after_sublayer(block, sublayer, x, out, _method_context(ctx))

    def group(self, name: str) -> str:
        return "visual gates" if name.endswith(".adapter_visual_gate") else super().group(name)

    def describe(self) -> str:
        return f"{super().describe()}; image: the shared gated visual value in the top {self.n_gated} layers"


def _method_context(ctx: AttentionContext) -> AttentionContext:
    """``ctx`` as the method itself sees it: its own sequence state."""
    return dataclasses.replace(ctx, state=ctx.state.method if ctx.state is not None else None)


@functools.cache
def with_shared_visual(cls: type[Method]) -> type[Method]:
    """The method class ``cls`` with the shared visual entry (``SharedVisualEntry``); a method whose own image
    path is the gated visual prompt (LoRA, Houlsby, AdaMix) already has it and is returned as it is."""
    if issubclass(cls, GatedVisualPrompt):
        return cls
    return type(cls.__name__, (SharedVisualEntry, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def build_shared_visual(config: ModelConfig, llama: LlamaConfig) -> Method:
    """The method of ``config`` with the shared visual entry (``VisualConfig.entry = "shared"``)."""
    method, layers = config.method, config.visual.shared_layers
    if method is None:
        raise ValueError("VisualConfig.entry='shared' needs a PEFT method: the plain base model takes no image")
    if layers > llama.n_layers:
        raise ValueError(f"VisualConfig.shared_layers={layers} exceeds the model's n_layers={llama.n_layers}")
    cls = with_shared_visual(method_of(method))
    if issubclass(cls, GatedVisualPrompt) and method.visual_layers != layers:
        raise ValueError(
            f"{type(method).__name__}.visual_layers={method.visual_layers} differs from VisualConfig.shared_layers="
            f"{layers}: with the shared visual entry this method's own gated visual prompt is the shared one"
        )
    return cls(method, llama)

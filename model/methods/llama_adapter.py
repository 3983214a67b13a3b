"""LLaMA-Adapter V1: zero-init gated adaption prompts (arXiv 2303.16199, Sec. 3), with the multimodal visual prompt.

In the top L layers, the layer's K prompts go through that layer's own frozen wk / wv (no RoPE: prompts have no
position) and the query attends to them with a separate softmax, scaled per head by a zero-initialised gate:

    out = softmax(q K_tok^T / sqrt(hd)) V_tok + gate(g_h) * softmax(q K_p^T / sqrt(hd)) V_p,   then wo

gate(g) = tanh(g) as in the official training code (or g, as PEFT and the official inference code do). With every
gate at zero the model is exactly the base model. The visual tokens I_p (B, Q, dim) are added to the prompts of every
adapted layer: Q = 1 to every prompt (paper Sec. 3.3: P_l + Repeat(I_p)), Q = K token i to prompt i (the V2
release). Prompt K/V are computed once per sequence and kept in the cache.

Tensor names are those of the official layout ported to our modules: ``layers.N.attention.adapter_prompt`` (K, dim)
and ``layers.N.attention.adapter_gate`` (n_heads,), so every adapter file ever saved keeps loading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import Method, MethodConfig, check_tokens_fit, register_method
from model.methods.memory import MemoryTerms, StepShape

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import Attention, AttentionContext, Transformer


@dataclass
class LlamaAdapterConfig(MethodConfig):
    """Zero-init gated adaption prompts (LLaMA-Adapter V1, arXiv 2303.16199, Sec. 3)."""

    prompt_len: int = 10
    """K: learnable prompt vectors per adapted layer."""
    n_layers: int = 30
    """L: number of adapted layers, counted from the top of the stack (official V1: 30, all but the bottom
    UNADAPTED_LAYERS of LLaMA-7B's 32; ``default_config_for`` keeps that on a base of any depth)."""
    gate_fn: Literal["tanh", "raw"] = "tanh"
    """How the per-head gate scales the prompt attention: tanh(g) (official training code) or g (PEFT, lit-llama)."""

    def __post_init__(self) -> None:
        name = type(self).__name__  # subclasses (LLaMA-Adapter V2) share these checks
        if self.prompt_len <= 0:
            raise ValueError(f"{name}.prompt_len must be positive, got {self.prompt_len}")
        if self.n_layers < 0:
            raise ValueError(f"{name}.n_layers must be >= 0, got {self.n_layers}")
        if self.gate_fn not in ("tanh", "raw"):
            raise ValueError(f"{name}.gate_fn must be 'tanh' or 'raw', got {self.gate_fn!r}")

    def check(self, llama: LlamaConfig) -> None:
        """The adapted layers must exist."""
        if self.n_layers > llama.n_layers:
            name = type(self).__name__
            raise ValueError(f"{name}.n_layers={self.n_layers} exceeds the model's n_layers={llama.n_layers}")

    def check_visual_tokens(self, n_tokens: int) -> None:
        check_tokens_fit(self, "prompt_len", n_tokens)


UNADAPTED_LAYERS = 2
"""Bottom layers the official V1 adapter leaves without prompts (30 of LLaMA-7B's 32 adapted)."""


def default_config_for(llama: LlamaConfig) -> LlamaAdapterConfig:
    """The default adaption prompts on ``llama``: the default K on all but its bottom UNADAPTED_LAYERS layers (at
    least one), the official V1 proportions (7B: 30 of 32, 13B: 38 of 40)."""
    return LlamaAdapterConfig(n_layers=max(llama.n_layers - UNADAPTED_LAYERS, 1))


_PEFT_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.adaption_(prompt|gate)")


@register_method("llama_adapter")
class LlamaAdapter(Method):
    """Adaption prompts and per-head gates on the attention of the top ``config.n_layers`` layers."""

    config: LlamaAdapterConfig
    config_class = LlamaAdapterConfig
    takes_visual = True
    peft_type = "ADAPTION_PROMPT"
    fold_refusal = "its adaption prompts are extra keys and values in a separate gated softmax"

    @property
    def first_layer(self) -> int:
        """Index of the lowest adapted layer."""
        return self.llama.n_layers - self.config.n_layers

    def adapted(self, model: Transformer) -> list[Attention]:
        """The attention modules that carry prompts, bottom to top."""
        return [block.attention for block in model.layers[self.first_layer :]]

    def attach(self, model: Transformer) -> None:
        for attention in self.adapted(model):
            attention.adapter_prompt = nn.Parameter(torch.empty(self.config.prompt_len, self.llama.dim))  # (K, dim)
            attention.adapter_gate = nn.Parameter(torch.empty(self.llama.n_heads))  # (nh,): one gate per head

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """Prompts N(0, 1) like the official nn.Embedding, gates 0 (per head, official since fa65dbc): the model
        starts as exactly the base model. Prompts are drawn bottom layer first."""
        with torch.no_grad():
            for attention in self.adapted(model):
                attention.adapter_prompt.copy_(torch.randn(attention.adapter_prompt.shape, generator=generator))
                attention.adapter_gate.zero_()

    def sequence_state(self, model: Transformer, visual: Tensor | None) -> list[tuple[Tensor, Tensor] | None]:
        """Per layer: the prompts' keys and values (1 or B, nkv, K, hd), None for layers without prompts."""
        first = self.first_layer
        return [
            self.prompt_kv(block.attention, self.layer_visual(i, visual)) if i >= first else None
            for i, block in enumerate(model.layers)
        ]

    def layer_visual(self, layer_idx: int, visual: Tensor | None) -> Tensor | None:
        """The visual vector added to the prompts of adapted layer ``layer_idx``: every layer's (Sec. 3.3)."""
        return visual

    def prompt_kv(self, attention: Attention, visual: Tensor | None) -> tuple[Tensor, Tensor]:
        """One layer's prompt keys/values through its frozen wk / wv, no RoPE. visual: (B, 1 or K, dim) or None."""
        prompts = attention.adapter_prompt[None]  # (1, K, dim)
        if visual is not None:
            prompts = prompts + visual.to(prompts.dtype)  # (B, K, dim): P_l + I_p
        prompts = prompts.to(attention.wk.weight.dtype)
        b, k_len = prompts.shape[:2]
        shape = (b, k_len, attention.n_kv_heads, attention.head_dim)
        k = self.prompt_projection(attention.wk, prompts).view(shape).transpose(1, 2)  # (b, nkv, K, hd)
        v = self.prompt_projection(attention.wv, prompts).view(shape).transpose(1, 2)  # (b, nkv, K, hd)
        return k, v

    def prompt_projection(self, linear: nn.Module, prompts: Tensor) -> Tensor:
        """The frozen wk / wv applied to the prompts (V2 leaves out its LoRA here, as the release does)."""
        return linear(prompts)

    def attention_output(self, attention: Attention, q: Tensor, y: Tensor, ctx: AttentionContext) -> Tensor:
        """y + gate(g_h) * softmax(q K_p^T / sqrt(hd)) V_p: a separate softmax over the K prompts, visible to every
        query (no mask, no position)."""
        kv = ctx.state[attention.layer_idx]
        if kv is None:
            return y
        B = q.shape[0]
        ak, av = (t.expand(B, -1, -1, -1) for t in kv)  # (B, nkv, K, hd)
        gqa = attention.n_kv_heads != attention.n_heads
        y_prompts = F.scaled_dot_product_attention(q, ak, av, enable_gqa=gqa)  # (B, nh, T, hd)
        return y + self.prompt_gate(attention).to(y.dtype).view(1, -1, 1, 1) * y_prompts

    def prompt_gate(self, attention: Attention) -> Tensor:
        """The per-head factor (nh,) of this layer's prompt term: tanh(g) or g."""
        g = attention.adapter_gate
        return g.tanh() if self.config.gate_fn == "tanh" else g

    @classmethod
    def from_peft(
        cls, peft_config: dict[str, Any], state: dict[str, Tensor], llama: LlamaConfig, source: Path
    ) -> tuple[LlamaAdapterConfig, dict[str, Tensor]]:
        """PEFT's ADAPTION_PROMPT: one prompt (1, K, hidden) and ONE raw scalar gate (1,) per adapted layer,
        applied without tanh: imported as gate_fn="raw" with the scalar copied to every head (the same output)."""
        if peft_config.get("target_modules", "self_attn") != "self_attn":
            raise ValueError(f"target_modules={peft_config['target_modules']!r}; expected 'self_attn'")
        try:
            config = LlamaAdapterConfig(
                prompt_len=int(peft_config["adapter_len"]), n_layers=int(peft_config["adapter_layers"]), gate_fn="raw"
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid adaption-prompt config ({e!r})") from e
        if config.n_layers > llama.n_layers:
            raise ValueError(f"adapter_layers={config.n_layers} but the base has {llama.n_layers}")
        tensors: dict[str, Tensor] = {}
        for key, value in state.items():
            m = _PEFT_KEY.fullmatch(key)
            if m is None:
                tensors[key] = value  # surfaces as an unexpected key in the strict check
            elif m.group(2) == "prompt":
                tensors[f"layers.{m.group(1)}.attention.adapter_prompt"] = value.float().squeeze(0)  # (K, dim)
            elif value.numel() != 1:
                raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}; PEFT gates are (1,)")
            else:
                tensors[f"layers.{m.group(1)}.attention.adapter_gate"] = value.float().reshape(1).expand(llama.n_heads)
        return config, tensors

    @classmethod
    def to_peft(
        cls, config: LlamaAdapterConfig, tensors: dict[str, Tensor], llama: LlamaConfig
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """PEFT's ADAPTION_PROMPT: per adapted layer a prompt (1, K, dim) and one raw scalar gate (1,). PEFT applies
        the gate as it is, so a tanh gate is written as tanh(g); a layer whose heads have different gates has no
        PEFT form and is refused."""
        if config.n_layers == 0:
            raise ValueError("LlamaAdapterConfig.n_layers=0: PEFT's adaption prompt needs at least one adapted layer")
        first, state = llama.n_layers - config.n_layers, {}
        rest = dict(tensors)
        for layer in range(first, llama.n_layers):
            ours = f"layers.{layer}.attention."
            prompt, gate = rest.pop(ours + "adapter_prompt"), rest.pop(ours + "adapter_gate")  # (K, dim), (nh,)
            if not bool((gate == gate[0]).all()):
                raise ValueError(
                    f"{ours}adapter_gate differs across heads ({gate.tolist()}): PEFT's adaption prompt has one gate "
                    "per layer"
                )
            gate = gate[:1].tanh() if config.gate_fn == "tanh" else gate[:1]  # (1,): the factor PEFT applies
            peft = f"base_model.model.model.layers.{layer}.self_attn."
            state[peft + "adaption_prompt"], state[peft + "adaption_gate"] = prompt[None], gate
        if rest:
            raise ValueError(f"tensors PEFT's adaption prompt has no place for: {', '.join(sorted(rest))}")
        fields = {"adapter_len": config.prompt_len, "adapter_layers": config.n_layers, "target_modules": "self_attn"}
        return fields, state

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # The prompts' separate softmax: its output and log-sum-exp; the prompts' K / V (one row without images,
        # one per row with them).
        llama, e = self.llama, step.dtype_bytes
        kv = llama.n_kv_heads * llama.head_dim
        return MemoryTerms(
            per_position=e * llama.dim + 4 * llama.n_heads,
            first_layer=self.first_layer,
            first_layer_saves="q_and_after_attention",
            per_layer=2 * self.config.prompt_len * kv * e * (step.batch if step.images else 1),
        )

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        return f"adaption prompts K={c.prompt_len} on the top {c.n_layers} of {n} layers, {c.gate_fn} gate"

    def group(self, name: str) -> str:
        return {"adapter_prompt": "prompts", "adapter_gate": "gates"}.get(name.rsplit(".", 1)[-1], super().group(name))

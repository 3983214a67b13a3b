"""Prefix tuning (Li & Liang, arXiv 2101.00190): per adapted layer, P trainable key / value vectors joined to the
tokens' keys / values in the SAME softmax (hook ``joint_kv``), visible to every query.

Two forms, one per value of ``PrefixConfig.reparameterize``:

- training form (True, the default): the prefixes of every adapted layer come from one reparameterising MLP, as in
  the paper and PEFT's ``PrefixEncoder`` with ``prefix_projection``: an embedding E (P, dim) ->
  Linear(dim, mlp_hidden) -> tanh -> Linear(mlp_hidden, L * 2 * kv_dim), read as (P, L, [key, value], kv_dim).
  Tensors: ``method.adapter_embedding`` and ``method.adapter_mlp.{0,2}.{weight,bias}``.
- inference form (False): the prefixes themselves, ``layers.N.attention.adapter_prefix_key`` / ``_value``
  (P, kv_dim) each. ``merge()`` computes them once from the MLP and switches the model to this form (its config
  becomes ``reparameterize=False``). ``save_adapter`` always writes this form (``exported``: the MLP is never
  saved; a run resumes from the training form in its state.pt), with a sidecar that ``load_model`` builds the
  inference form from. PEFT imports land here too.

Positions as PEFT's: PEFT passes the prefixes as past key values, so the tokens' RoPE positions start at P and the
prefix keys are not rotated; here too (``position_offset`` = P, the keys joined without RoPE).

The image: the visual tokens I_p (B, Q, dim) go through each adapted layer's frozen wk / wv and are added to the
prefix keys / values of that layer (Q = 1: to every prefix; Q = P: token i to prefix i), the analogue of
LLaMA-Adapter's P_l + Repeat(I_p), applied after the projection. It enters after the MLP, so the merged form takes
images exactly as the training form does; items without an image (zero rows) add exactly nothing, since
wk(0) = wv(0) = 0.

Init (not identity: a prefix always takes a share of the softmax): E ~ N(0, 1) like nn.Embedding, each MLP linear
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) like nn.Linear (PEFT's defaults); fresh inference-form prefixes N(0, 1) (PEFT
without ``prefix_projection``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from model.methods.base import Method, MethodConfig, check_tokens_fit, register_method
from model.methods.memory import MemoryTerms, StepShape

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import Attention, AttentionContext, Transformer


@dataclass
class PrefixConfig(MethodConfig):
    """Key/value prefixes in the same softmax as the tokens (prefix tuning, arXiv 2101.00190)."""

    prefix_len: int = 10
    """P: key/value prefix vectors per adapted layer."""
    n_layers: int | None = None
    """Adapted layers, counted from the top of the stack; None: every layer (PEFT's choice)."""
    mlp_hidden: int = 128
    """Width of the reparameterising MLP (training form only). PEFT's default, the model width, is ~1.09B values
    at 7B; 128 is 34.4M."""
    reparameterize: bool = True
    """True: train the prefixes through the MLP; False: the prefixes themselves (what merge() leaves and saves)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.prefix_len <= 0:
            raise ValueError(f"{name}.prefix_len must be positive, got {self.prefix_len}")
        if self.n_layers is not None and self.n_layers <= 0:
            raise ValueError(f"{name}.n_layers must be positive or None (every layer), got {self.n_layers}")
        if self.mlp_hidden <= 0:
            raise ValueError(f"{name}.mlp_hidden must be positive, got {self.mlp_hidden}")

    def check(self, llama: LlamaConfig) -> None:
        """The adapted layers must exist; the tokens' positions start at P, which must leave room for tokens."""
        name = type(self).__name__
        if self.n_layers is not None and self.n_layers > llama.n_layers:
            raise ValueError(f"{name}.n_layers={self.n_layers} exceeds the model's n_layers={llama.n_layers}")
        if self.prefix_len >= llama.max_seq_len:
            raise ValueError(f"{name}.prefix_len={self.prefix_len} must be below max_seq_len={llama.max_seq_len}")

    def check_visual_tokens(self, n_tokens: int) -> None:
        check_tokens_fit(self, "prefix_len", n_tokens)


_PEFT_KEY = re.compile(r"(?:.*\.)?prompt_embeddings")


@register_method("prefix")
class PrefixTuning(Method):
    """Key/value prefixes on the attention of the top ``config.n_layers`` layers (all by default)."""

    config: PrefixConfig
    config_class = PrefixConfig
    takes_visual = True
    peft_type = "PREFIX_TUNING"
    fold_refusal = "its prefixes are extra keys and values in every adapted attention"

    @classmethod
    def imports_peft(cls, peft_config: dict[str, Any]) -> bool:
        """PEFT's PREFIX_TUNING with its projection (without it: ``ptuning_v2``, the same computation)."""
        return peft_config.get("peft_type") == cls.peft_type and peft_config.get("prefix_projection") is True

    @property
    def first_layer(self) -> int:
        """Index of the lowest adapted layer."""
        return self.llama.n_layers - (self.config.n_layers or self.llama.n_layers)

    @property
    def kv_dim(self) -> int:
        return self.llama.n_kv_heads * self.llama.head_dim

    def adapted(self, model: Transformer) -> list[Attention]:
        """The attention modules that carry prefixes, bottom to top."""
        return [block.attention for block in model.layers[self.first_layer :]]

    def attach(self, model: Transformer) -> None:
        c, n_adapted = self.config, len(self.adapted(model))
        if c.reparameterize:
            self.adapter_embedding = nn.Parameter(torch.empty(c.prefix_len, self.llama.dim))  # (P, dim)
            self.adapter_mlp = nn.Sequential(
                nn.Linear(self.llama.dim, c.mlp_hidden),
                nn.Tanh(),
                nn.Linear(c.mlp_hidden, n_adapted * 2 * self.kv_dim),
            )
        else:
            self.attach_prefixes(model)

    def attach_prefixes(self, model: Transformer) -> None:
        """The inference form's tensors: (P, kv_dim) keys and values on every adapted layer."""
        for attention in self.adapted(model):
            attention.adapter_prefix_key = nn.Parameter(torch.empty(self.config.prefix_len, self.kv_dim))
            attention.adapter_prefix_value = nn.Parameter(torch.empty(self.config.prefix_len, self.kv_dim))

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """E ~ N(0, 1), then each linear's weight and bias U(+-1/sqrt(fan_in)) (training form); or every layer's
        key then value prefix N(0, 1), bottom layer first (inference form)."""
        with torch.no_grad():
            if not self.config.reparameterize:
                for attention in self.adapted(model):
                    for p in (attention.adapter_prefix_key, attention.adapter_prefix_value):
                        p.copy_(torch.randn(p.shape, generator=generator))
                return
            self.adapter_embedding.copy_(torch.randn(self.adapter_embedding.shape, generator=generator))
            for linear in (self.adapter_mlp[0], self.adapter_mlp[2]):
                bound = 1 / math.sqrt(linear.in_features)
                for p in (linear.weight, linear.bias):
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))

    def prefixes(self, model: Transformer) -> list[tuple[Tensor, Tensor]]:
        """Per adapted layer, bottom to top: its (key, value) prefixes, (P, kv_dim) each, before the image is added;
        through the MLP in the training form."""
        if not self.config.reparameterize:
            return [(a.adapter_prefix_key, a.adapter_prefix_value) for a in self.adapted(model)]
        out = self.adapter_mlp(self.adapter_embedding)  # (P, L * 2 * kv_dim)
        out = out.view(self.config.prefix_len, -1, 2, self.kv_dim)  # (P, L, [key, value], kv_dim): PEFT's order
        return [(out[:, i, 0], out[:, i, 1]) for i in range(out.shape[1])]

    @property
    def position_offset(self) -> int:
        """P: the tokens' RoPE positions start after the prefixes, as under PEFT's past key values."""
        return self.config.prefix_len

    def sequence_state(self, model: Transformer, visual: Tensor | None) -> list[tuple[Tensor, Tensor] | None]:
        """Per layer: the prefix keys and values (1 or B, nkv, P, hd), None for layers without prefixes."""
        shape = (-1, self.config.prefix_len, self.llama.n_kv_heads, self.llama.head_dim)
        state: list[tuple[Tensor, Tensor] | None] = [None] * self.first_layer
        for attention, (k, v) in zip(self.adapted(model), self.prefixes(model)):
            k, v = k[None], v[None]  # (1, P, kv_dim)
            if visual is not None:  # I_p through the layer's frozen wk / wv, added to every prefix
                x = visual.to(attention.wk.weight.dtype)
                k = k + attention.wk(x).to(k.dtype)  # (B, P, kv_dim): (1, P) + (B, 1 or P)
                v = v + attention.wv(x).to(v.dtype)
            state.append((k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)))  # (b, nkv, P, hd) each
        return state

    def joint_kv(self, attention: Attention, ctx: AttentionContext) -> tuple[Tensor, Tensor] | None:
        return ctx.state[attention.layer_idx]

    def exported(self, model: Transformer) -> tuple[PrefixConfig, dict[str, Tensor]]:
        """The inference form: the computed prefixes of every adapted layer (the MLP is not saved), plus the other
        trainable tensors (the visual projection)."""
        if not self.config.reparameterize:
            return super().exported(model)
        tensors = {n: t for n, t in model.adapter_state_dict().items() if not n.startswith("method.")}
        for attention, (k, v) in zip(self.adapted(model), self.prefixes(model)):
            prefix = f"layers.{attention.layer_idx}.attention."
            tensors[prefix + "adapter_prefix_key"], tensors[prefix + "adapter_prefix_value"] = k, v
        return dataclasses.replace(self.config, reparameterize=False), tensors

    def merge(self, model: Transformer) -> None:
        """Compute the prefixes once and switch to the inference form: the MLP is dropped, the model's config
        becomes ``reparameterize=False``, outputs are unchanged."""
        if not self.config.reparameterize:
            return
        with torch.no_grad():
            computed = [(k.clone(), v.clone()) for k, v in self.prefixes(model)]
        del self.adapter_embedding, self.adapter_mlp
        self.config = dataclasses.replace(self.config, reparameterize=False)
        model.config = dataclasses.replace(model.config, method=self.config)
        self.attach_prefixes(model)
        with torch.no_grad():
            for attention, (k, v) in zip(self.adapted(model), computed):
                attention.adapter_prefix_key.copy_(k)
                attention.adapter_prefix_value.copy_(v)

    @classmethod
    def from_peft(
        cls, peft_config: dict[str, Any], state: dict[str, Tensor], llama: LlamaConfig, source: Path
    ) -> tuple[PrefixConfig, dict[str, Tensor]]:
        """PEFT's PREFIX_TUNING saves the final prefixes (its MLP, if any, is not saved): ``prompt_embeddings``
        (P, L * 2 * kv_dim), read as (P, L, [key, value], n_kv_heads, head_dim) over every layer. Keys are in
        transformers' per-head order (rotate-half halves) and become Meta's adjacent pairs, like k_proj rows."""
        from model.checkpoint.hf import hf_rows_to_meta  # model.checkpoint imports model.llama, which imports us

        kv_dim = llama.n_kv_heads * llama.head_dim
        expected = {"num_layers": llama.n_layers, "token_dim": kv_dim, "num_attention_heads": llama.n_kv_heads,
                    "num_transformer_submodules": 1}  # fmt: skip
        for field, value in expected.items():
            if peft_config.get(field, value) != value:
                raise ValueError(f"{field}={peft_config[field]!r}; this base needs {value}")
        try:
            config = cls.config_class(prefix_len=int(peft_config["num_virtual_tokens"]), reparameterize=False)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid prefix-tuning config ({e!r})") from e
        keys = [k for k in state if _PEFT_KEY.fullmatch(k)]
        if len(keys) != 1:
            raise ValueError(f"{source}: expected one 'prompt_embeddings' tensor, found keys {sorted(state)}")
        tensors = {k: v for k, v in state.items() if k != keys[0]}  # surface as unexpected keys in the strict check
        prompt = state[keys[0]].float()
        if prompt.shape != (config.prefix_len, llama.n_layers * 2 * kv_dim):
            raise ValueError(
                f"{source}: {keys[0]} has shape {tuple(prompt.shape)}; expected "
                f"({config.prefix_len}, {llama.n_layers * 2 * kv_dim}) = (P, n_layers * 2 * kv_dim)"
            )
        prompt = prompt.view(config.prefix_len, llama.n_layers, 2, kv_dim)  # (P, L, [key, value], kv_dim)
        for layer in range(llama.n_layers):
            key = hf_rows_to_meta(prompt[:, layer, 0].T, llama.n_kv_heads).T  # (P, kv_dim), Meta order per head
            tensors[f"layers.{layer}.attention.adapter_prefix_key"] = key.contiguous()
            tensors[f"layers.{layer}.attention.adapter_prefix_value"] = prompt[:, layer, 1].clone()
        return config, tensors

    @classmethod
    def to_peft(
        cls, config: PrefixConfig, tensors: dict[str, Tensor], llama: LlamaConfig
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """PEFT's PREFIX_TUNING without ``prefix_projection`` (inverse of ``from_peft``): the final prefixes as
        ``prompt_embeddings`` (P, n_layers * 2 * kv_dim), keys in transformers' per-head order. PEFT puts prefixes
        on every layer, so an adapter of the top layers only is refused; the inference form is expected
        (``exported`` gives it)."""
        from model.checkpoint.hf import meta_rows_to_hf

        if config.n_layers not in (None, llama.n_layers):
            raise ValueError(
                f"PrefixConfig.n_layers={config.n_layers}: PEFT's prefix tuning puts prefixes on every one of the "
                f"{llama.n_layers} layers"
            )
        if config.reparameterize:
            raise ValueError("PrefixConfig.reparameterize=True: export the computed prefixes (Method.exported)")
        rest, per_layer = dict(tensors), []
        for layer in range(llama.n_layers):
            key = rest.pop(f"layers.{layer}.attention.adapter_prefix_key")  # (P, kv_dim), Meta order per head
            value = rest.pop(f"layers.{layer}.attention.adapter_prefix_value")
            per_layer.append(torch.stack([meta_rows_to_hf(key.T, llama.n_kv_heads).T, value], dim=1))  # (P, 2, kv)
        if rest:
            raise ValueError(f"tensors PEFT's prefix tuning has no place for: {', '.join(sorted(rest))}")
        prompt = torch.stack(per_layer, dim=1)  # (P, L, [key, value], kv_dim): PEFT's order
        kv_dim = llama.n_kv_heads * llama.head_dim
        fields = {"num_virtual_tokens": config.prefix_len, "num_layers": llama.n_layers, "token_dim": kv_dim,
                  "num_attention_heads": llama.n_kv_heads, "num_transformer_submodules": 1,
                  "prefix_projection": False}  # fmt: skip
        return fields, {"prompt_embeddings": prompt.reshape(config.prefix_len, -1).contiguous()}

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # P prefix keys / values joined in front of the tokens' in every row; the padded (T, P + T) mask.
        p, e = self.config.prefix_len, step.dtype_bytes
        return MemoryTerms(
            first_layer=self.first_layer,
            first_layer_saves="after_attention_norm",
            per_row_per_layer=2 * p * self.kv_dim * e,
            per_layer=step.seq * (step.seq + p) * e,
        )

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        form = f"through an MLP of width {c.mlp_hidden}" if c.reparameterize else "merged"
        return f"key/value prefixes P={c.prefix_len} on the top {c.n_layers or n} of {n} layers, {form}"

    def group(self, name: str) -> str:
        part = next(p for p in name.split(".") if p.startswith("adapter_"))
        return {"adapter_embedding": "prefix embedding", "adapter_mlp": "prefix MLP"}.get(part, "prefixes")

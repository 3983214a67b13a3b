"""Typed configuration for the LLaMA backbone, the adaption prompts and the visual path.

One source of truth for every architectural setting. Field docstrings double as user documentation
(train.py turns them into ``--help``). Presets: ``tiny`` (tests and the embedded default), ``7B``, ``13B``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class LlamaConfig:
    """LLaMA architecture. Field names follow Meta's ``params.json`` where one exists."""

    dim: int = 4096
    """Model width (hidden size)."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_heads."""
    vocab_size: int = 32000
    """Vocabulary size; must equal the tokenizer's."""
    ffn_dim: int = 11008
    """Hidden size of the SwiGLU feed-forward block."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generation) the RoPE table and KV cache are sized for."""
    rope_scaling_factor: float | None = None
    """Llama 3.1-style RoPE frequency scaling (Hugging Face rope_type 'llama3'): long wavelengths are divided by
    this factor, short ones kept, the band between blended. None: plain RoPE (LLaMA 1 / 2)."""
    rope_low_freq_factor: float = 1.0
    """llama3 RoPE: wavelengths above rope_original_max_seq_len / this factor are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 RoPE: wavelengths below rope_original_max_seq_len / this factor are kept."""
    rope_original_max_seq_len: int = 8192
    """llama3 RoPE: the context length the model was pre-trained with before the extension."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling_factor is not None and not (
            self.rope_scaling_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        ):
            raise ValueError(
                f"llama3 RoPE scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, got "
                f"{self.rope_scaling_factor}, {self.rope_low_freq_factor}, {self.rope_high_freq_factor}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @staticmethod
    def meta_ffn_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
        """Meta's FFN size rule: 2/3 of 4*dim, optionally scaled, rounded up to ``multiple_of``."""
        hidden = int(2 * 4 * dim / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        return multiple_of * math.ceil(hidden / multiple_of)

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], vocab_size: int | None = None) -> LlamaConfig:
        """Build from a Meta ``params.json`` dict. ``vocab_size`` overrides the file's (-1 means "from tokenizer")."""
        vocab = params.get("vocab_size", -1)
        if vocab_size is not None:
            vocab = vocab_size
        if vocab is None or vocab <= 0:
            raise ValueError("params.json has vocab_size=-1; pass the vocabulary size (from the weights or tokenizer)")
        dim = params["dim"]
        return cls(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab,
            ffn_dim=cls.meta_ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-6),
            rope_theta=params.get("rope_theta", 10000.0),
            max_seq_len=params.get("max_seq_len", 2048),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face ``config.json`` dict of a ``LlamaForCausalLM``."""
        hidden = cfg["hidden_size"]
        n_heads = cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, hidden // n_heads):
            raise ValueError(f"config.json head_dim={cfg['head_dim']} differs from hidden_size/num_attention_heads")
        return cls(
            dim=hidden,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
        )


@dataclass
class AdapterConfig:
    """Zero-init gated adaption prompts (LLaMA-Adapter V1, arXiv 2303.16199, Sec. 3)."""

    prompt_len: int = 10
    """K: learnable prompt vectors per adapted layer."""
    n_layers: int = 30
    """L: number of adapted layers, counted from the top of the stack."""
    gate_fn: Literal["tanh", "raw"] = "tanh"
    """How the per-head gate scales the prompt attention: tanh(g) (official training code) or g (PEFT, lit-llama)."""

    def __post_init__(self) -> None:
        if self.prompt_len <= 0:
            raise ValueError(f"AdapterConfig.prompt_len must be positive, got {self.prompt_len}")
        if self.n_layers < 0:
            raise ValueError(f"AdapterConfig.n_layers must be >= 0, got {self.n_layers}")
        if self.gate_fn not in ("tanh", "raw"):
            raise ValueError(f"AdapterConfig.gate_fn must be 'tanh' or 'raw', got {self.gate_fn!r}")


@dataclass
class VisualConfig:
    """Frozen CLIP image tower and the trainable projection of its global features (paper V1, Sec. 3.3)."""

    clip_model: str = "ViT-L-14-quickgelu"
    """open_clip model name (weights from a local file only), or 'tiny' for the download-free test tower."""
    feature_layers: tuple[int, ...] | None = None
    """0-based ViT blocks whose class token joins the pooled output (multi-scale global features); None: the blocks
    at one and two thirds of the depth (ViT-L/14: 7, 15); (): the pooled output only (needed for non-ViT towers)."""
    proj_hidden: int = 80
    """Hidden width of the trainable MLP mapping CLIP features to one LLaMA-width vector (80: the paper's ~0.6M
    projection for 7B + ViT-L/14, 1.79M trainable values in all)."""

    def __post_init__(self) -> None:
        if self.feature_layers is not None:
            self.feature_layers = tuple(self.feature_layers)
            if any(not isinstance(i, int) or i < 0 for i in self.feature_layers):
                raise ValueError(f"VisualConfig.feature_layers must be block indices >= 0, got {self.feature_layers}")
            if len(set(self.feature_layers)) != len(self.feature_layers):
                raise ValueError(f"VisualConfig.feature_layers has repeated blocks: {self.feature_layers}")
        if not self.clip_model:
            raise ValueError("VisualConfig.clip_model must name an open_clip model or be 'tiny'")
        if self.proj_hidden <= 0:
            raise ValueError(f"VisualConfig.proj_hidden must be positive, got {self.proj_hidden}")


@dataclass
class ModelConfig:
    """The whole model: backbone, adapter and (optionally) the visual path."""

    llama: LlamaConfig = field(default_factory=LlamaConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    visual: VisualConfig | None = None

    def __post_init__(self) -> None:
        if self.adapter.n_layers > self.llama.n_layers:
            raise ValueError(
                f"AdapterConfig.n_layers={self.adapter.n_layers} exceeds the model's n_layers={self.llama.n_layers}"
            )

    @property
    def first_adapted_layer(self) -> int:
        return self.llama.n_layers - self.adapter.n_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        visual = d.get("visual")
        return cls(
            llama=LlamaConfig(**d["llama"]),
            adapter=AdapterConfig(**d.get("adapter", {})),
            visual=VisualConfig(**visual) if visual else None,
        )


PRESETS: dict[str, LlamaConfig] = {
    # Well under 1M parameters: for tests and the embedded default (vocab of the synthetic tokenizer).
    "tiny": LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=176, max_seq_len=512),
    "7B": LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_dim=11008),
    "13B": LlamaConfig(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, ffn_dim=13824),
}

ADAPTER_PRESETS: dict[str, AdapterConfig] = {
    "tiny": AdapterConfig(prompt_len=10, n_layers=3),
    "7B": AdapterConfig(prompt_len=10, n_layers=30),
    "13B": AdapterConfig(prompt_len=10, n_layers=38),
}


def preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a preset name (``tiny``, ``7B``, ``13B``), text-only."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(llama=dataclasses.replace(PRESETS[name]), adapter=dataclasses.replace(ADAPTER_PRESETS[name]))

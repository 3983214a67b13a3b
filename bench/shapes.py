"""Model shapes for the benchmarks and their Hugging Face twin configuration.

Both sides of every comparison are built from one ``LlamaConfig``: ours reads it back from the HF ``config.json``
that ``hf_config`` describes, so the two models have the same architecture by construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from model.config import PRESETS, LlamaConfig


@dataclass(frozen=True)
class BenchShape:
    """A LLaMA architecture plus the adapter placed on it (same setting on both sides)."""

    name: str
    llama: LlamaConfig
    adapter_layers: int
    """L: adapted layers counted from the top (PEFT's ``adapter_layers``)."""
    adapter_len: int = 10
    """K: prompts per adapted layer (PEFT's ``adapter_len``)."""


def _shapes() -> dict[str, BenchShape]:
    # ~100M parameters: 12 layers of width 640 (10 heads of 64), Meta's FFN rule (1792), LLaMA's 32000 vocabulary;
    # 61.0M in the blocks + 41.0M in embeddings and output head = 101.9M. Adapter on the top 10 of 12 layers, the
    # same proportion of untouched bottom layers as 7B (30 of 32).
    llama_100m = LlamaConfig(
        dim=640, n_layers=12, n_heads=10, vocab_size=32000, ffn_dim=LlamaConfig.meta_ffn_dim(640), max_seq_len=2048
    )
    return {
        "tiny": BenchShape("tiny", dataclasses.replace(PRESETS["tiny"]), adapter_layers=3),
        "100m": BenchShape("100m", llama_100m, adapter_layers=10),
        "7b": BenchShape("7b", dataclasses.replace(PRESETS["7B"]), adapter_layers=30),
    }


SHAPES: dict[str, BenchShape] = _shapes()


def get_shape(name: str) -> BenchShape:
    """The shape called ``name`` (tiny | 100m | 7b)."""
    if name not in SHAPES:
        raise ValueError(f"unknown --shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def hf_config_kwargs(llama: LlamaConfig) -> dict[str, Any]:
    """Keyword arguments of ``transformers.LlamaConfig`` for the same architecture (untied head, no biases)."""
    return {
        "hidden_size": llama.dim,
        "num_hidden_layers": llama.n_layers,
        "num_attention_heads": llama.n_heads,
        "num_key_value_heads": llama.n_kv_heads,
        "intermediate_size": llama.ffn_dim,
        "vocab_size": llama.vocab_size,
        "max_position_embeddings": llama.max_seq_len,
        "rms_norm_eps": llama.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": llama.rope_theta},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


def parameter_count(llama: LlamaConfig) -> int:
    """Frozen base parameters (embeddings and head included)."""
    kv_dim = llama.n_kv_heads * llama.head_dim
    per_layer = llama.dim * (2 * llama.dim + 2 * kv_dim) + 3 * llama.dim * llama.ffn_dim + 2 * llama.dim
    return llama.n_layers * per_layer + 2 * llama.vocab_size * llama.dim + llama.dim

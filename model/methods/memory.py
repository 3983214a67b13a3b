"""What a PEFT method adds to the memory of one training step, as ``Method.memory_terms`` describes it: the terms
``python -m bench memory`` (bench/memory_predict.py) adds to the backbone's own saved activations.

Bytes throughout, with e the compute dtype's bytes per value, d = dim, kv = n_kv_heads * head_dim, f = ffn_dim,
h = n_heads. A position is a token or a soft token of one row; a graph layer is one the backward pass runs through
(from the lowest layer a trainable tensor enters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from model.config import LlamaConfig

FirstLayerSaves = Literal["full", "after_attention_norm", "q_and_after_attention", "after_attention", "method_only"]
"""What the lowest graph layer saves of the block besides the method's own ``per_position`` bytes: all of it, what
comes after the attention norm, the queries and what comes after the attention, what comes after the attention,
or nothing (the method's tensor enters after the feed-forward sublayer)."""


@dataclass(frozen=True)
class StepShape:
    """The training step a method's memory terms are asked for (per device)."""

    batch: int
    """Rows of the micro-batch."""
    seq: int
    """Tokens per row (soft tokens not included)."""
    dtype_bytes: int
    """e: bytes per value of the compute dtype (4: float32, 2: bfloat16 / float16 under autocast)."""
    images: bool
    """Whether the step runs the visual path (per-row visual input)."""
    quantized: bool
    """Whether the frozen block linears are quantized (NF4 / int8: dequantized inside their matmul)."""


@dataclass(frozen=True)
class MemoryTerms:
    """What a method adds to the tensors autograd saves in one training step, and where its graph starts."""

    per_position: int = 0
    """Bytes saved per position in every graph layer."""
    first_layer: int = 0
    """The lowest layer in the backward graph (0: every layer)."""
    first_layer_saves: FirstLayerSaves = "full"
    """What that lowest layer saves of the block (``FirstLayerSaves``)."""
    per_row_per_layer: int = 0
    """Bytes saved per row in every graph layer that do not grow with the sequence (prefix keys / values)."""
    per_layer: int = 0
    """Bytes saved once per graph layer (prompt keys / values, an attention mask, 16-bit copies of the layer's
    trainable tensors)."""
    workspace: int = 0
    """Transient bytes of the method's widest operation in a forward (DoRA's row norms), beside the weights."""


def block_linear_shapes(llama: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of a TransformerBlock, under its Meta name."""
    kv = llama.n_kv_heads * llama.head_dim
    return {
        "wq": (llama.dim, llama.dim),
        "wk": (kv, llama.dim),
        "wv": (kv, llama.dim),
        "wo": (llama.dim, llama.dim),
        "w1": (llama.ffn_dim, llama.dim),
        "w2": (llama.dim, llama.ffn_dim),
        "w3": (llama.ffn_dim, llama.dim),
    }


SHARED_INPUT = {
    "wq": "attention",
    "wk": "attention",
    "wv": "attention",
    "wo": "wo",
    "w1": "ffn",
    "w2": "w2",
    "w3": "ffn",
}
"""The tensor each block linear reads: wq, wk and wv the attention norm's output, w1 and w3 the feed-forward
norm's; a method saving the linears' inputs saves each shared one once."""

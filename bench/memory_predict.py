"""The prediction of ``python -m bench memory``: peak memory per device of one training step of a set-up.

Every count comes from the real model built on the meta device (no memory, no weights): the frozen values by kind,
the trainable ones (``count_trainable``), the method's settings. The bytes per value follow the set-up:

- weights: the frozen base in ``--dtype``; with ``--quantize`` the block linears in torchao's exact layouts
  (``quantized_bytes``: NF4 ~4.13 bits per value with its double-quantized block scales, int8 8 bits plus a scale and
  zero point per output row), embeddings, norms and the output head kept in ``--dtype`` (model/quantize.py), plus one
  block linear dequantized inside its matmul; the CLIP tower with ``--images``.
- trainable: fp32 value + gradient + AdamW's two moments = 16 bytes per value (+ 4 for DDP's gradient buckets).
- activations: ``activation_bytes``, the tensors autograd saves, from a per-position per-layer formula derived from
  the modules (see there) and checked against the tensors autograd really saves (tests/test_bench_memory.py).
- logits: ``logits_bytes``, the loss of model/loss.py over all targets at once or ``--loss-chunk`` at a time.
- block backward: what one block's backward pass holds (its gradients; with activation checkpointing its recomputed
  activations too) beyond the loss's peak, which is over by then: the peak is the larger of the two.
- the method's own: what its ``Method.memory_terms`` says it adds (model/methods/memory.py), e.g. DoRA's row norms
  of W + s B A, an fp32 (out, in) sum per target linear in every forward (the widest target).
- fsdp over N devices: weights and trainable state divided by N, plus what FSDP2 keeps unsharded (the root's
  embeddings, final norm and head, and two blocks: the one computing and the one prefetched).

``--measure`` builds the same set-up with random weights and runs real training steps beside the prediction
(bench/memory_measure.py). The prediction assumes every position has a target (the worst case of the loss).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bench.memory_setup import DTYPE_BYTES, Setup, meta_model
from model.llama import Transformer, count_trainable
from model.methods.memory import MemoryTerms, StepShape, block_linear_shapes
from model.quantize import BASE_LINEARS, NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE


# ---- weights and trainable state ------------------------------------------------------------------------------------
def quantized_bytes(kind: str, shape: tuple[int, int], dtype_bytes: int) -> int:
    """Bytes torchao stores for one (out, in) weight quantized as model/quantize.py does it.

    nf4: 4-bit codes (n / 2 bytes), one int8 absmax per 64 values, one scale in the weight's dtype per group of
    absmaxes (256, or the gcd for small matrices), a mean and the 16-entry code table in the dtype.
    int8: one byte per value, an fp32 scale and an int8 zero point per output row."""
    out_features, in_features = shape
    n = out_features * in_features
    if kind == "int8":
        return n + out_features * (4 + 1)
    blocks = n // NF4_BLOCK_SIZE
    scaler_groups = blocks // math.gcd(blocks, NF4_SCALER_BLOCK_SIZE)
    return n // 2 + blocks + (scaler_groups + 1 + 16) * dtype_bytes


def parameter_counts(model: Transformer) -> dict[str, int]:
    """Values of the meta model by kind: block linears (quantizable), the rest of the frozen base (embeddings, head,
    norms), the CLIP tower, and the trainable tensors (count_trainable)."""
    linear_names = {n for names in BASE_LINEARS.values() for n in names}
    counts = {"block_linears": 0, "other_frozen": 0, "visual_tower": 0, "trainable": count_trainable(model)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        parts = name.split(".")
        if name.startswith("visual."):
            counts["visual_tower"] += p.numel()
        elif parts[0] == "layers" and parts[-1] == "weight" and parts[-2] in linear_names:
            counts["block_linears"] += p.numel()
        else:
            counts["other_frozen"] += p.numel()
    return counts


def weight_bytes(setup: Setup, counts: dict[str, int]) -> tuple[int, int]:
    """(frozen weight bytes of the whole model, bytes of one block's frozen linears), before any sharding."""
    llama, e = setup.llama, DTYPE_BYTES[setup.dtype]
    shapes = block_linear_shapes(llama)
    assert set(shapes) == {n for names in BASE_LINEARS.values() for n in names}  # what model/quantize.py quantizes
    if setup.quantize == "none":
        block = sum(o * i for o, i in shapes.values()) * e
    else:
        block = sum(quantized_bytes(setup.quantize, s, e) for s in shapes.values())
    assert counts["block_linears"] == llama.n_layers * sum(o * i for o, i in shapes.values())
    return llama.n_layers * block + (counts["other_frozen"] + counts["visual_tower"]) * e, block


# ---- activations and logits -----------------------------------------------------------------------------------------
def activation_bytes(model: Transformer, setup: Setup) -> dict[str, int]:
    """Bytes of the tensors autograd saves in the forward pass (the peak is reached as the backward pass starts).

    Per position (token or soft token) and per layer in the graph, with e the compute dtype's bytes, d = dim,
    kv = n_kv_heads * head_dim, f = ffn_dim, h = n_heads (model/llama.py's modules):

        block = 2 (4d + 4)              both RMSNorms: the fp32 copy of the input and 1 / rms
              + e (2d + 2kv) + 4h       attention: q, k, v, the output and the fp32 log-sum-exp of the fused kernel
              + 3 e f                   SwiGLU: w1's output, its SiLU, w3's output
              + the method's own        (``method_memory``: e.g. LLaMA-Adapter's prompt attention e d + 4h)

    The frozen linears save nothing (their weights need no gradient, their inputs are saved by the norms or not at
    all). A layer is in the graph from the lowest one a trainable tensor enters (LLaMA-Adapter 7B: 30 of 32); that
    lowest layer saves only what comes after the trainable tensor (``MemoryTerms.first_layer_saves``). Once per
    position: RoPE's cos / sin tables (4 head_dim); the final norm per target position. With activation
    checkpointing a graph layer keeps only its input (e d per position).

    Quantized bases save nothing extra: NF4's ``linear_nf4`` and int8's ``_Int8Linear`` (model/quantize.py) are
    autograd functions that keep the quantized weight (already counted in the weights) and dequantize it again in
    the backward pass. (torchao 0.18's own ``Int8Tensor`` linear runs above autograd and would keep a copy of every
    graph layer's block linears in the matmul's dtype, e bytes per value: 7B bf16 batch 4 x 512, 26.3 GiB in all.)

    ``backward_block``: what the backward pass of one block adds while it runs, after the loss's own peak is gone:
    its gradients, e (2f + 2d) per position, and with activation checkpointing its recomputed activations.
    """
    llama, e = setup.llama, DTYPE_BYTES[setup.dtype]
    d, f, h = llama.dim, llama.ffn_dim, llama.n_heads
    kv = llama.n_kv_heads * llama.head_dim
    terms = method_memory(model, setup)
    positions = setup.batch * (setup.seq + model.method.n_soft_tokens)
    norm, attention, ffn = 4 * d + 4, e * (2 * d + 2 * kv) + 4 * h, 3 * e * f
    full = 2 * norm + attention + ffn + terms.per_position
    first = {
        "full": 2 * norm + attention + ffn,
        "after_attention_norm": norm + attention + ffn,
        "q_and_after_attention": e * d + norm + ffn,
        "after_attention": norm + ffn,
        "method_only": 0,
    }
    first_layer = first[terms.first_layer_saves] + terms.per_position
    graph_layers = llama.n_layers - terms.first_layer
    per_row = terms.per_row_per_layer * setup.batch + terms.per_layer
    workspace = positions * e * (2 * f + 2 * d)
    if setup.activation_checkpointing:
        blocks = positions * graph_layers * e * d
        backward_block = positions * full + per_row + workspace
    else:
        blocks = positions * (first_layer + (graph_layers - 1) * full) + per_row * graph_layers
        backward_block = workspace
    final_norm = 0 if 0 < setup.loss_chunk < setup.batch * (setup.seq - 1) else setup.batch * (setup.seq - 1) * norm
    return {
        "blocks": blocks + outside_layers_bytes(model, e),
        "rope_and_final_norm": positions * 4 * llama.head_dim + final_norm,
        "backward_block": backward_block,
        "graph_layers": graph_layers,
    }


def method_memory(model: Transformer, setup: Setup) -> MemoryTerms:
    """What the model's PEFT method adds to the step's saved activations, and where its graph starts, as the method
    describes it (``Method.memory_terms``; one that does not raises NotImplementedError)."""
    step = StepShape(
        batch=setup.batch,
        seq=setup.seq,
        dtype_bytes=DTYPE_BYTES[setup.dtype],
        images=setup.images,
        quantized=setup.quantize != "none",
    )
    return model.method.memory_terms(step)


def outside_layers_bytes(model: Transformer, e: int) -> int:
    """Trainable tensors outside the layers (prefix's MLP, P-tuning's encoder, soft prompts) reach the blocks
    through autocast's 16-bit copies, which their backward keeps: their bytes (none in fp32)."""
    outside = sum(p.numel() for n, p in model.trainable_parameters() if not n.startswith(("layers.", "visual.")))
    return outside * e if e != 4 else 0


def logits_bytes(setup: Setup) -> int:
    """Peak bytes of the loss (model/loss.py) over N = batch * (seq - 1) targets and vocabulary V.

    In one piece: the logits in the compute dtype and their fp32 copy, then while the backward pass starts the
    saved fp32 log-probabilities, the cross-entropy's gradient and the log-softmax's (12 N V bytes). In chunks of
    c: the same for one chunk, recomputed, plus the targets' hidden states the checkpoints keep (N d e) and their
    gradient with one chunk's full-size slice gradient beside it."""
    llama, e = setup.llama, DTYPE_BYTES[setup.dtype]
    targets = setup.batch * (setup.seq - 1)
    if setup.loss_chunk == 0 or targets <= setup.loss_chunk:
        return targets * llama.vocab_size * 12
    c = setup.loss_chunk
    return c * llama.vocab_size * 12 + c * (4 * llama.dim + 4) + 3 * targets * llama.dim * e


# ---- the prediction -------------------------------------------------------------------------------------------------
def predict(setup: Setup) -> dict[str, Any]:
    """Peak bytes per device by component, with the counts they come from."""
    model = meta_model(setup.shape, setup.method, setup.images, setup.clip)
    counts = parameter_counts(model)
    llama, e = setup.llama, DTYPE_BYTES[setup.dtype]
    weights, block = weight_bytes(setup, counts)
    shards = setup.gpus if setup.strategy == "fsdp" else 1
    unsharded = 0
    if shards > 1:  # FSDP2: the root's embeddings, norm and head stay gathered; two blocks gathered at a time
        unsharded = round((counts["other_frozen"] * e + 2 * block) * (1 - 1 / shards))
    workspace = 0
    if setup.quantize != "none":  # the widest block linear dequantized inside its matmul
        workspace = max(o * i for o, i in block_linear_shapes(llama).values()) * e
    workspace = max(workspace, method_memory(model, setup).workspace)  # the method's own (DoRA's row norms)
    trainable = counts["trainable"] * 16 // shards
    if setup.strategy == "ddp" and setup.gpus > 1:
        trainable += counts["trainable"] * 4  # DDP's gradient buckets
    acts = activation_bytes(model, setup)
    # A method whose training forward runs the layers twice (AdaMix's consistency loss) keeps both passes'
    # activations, and its loss term holds both passes' log-probabilities of a chunk.
    passes = model.method.training_passes
    acts = {k: v * passes if k in ("blocks", "rope_and_final_norm") else v for k, v in acts.items()}
    logits = logits_bytes(setup) * passes
    components = {
        "weights": weights // shards + unsharded + workspace,
        "trainable_optimizer": trainable,
        "activations": acts["blocks"] + acts["rope_and_final_norm"],
        "logits": logits,
        # The loss's peak and a block's backward come one after the other: the larger of the two counts.
        "block_backward": max(0, acts["backward_block"] - logits),
    }
    return {
        "setup": dataclasses.asdict(setup),
        "method": model.method.describe(),
        "counts": counts,
        "graph_layers": acts["graph_layers"],
        "bytes": {**components, "total": sum(components.values())},
        "detail_bytes": {
            "weights_whole_model": weights,
            "fsdp_unsharded": unsharded,
            "dequant_workspace": workspace,
            **{k: v for k, v in acts.items() if k != "graph_layers"},
        },
    }

"""``python -m bench memory``: will a training set-up fit? Predicted peak memory per device of one training step.

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
- DoRA: its row norms of W + s B A, an fp32 (out, in) sum per target linear in every forward (the widest target).
- fsdp over N devices: weights and trainable state divided by N, plus what FSDP2 keeps unsharded (the root's
  embeddings, final norm and head, and two blocks: the one computing and the one prefetched).

``--measure`` builds the same set-up with random weights and runs real training steps beside the prediction
(``measure_step``). The prediction assumes every position has a target (the worst case of the loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

from bench.shapes import SHAPES
from model.config import PRESETS, LlamaConfig, ModelConfig, VisualConfig
from model.llama import Transformer, count_trainable
from model.quantize import BASE_LINEARS, NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LLAMA_SHAPES: dict[str, LlamaConfig] = {
    **{name: shape.llama for name, shape in SHAPES.items()},
    "13b": dataclasses.replace(PRESETS["13B"]),
    # LLaMA-1 33B (Meta's "30B"): dim 6656, 60 layers, 52 heads, Meta's FFN rule.
    "33b": LlamaConfig(dim=6656, n_layers=60, n_heads=52, vocab_size=32000, ffn_dim=LlamaConfig.meta_ffn_dim(6656)),
    # Llama-2-70B: grouped-query attention with 8 key/value heads, ffn_dim_multiplier 1.3, multiple_of 4096.
    "70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim=28672, max_seq_len=4096
    ),
}
"""--shape: the bench shapes (tiny, 100m, 7b) and the larger LLaMA sizes."""


@dataclass(frozen=True)
class Setup:
    """One training set-up; batch and seq are per device (the micro-batch each process runs)."""

    shape: str = "7b"
    method: str = "llama_adapter"
    dtype: str = "bfloat16"
    quantize: str = "none"
    batch: int = 4
    seq: int = 512
    activation_checkpointing: bool = False
    loss_chunk: int = 1024
    gpus: int = 1
    strategy: str = "ddp"
    images: bool = False
    clip: str = "ViT-L-14-quickgelu"

    def __post_init__(self) -> None:
        checks = {
            "--shape": (self.shape in LLAMA_SHAPES, ", ".join(LLAMA_SHAPES)),
            "--dtype": (self.dtype in DTYPE_BYTES, ", ".join(DTYPE_BYTES)),
            "--quantize": (self.quantize in ("none", "nf4", "int8"), "none, nf4, int8"),
            "--strategy": (self.strategy in ("ddp", "fsdp"), "ddp, fsdp"),
        }
        for flag, (ok, choices) in checks.items():
            if not ok:
                raise ValueError(f"{flag} {getattr(self, flag[2:])!r}: choose one of {choices}")
        for flag, value, low in (("--batch", self.batch, 1), ("--seq", self.seq, 2), ("--gpus", self.gpus, 1)):
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if self.loss_chunk < 0:
            raise ValueError(f"--loss-chunk must be >= 0 (0: the whole batch at once), got {self.loss_chunk}")
        if self.seq > LLAMA_SHAPES[self.shape].max_seq_len:
            raise ValueError(
                f"--seq {self.seq} exceeds the {self.shape} shape's {LLAMA_SHAPES[self.shape].max_seq_len}"
            )

    @property
    def llama(self) -> LlamaConfig:
        return dataclasses.replace(LLAMA_SHAPES[self.shape])


def method_config(setup: Setup, llama: LlamaConfig) -> Any:
    """The method's default settings (as ``--model.method NAME`` trains with), its adapted layers fitted to the
    shape: LLaMA-Adapter on the bench shape's layers (7B: the top 30 of 32) or its default for the depth."""
    from model.methods import LlamaAdapterConfig, method_class
    from model.methods.llama_adapter import default_config_for

    cls = method_class(setup.method)  # ValueError naming the registered methods
    config = cls.config_class()
    if type(config) is LlamaAdapterConfig:
        top = SHAPES[setup.shape].adapter_layers if setup.shape in SHAPES else default_config_for(llama).n_layers
        return dataclasses.replace(config, n_layers=top)
    if isinstance(config, LlamaAdapterConfig) and config.n_layers >= llama.n_layers:  # V2: all but the bottom layer
        config = dataclasses.replace(config, n_layers=max(llama.n_layers - 1, 1))
    return config


def build_model(setup: Setup, device: torch.device | str = "meta") -> Transformer:
    """The set-up's model: on the meta device shapes only; elsewhere random weights in ``setup.dtype`` (fp32
    adapter), quantized as asked."""
    device = torch.device(device)
    llama, dtype = setup.llama, getattr(torch, setup.dtype)
    config = ModelConfig(llama=llama, method=method_config(setup, llama))
    visual = None
    if setup.images:
        from model.visual import build_visual  # imported on use: open_clip

        with torch.device("meta") if device.type == "meta" else torch.device("cpu"):
            visual = build_visual(VisualConfig(clip_model=setup.clip), llama.dim, random_clip=True)
        visual = visual.to(device)
        visual.clip.to(dtype)
    with torch.device("meta"):
        model = Transformer(config, visual=visual)
    if device.type != "meta":
        from model.checkpoint import check_materialized, init_fresh_adapter, init_random_base

        init_random_base(model, seed=0, dtype=dtype, device=device)
        init_fresh_adapter(model, seed=0, device=device)
        check_materialized(model)
        if setup.quantize != "none":
            from model.quantize import quantize_base

            quantize_base(model, setup.quantize)
    return model


@functools.lru_cache(maxsize=16)
def meta_model(shape: str, method: str, images: bool, clip: str) -> Transformer:
    """The meta-device model of a set-up (what the counts depend on), built once per process."""
    return build_model(Setup(shape=shape, method=method, images=images, clip=clip))


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


def block_linear_shapes(llama: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear that model/quantize.py quantizes (BASE_LINEARS)."""
    kv = llama.n_kv_heads * llama.head_dim
    shapes = {
        "wq": (llama.dim, llama.dim),
        "wk": (kv, llama.dim),
        "wv": (kv, llama.dim),
        "wo": (llama.dim, llama.dim),
        "w1": (llama.ffn_dim, llama.dim),
        "w2": (llama.dim, llama.ffn_dim),
        "w3": (llama.ffn_dim, llama.dim),
    }
    assert set(shapes) == {n for names in BASE_LINEARS.values() for n in names}
    return shapes


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
              + the method's own        (``method_terms``: e.g. LLaMA-Adapter's prompt attention e d + 4h)

    The frozen linears save nothing (their weights need no gradient, their inputs are saved by the norms or not at
    all). A layer is in the graph from the lowest one a trainable tensor enters (LLaMA-Adapter 7B: 30 of 32); that
    lowest layer saves only what comes after the trainable tensor (``method_terms``'s ``first``). Once per position:
    RoPE's cos / sin tables (4 head_dim); the final norm per target position. With activation checkpointing a graph
    layer keeps only its input (e d per position).

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
    terms = method_terms(model, setup, e)
    positions = setup.batch * (setup.seq + model.method.n_soft_tokens)
    norm, attention, ffn = 4 * d + 4, e * (2 * d + 2 * kv) + 4 * h, 3 * e * f
    full = 2 * norm + attention + ffn + terms["extra"]
    first = {
        "after_attention_norm": norm + attention + ffn,
        "q_and_after_attention": e * d + norm + ffn,
        "after_attention": norm + ffn,
    }
    first_layer = first.get(terms["first"], 0) + terms["extra"] if terms["first"] != "full" else full
    graph_layers = llama.n_layers - terms["first_layer"]
    per_row = terms["per_row_per_layer"] * setup.batch + terms["per_layer"]
    workspace = positions * e * (2 * f + 2 * d)
    if setup.activation_checkpointing:
        blocks = positions * graph_layers * e * d
        backward_block = positions * full + per_row + workspace
    else:
        blocks = positions * (first_layer + (graph_layers - 1) * full) + per_row * graph_layers
        backward_block = workspace
    final_norm = 0 if 0 < setup.loss_chunk < setup.batch * (setup.seq - 1) else setup.batch * (setup.seq - 1) * norm
    return {
        "blocks": blocks + terms["per_model"],
        "rope_and_final_norm": positions * 4 * llama.head_dim + final_norm,
        "backward_block": backward_block,
        "graph_layers": graph_layers,
    }


def method_terms(model: Transformer, setup: Setup, e: int) -> dict[str, Any]:
    """What the PEFT method adds to the saved activations, and where its graph starts.

    extra: bytes per position per graph layer; first_layer: the lowest layer in the graph; first: what that layer
    saves of the block ("full", "after_attention_norm", "q_and_after_attention", "after_attention" or only the
    method's own extra);
    per_row_per_layer / per_layer / per_model: bytes that do not grow with the sequence (prompt keys, prefix keys,
    the mask, 16-bit copies of the trainable tensors outside the layers).
    """
    llama, c, name = setup.llama, model.method.config, model.method.name
    d, f, h, n = llama.dim, llama.ffn_dim, llama.n_heads, llama.n_layers
    kv = llama.n_kv_heads * llama.head_dim
    terms: dict[str, Any] = {"extra": 0, "first_layer": 0, "first": "full", "per_row_per_layer": 0, "per_layer": 0}
    terms["per_model"] = 0
    if name in ("llama_adapter", "llama_adapter_v2"):
        # The prompts' separate softmax: its output and log-sum-exp; the prompts' K / V (one row without images).
        terms.update(extra=e * d + 4 * h, first_layer=n - c.n_layers, first="q_and_after_attention")
        terms["per_layer"] = 2 * c.prompt_len * kv * e * (setup.batch if setup.images else 1)  # image: per row
        if name == "llama_adapter_v2":
            # Bias and scale on every layer's linears and norms: each scaled input is saved once (wq, wk, wv share
            # one; w1, w3 another), the norms' outputs too; every layer is in the graph.
            inputs = {"wq": ("attn", d), "wk": ("attn", d), "wv": ("attn", d), "wo": ("wo", d)}
            inputs |= {"w1": ("ffn", d), "w3": ("ffn", d), "w2": ("w2", f)}
            saved = dict(inputs[t] for t in c.bias_targets)
            terms.update(extra=terms["extra"] + e * (sum(saved.values()) + 2 * d), first_layer=0)
            terms["first"] = "after_attention_norm"
    elif name in ("lora", "dora"):
        ins = {"wq": ("attn", d), "wk": ("attn", d), "wv": ("attn", d), "wo": ("wo", d), "w1": ("ffn", d)}
        ins |= {"w3": ("ffn", d), "w2": ("w2", f)}
        # LoRA's input (fp32: the input itself, shared; 16-bit: each target's autocast copy) and A's output.
        inputs = sum(dict(ins[t] for t in c.targets).values()) * 4 if e == 4 else sum(ins[t][1] for t in c.targets) * e
        terms.update(extra=inputs + len(c.targets) * c.rank * e, first_layer=n - (c.n_layers or n))
        terms["first"] = "after_attention_norm"
        if e != 4:  # the autocast copies of A and B
            terms["per_layer"] = sum(c.rank * (ins[t][1] + d if t != "w2" else f + d) for t in c.targets) * e
        if name == "dora":
            # The magnitude's factor times (W x + s B A x): that sum per position, and per layer the fp32 row
            # norm the factor divides by and the factor in the compute dtype (the row norms are taken without grad).
            outs = sum({"wq": d, "wk": kv, "wv": kv, "wo": d, "w1": f, "w2": d, "w3": f}[t] for t in c.targets)
            terms["extra"] += e * outs
            terms["per_layer"] += (4 + e) * outs
    elif name == "ia3":
        # Each vector's multiplicand: the linear's output before its scale, or (feed-forward targets) its input
        # (w2's: the SwiGLU product); 16-bit: the vectors' autocast copies too.
        sizes = {"wq": d, "wk": kv, "wv": kv, "wo": d, "w1": f, "w2": d, "w3": f}
        sizes |= {t: {"wq": d, "wk": d, "wv": d, "wo": d, "w1": d, "w2": f, "w3": d}[t] for t in c.feedforward}
        attention_targets = any(t in ("wq", "wk", "wv", "wo") for t in c.targets)
        terms.update(extra=e * sum(sizes[t] for t in c.targets), first_layer=n - (c.n_layers or n))
        terms["first"] = "after_attention_norm" if attention_targets else "after_attention"
        terms["per_layer"] = e * sum(sizes[t] for t in c.targets) if e != 4 else 0
    elif name in ("houlsby", "adamix"):
        # Bottleneck: its input (in series the sublayer's output; in parallel the sublayer's own input, already
        # saved), W_down's output and the nonlinearity's output. (Trained norms, houlsby's option, are not counted.)
        sublayers, own_input = c.sublayers, d if getattr(c, "placement", "serial") == "serial" else 0
        terms.update(extra=len(sublayers) * e * (own_input + 2 * c.bottleneck), first_layer=n - (c.n_layers or n))
        terms["first"] = "after_attention" if "attention" in sublayers else "adapter_only"
        terms["per_layer"] = len(sublayers) * 2 * d * c.bottleneck * e if e != 4 else 0
    elif name in ("prefix", "ptuning_v2"):
        # P prefix keys / values joined in front of the tokens' in every row; the padded (T, P + T) mask.
        terms.update(first_layer=n - (c.n_layers or n), first="after_attention_norm")
        terms["per_row_per_layer"] = 2 * c.prefix_len * kv * e
        terms["per_layer"] = setup.seq * (setup.seq + c.prefix_len) * e
    # prompt, ptuning: soft tokens from the embeddings up: every layer in full, over T + P positions.
    # Trainable tensors outside the layers (prefix's MLP, P-tuning's encoder, soft prompts) reach the blocks through
    # autocast's 16-bit copies, which their backward keeps.
    outside = sum(p.numel() for n, p in model.trainable_parameters() if not n.startswith(("layers.", "visual.")))
    terms["per_model"] = outside * e if e != 4 else 0
    return terms


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
    if setup.method == "dora":  # the row norms of W + s B A (model/methods/dora.py), one target linear at a time:
        # the fp32 update and the fp32 sum, and an fp32 copy of W unless W is fp32 already
        widest = max(o * i for t, (o, i) in block_linear_shapes(llama).items() if t in model.method.config.targets)
        workspace = max(workspace, (2 if e == 4 and setup.quantize == "none" else 3) * 4 * widest)
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


# ---- measurement ----------------------------------------------------------------------------------------------------
def _vm_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now; VmHWM: its high-water mark)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``; a torchao tensor (NF4, int8) counts its inner tensors."""
    seen: dict[int, int] = {}

    def visit(t: torch.Tensor) -> None:
        if hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                visit(getattr(t, name))
        else:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in tensors:
        visit(t)
    return sum(seen.values())


def measure_step(setup: Setup, device: torch.device) -> dict[str, Any]:
    """Build the set-up with random weights on ``device``, run one training step (forward with labels, backward,
    AdamW step) so AdamW's moments exist and every code path has run once, then measure a second, identical step.

    CUDA: ``torch.cuda.max_memory_allocated`` of that step (tensors only: not the CUDA context or the caching
    allocator's spare blocks). CPU (run by ``main`` in a fresh subprocess, glibc's mmap threshold fixed at 64 KiB so
    freed tensors go back to the system at once): the tensors held between steps (weights, trainable tensors, AdamW
    state: their storage bytes, counted) plus the step's growth of the resident set, its high-water mark (VmHWM,
    reset through /proc/self/clear_refs just before the step) less the resident set just before it. The growth is
    measured after a first step so that neither side counts library code paged in on first use (~25 MB of
    libtorch), which is no part of the set-up's memory. ``rss_peak_over_imports_bytes`` keeps the plain figure.
    """
    import gc

    import model.checkpoint  # noqa: F401  imported before the baseline of rss_peak_over_imports
    import model.visual  # noqa: F401

    if setup.quantize != "none":
        import torchao.quantization  # noqa: F401
    cpu = device.type == "cpu"
    gc.collect()
    imports = _vm_kib("VmRSS") * 1024 if cpu else torch.cuda.memory_allocated(device)
    net = build_model(setup, device).train()
    net.activation_checkpointing = setup.activation_checkpointing
    optimizer = torch.optim.AdamW([p for _, p in net.trainable_parameters()], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(setup.llama.vocab_size, (setup.batch, setup.seq), generator=gen).to(device)
    images = mask = None
    if setup.images:
        size = net.visual.image_size
        images = torch.randn(setup.batch, 3, size, size).to(device)
        mask = torch.ones(setup.batch, dtype=torch.bool).to(device)
    dtype = getattr(torch, setup.dtype)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = net(tokens, images, image_mask=mask, labels=tokens, loss_chunk=setup.loss_chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    gc.collect()
    state = [t for group in optimizer.state.values() for t in group.values() if torch.is_tensor(t)]
    held = tensor_bytes([*net.parameters(), *net.buffers(), *state])
    if cpu:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        before = _vm_kib("VmRSS") * 1024
    else:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    loss = step()
    if cpu:
        hwm = _vm_kib("VmHWM") * 1024
        peak, how = held + hwm - before, "tensors held between steps + the step's VmHWM growth (clear_refs reset)"
    else:
        torch.cuda.synchronize(device)
        hwm = peak = torch.cuda.max_memory_allocated(device) - imports
        how = "torch.cuda.max_memory_allocated of the step"
    return {
        "peak_bytes": peak,
        "held_between_steps_bytes": held,
        "rss_peak_over_imports_bytes": hwm - imports,
        "loss": loss,
        "how": how,
        "device": str(device),
    }


def measure_in_subprocess(setup: Setup, device: torch.device) -> dict[str, Any]:
    """``measure_step`` in a fresh Python process (CPU: nothing else resident in it; CUDA: a clean allocator)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "bench.memory", json.dumps(dataclasses.asdict(setup)), str(device)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    if out.returncode != 0:
        raise RuntimeError(f"the measuring process failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- command line ---------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``python -m bench memory`` options."""
    parser.add_argument("--shape", default="7b", help=f"model shape: {', '.join(LLAMA_SHAPES)} (default 7b)")
    parser.add_argument("--method", default="llama_adapter", help="PEFT method, with its default settings")
    parser.add_argument(
        "--dtype", help="float32 | bfloat16 | float16 of the frozen base (default bfloat16; --measure on cpu: float32)"
    )
    parser.add_argument("--quantize", default="none", help="none | nf4 | int8: the frozen block linears")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per device (default 4)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    parser.add_argument(
        "--loss-chunk", type=int, default=1024, help="targets per loss chunk, 0: all at once (default 1024)"
    )
    parser.add_argument("--gpus", type=int, default=1, help="devices (processes) of the job (default 1)")
    parser.add_argument("--strategy", default="ddp", help="ddp | fsdp (fsdp shards the frozen base)")
    parser.add_argument("--images", action="store_true", help="with the CLIP tower (--clip) of the visual path")
    parser.add_argument("--clip", default="ViT-L-14-quickgelu", help="open_clip tower with --images")
    parser.add_argument("--measure", action="store_true", help="also run training steps and measure the peak")
    parser.add_argument("--device", help="--measure on: cpu | cuda | cuda:N (default cuda if available)")
    parser.add_argument("--json", metavar="OUT", help="also write the prediction (and measurement) here")


def setup_from_args(args: argparse.Namespace) -> tuple[Setup, torch.device | None]:
    """The set-up and the measuring device (None without --measure); ValueError naming a bad flag."""
    from bench.measure import resolve_device

    device = resolve_device(args.device) if args.measure else None
    dtype = args.dtype or ("float32" if device is not None and device.type == "cpu" else "bfloat16")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    setup = Setup(
        shape=args.shape, method=args.method, dtype=dtype, quantize=args.quantize, batch=args.batch, seq=args.seq,
        activation_checkpointing=args.activation_checkpointing, loss_chunk=args.loss_chunk, gpus=args.gpus,
        strategy=args.strategy, images=args.images, clip=args.clip,
    )  # fmt: skip
    if args.measure and (setup.gpus > 1 or setup.strategy == "fsdp"):
        raise ValueError("--measure runs one process: leave out --gpus / --strategy fsdp")
    return setup, device


ROWS = (
    ("weights", "weights (frozen base)"),
    ("trainable_optimizer", "trainable + grads + AdamW"),
    ("activations", "activations (saved)"),
    ("logits", "logits / loss"),
    ("block_backward", "block backward beyond loss"),
    ("total", "total"),
)


def format_report(report: dict[str, Any]) -> str:
    """The breakdown table, GiB per device."""
    s, c, b = report["setup"], report["counts"], report["bytes"]
    devices = f"{s['gpus']} GPU{'s' if s['gpus'] > 1 else ''} ({s['strategy']})"
    lines = [
        f"{s['shape']} {s['dtype']}, quantize {s['quantize']}, batch {s['batch']} x seq {s['seq']} per device, "
        f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, loss chunk "
        f"{s['loss_chunk'] or 'off'}, {devices}{', images' if s['images'] else ''}",
        f"method: {report['method']}; {c['trainable']:,} trainable values, "
        f"{c['block_linears'] + c['other_frozen']:,} frozen LLaMA values"
        + (f" + {c['visual_tower']:,} CLIP" if c["visual_tower"] else "")
        + f", {report['graph_layers']} layers in the backward graph",
        "",
        f"{'component':<30}{'GiB/device':>12}",
    ]
    lines += [f"{label:<30}{b[key] / GIB:>12.2f}" for key, label in ROWS]
    measured = report.get("measured")
    if measured is not None:
        ratio = b["total"] / measured["peak_bytes"] - 1
        lines += [
            f"{'measured peak':<30}{measured['peak_bytes'] / GIB:>12.2f}   prediction {ratio:+.1%}",
            f"  ({measured['device']}: {measured['how']})",
        ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Predict (and with --measure, measure) and print the table; exit status 2 on a bad flag."""
    try:
        setup, device = setup_from_args(args)
        report = predict(setup)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device is not None:
        report["measured"] = measure_in_subprocess(setup, device)
    print(format_report(report))
    if args.json:
        from bench.run import write_json

        write_json(report, args.json)
    return 0


if __name__ == "__main__":  # the measuring subprocess: python -m bench.memory SETUP_JSON DEVICE
    result = measure_step(Setup(**json.loads(sys.argv[1])), torch.device(sys.argv[2]))
    print(json.dumps(result))

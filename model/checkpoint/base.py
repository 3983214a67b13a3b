"""A base model directory opened lazily, whatever its layout (``meta.py``, ``hf.py``), and loaded strictly.

Base weights are read lazily (memory-mapped ``torch.load`` or ``safetensors``), renamed to Meta's key names by the
layout's reader, checked against the model strictly (shapes, floating-point dtypes), then copied tensor by tensor
in the target dtype into a model built on the meta device, so no second full-size copy of the weights is ever held
in memory. While loading, a few values of some weights are sampled into the base's content fingerprint
(``weights_fingerprint``), which tells an adapter whether it sits on the base it was trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from model.checkpoint.files import CheckpointError
from model.checkpoint.keys import check_keys, listing
from model.config import LlamaConfig
from model.llama import Transformer, is_trainable

BASE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
"""The floating-point dtypes accepted for base weights, under their safetensors names."""


@dataclass
class WeightEntry:
    """One base weight under its Meta name: where it is, its shape and dtype, and how to read it (in Meta layout)."""

    origin: str  # file (and original key) for error messages
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a str: a safetensors dtype outside BASE_DTYPES (refused)
    load: Callable[[], Tensor]
    alias: str | None = None  # tied weight: reuse the tensor loaded under this name


# ---- which base an adapter was trained on, by content ----------------------------------------------------------------
FINGERPRINT_SAMPLES = 64


def fingerprinted_weights(llama: LlamaConfig) -> tuple[str, ...]:
    """The base weights the content fingerprint samples: none of them is permuted between the Meta and HF layouts."""
    last = llama.n_layers - 1
    return ("tok_embeddings.weight", "layers.0.attention.wv.weight", f"layers.{last}.feed_forward.w2.weight",
            "norm.weight", "output.weight")  # fmt: skip


def fingerprint_sample(weight: Tensor) -> Tensor:
    """FINGERPRINT_SAMPLES values of ``weight`` evenly spaced over its flattened elements, as float32."""
    flat = weight.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES, dtype=torch.float64).round().long()
    return flat[index].to(device="cpu", dtype=torch.float32)


FINITE_SAMPLES = 4096


def check_sample_finite(weight: Tensor, where: str) -> None:
    """CheckpointError unless FINITE_SAMPLES values evenly spread over ``weight`` are finite: a cheap check (no pass
    over the whole tensor) that catches weights of NaN or inf, as a damaged or hostile file holds them; a single
    NaN among billions of values is not looked for."""
    flat = weight.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(FINITE_SAMPLES, flat.numel()), dtype=torch.float64).round().long()
    sample = flat[index]
    if not bool(sample.isfinite().all()):
        bad = int((~sample.isfinite()).sum())
        raise CheckpointError(
            f"{where}: {bad} of {sample.numel()} sampled values are NaN or inf; the weights are damaged"
        )


def weights_fingerprint(samples: dict[str, Tensor]) -> str:
    """Content fingerprint of a base: SHA-256 (first 32 hex digits) of the samples of ``fingerprinted_weights``.

    Samples are taken from the weights as stored (Meta layout, before any dtype conversion, as float32), so the
    same weights give the same fingerprint from a Meta or a Hugging Face directory and loaded in any dtype. It
    tells bases apart (another model, another fine-tune, another random seed); it is no checksum of the files.
    """
    digest = hashlib.sha256()
    for name in sorted(samples):
        digest.update(name.encode())
        digest.update(samples[name].numpy().tobytes())
    return digest.hexdigest()[:32]


def base_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the frozen LLaMA weights (Meta names): no adapter tensors, no visual tower."""
    return {
        n: tuple(t.shape) for n, t in model.state_dict().items() if not is_trainable(n) and not n.startswith("visual.")
    }


@dataclass
class BaseCheckpoint:
    """A base model directory opened lazily: its architecture and its weights under Meta names."""

    path: Path
    format: Literal["meta", "hf"]
    config_file: str  # params.json / config.json, named in errors
    llama: LlamaConfig
    entries: dict[str, WeightEntry]

    def load_into(self, model: Transformer, *, dtype: torch.dtype | None, device: torch.device) -> str | None:
        """Check the keys and dtypes strictly, then assign every weight in ``dtype`` (None: the stored dtype) on
        ``device``; return the base's ``weights_fingerprint``.

        ``model`` is built on the meta device; on a meta ``device`` only the checks run (and None is returned).
        """
        found = {n: e.shape for n, e in self.entries.items()}
        origin = {n: e.origin for n, e in self.entries.items()}
        check_keys(base_shapes(model), found, self.path, f"base weights (architecture from {self.config_file})", origin)
        not_float = [f"{e.origin} ({e.dtype})" for e in self.entries.values() if e.dtype not in BASE_DTYPES.values()]
        if not_float:
            raise CheckpointError(
                f"{self.path}: base weights must be floating point (float16, bfloat16, float32 or float64); "
                f"found {listing(not_float)}"
            )
        if device.type == "meta":
            return None
        sampled = fingerprinted_weights(self.llama)
        samples: dict[str, Tensor] = {}
        state: dict[str, Tensor] = {}
        for name, entry in self.entries.items():
            if entry.alias is not None:
                continue
            try:
                tensor = entry.load()
            except Exception as e:  # e.g. a shard whose data region is damaged
                raise CheckpointError(f"{self.path}: cannot read tensor {entry.origin} ({e})") from e
            if name in sampled:
                samples[name] = fingerprint_sample(tensor)
            check_sample_finite(tensor, f"{self.path}: {entry.origin}")
            dtype = dtype or tensor.dtype  # None: every weight takes the dtype of the first one
            # copy=True: a parameter must own its memory, not alias the memory-mapped file (rewriting the file
            # would change or fault the weights); the mapped pages stay reclaimable page cache.
            state[name] = tensor.to(device=device, dtype=dtype, copy=True)
            del tensor  # one source tensor alive at a time
        for name, entry in self.entries.items():
            if entry.alias is not None:
                state[name], samples[name] = state[entry.alias], samples[entry.alias]
        # assign=True keeps our tensors as the parameters (requires_grad preserved): no second full copy.
        model.load_state_dict(state, strict=False, assign=True)
        return weights_fingerprint(samples)

"""Meta's base layout: params.json + consolidated.NN.pth, model-parallel shards merged per weight."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from model.checkpoint.base import BaseCheckpoint, WeightEntry
from model.checkpoint.files import CheckpointError, read_json, torch_load
from model.checkpoint.keys import listing
from model.config import ConfigError, LlamaConfig

# Meta model-parallel shards: the axis each weight was split along (fairscale Column/RowParallelLinear and
# ParallelEmbedding); norms are replicated. Read from the transformers converter's concatenation axes.
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _merge_shards(shards: list[dict[str, Tensor]], name: str, dim: int | None) -> Tensor:
    return shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)


def open_meta(path: Path) -> BaseCheckpoint:
    """A Meta base directory (params.json + consolidated.NN.pth) opened lazily."""
    params_file = path / "params.json"
    params = read_json(params_file)
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{params_file}: use_scaled_rope (LLaMA-3.1 RoPE scaling) is not supported")
    files = sorted(path.glob("consolidated.*.pth"))
    shards = [torch_load(f) for f in files]
    names = [k for k in shards[0] if not k.endswith("rope.freqs")]  # a precomputed RoPE table, not a weight
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))
            raise CheckpointError(f"{f}: model-parallel shard keys differ from {files[0].name}: {listing(diff)}")
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{files[0]}: no tok_embeddings.weight, not a LLaMA checkpoint")

    def split_dim(name: str) -> int | None:
        if len(shards) == 1:
            return None
        module = name.rsplit(".", 2)[-2]  # layers.3.attention.wq.weight -> wq; norm.weight -> norm
        if module == "tok_embeddings" and shards[0][name].shape[1] == params.get("dim"):
            return 0  # LLaMA-3 splits the embedding over the vocabulary (VocabParallelEmbedding)
        return _META_SHARD_DIM.get(module)

    def merged_shape(name: str) -> tuple[int, ...]:
        shape = list(shards[0][name].shape)
        dim = split_dim(name)
        if dim is not None:
            shape[dim] = sum(s[name].shape[dim] for s in shards)
        return tuple(shape)

    from_embedding = params.get("vocab_size", -1) in (None, -1)  # Meta writes -1: the tokenizer's size
    try:
        llama = LlamaConfig.from_meta_params(
            params, vocab_size=merged_shape("tok_embeddings.weight")[0] if from_embedding else None
        )
    except ConfigError as e:
        raise CheckpointError(f"{params_file}: field {e.field}: {e.problem}") from None
    origin = files[0].name if len(files) == 1 else f"{files[0].name}..{files[-1].name}"
    entries = {
        n: WeightEntry(
            f"{origin}: {n}",
            merged_shape(n),
            shards[0][n].dtype,
            functools.partial(_merge_shards, shards, n, split_dim(n)),
        )
        for n in names
    }
    return BaseCheckpoint(path, "meta", params_file.name, llama, entries)

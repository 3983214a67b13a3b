"""The Hugging Face base layout: config.json + safetensors / pytorch_model.bin, sharded or not.

Keys are renamed to Meta's and the q/k rows un-permuted on reading; a shard index may only name files inside the
base folder. The same tables, read backwards, name and permute what model/checkpoint/hf_export.py writes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoint.base import BASE_DTYPES, BaseCheckpoint, WeightEntry
from model.checkpoint.files import CheckpointError, open_safetensors, read_json, torch_load
from model.checkpoint.keys import listing
from model.config import ConfigError, LlamaConfig

_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight)")
_META_TOP = {meta: hf for hf, meta in _HF_TOP.items()}
_META_LAYER = {meta: hf for hf, meta in _HF_LAYER.items()}
_META_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
LAYER_LINEARS = tuple(name for name in _META_LAYER if not name.endswith("_norm"))
"""The linears of a layer under their Meta module names (``attention.wq`` ... ``feed_forward.w2``)."""


def hf_to_meta_name(name: str) -> str | None:
    """Meta key for a Hugging Face LlamaForCausalLM key (None if it has no Meta counterpart)."""
    return _renamed(name, _HF_TOP, _HF_LAYER, _HF_LAYER_KEY, "layers.")


def meta_to_hf_name(name: str) -> str | None:
    """Hugging Face LlamaForCausalLM key for a Meta key, ``.weight`` or a linear's ``.bias`` (None: no counterpart)."""
    return _renamed(name, _META_TOP, _META_LAYER, _META_LAYER_KEY, "model.layers.")


def _renamed(
    name: str, top: dict[str, str], layer: dict[str, str], layer_key: re.Pattern[str], layers: str
) -> str | None:
    """``name`` in the other layout: a top-level key through ``top``, a layer's (``layer_key``: its index, module and
    suffix) with the module through ``layer``, under the prefix ``layers``; None when the tables have no entry."""
    if name in top:
        return top[name]
    m = layer_key.fullmatch(name)
    if m and m.group(2) in layer:
        return f"{layers}{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
    return None


def rope_permuted_heads(name: str, llama: LlamaConfig) -> int | None:
    """The heads over which a Meta tensor's rows are permuted in the HF layout: wq per query head, wk per key/value
    head (GQA), their weights and biases alike; None for every other tensor."""
    m = _META_LAYER_KEY.fullmatch(name)
    part = m.group(2) if m else None
    return {"attention.wq": llama.n_heads, "attention.wk": llama.n_kv_heads}.get(part)


def hf_rows_to_meta(weight: Tensor, n_heads: int) -> Tensor:
    """Undo the converter's q/k row permutation: per head, HF rows [evens..., odds...] back to Meta's pairs.

    HF RoPE rotates halves (x[j], x[j + hd/2]); Meta rotates adjacent pairs (x[2j], x[2j+1]). HF row j is Meta
    row 2j and HF row j + hd/2 is Meta row 2j + 1 (reference/data_formats.md §4.4).
    """
    out_features, in_features = weight.shape
    half = out_features // n_heads // 2
    per_head = weight.view(n_heads, 2, half, in_features)  # (nh, [even|odd], hd/2, dim)
    return per_head.transpose(1, 2).reshape(out_features, in_features)  # rows 2j, 2j+1 adjacent again


def meta_rows_to_hf(weight: Tensor, n_heads: int) -> Tensor:
    """The converter's q/k row permutation (inverse of ``hf_rows_to_meta``): per head, Meta's adjacent pairs
    (2j, 2j+1) become HF rows j and j + hd/2. A 1-D tensor (a bias) is permuted as a column."""
    rows = weight.reshape(weight.shape[0], -1)  # (out, in) or (out, 1)
    half = rows.shape[0] // n_heads // 2
    per_head = rows.reshape(n_heads, half, 2, rows.shape[1])  # (nh, hd/2, [even|odd], in)
    return per_head.transpose(1, 2).reshape(weight.shape)  # evens first, then odds, per head


def hf_weight_files(path: Path) -> tuple[Path | None, dict[Path, list[str] | None]]:
    """(index, {weight file: the keys the index assigns to it}) of a HF directory; a single unindexed file maps to
    None (all its keys). No weight files: (None, {})."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):  # fmt: skip
        index = path / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            shard_keys: dict[str, list[str]] = {}
            for key, name in weight_map.items():
                if not isinstance(name, str) or not name:
                    raise CheckpointError(f"{index}: weight_map value {name!r} for {key} is not a file name")
                shard_keys.setdefault(name, []).append(key)
            files = {_shard_file(path, index, name): keys for name, keys in shard_keys.items()}
            absent = sorted(f.name for f in files if not f.is_file())
            if absent:
                raise CheckpointError(f"{index}: shard files listed but absent: {listing(absent)}")
            return index, files
        if (path / single).is_file():
            return None, {path / single: None}
    return None, {}


def _shard_file(base: Path, index: Path, name: str) -> Path:
    """The shard file an index names: a relative path that stays inside ``base``, symlinks followed.

    A Hugging Face hub cache snapshot (``<repo>/snapshots/<revision>``) holds symlinks into ``<repo>/blobs``; those
    are the only links allowed out of the folder.
    """
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{index}: shard file {name!r} is outside the base folder {base}")
    file = base / name
    root = base.resolve()
    allowed = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    target = file.resolve()
    if file.exists() and not any(target.is_relative_to(folder) for folder in allowed):
        raise CheckpointError(f"{index}: shard file {name!r} links to {target}, outside the base folder {base}")
    return file


def hf_config_to_llama(cfg: dict[str, Any], source: Path) -> LlamaConfig:
    """LlamaConfig from a HF config.json dict, or CheckpointError naming the file and the field."""
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type={cfg['model_type']!r}; only LLaMA checkpoints are supported")
    architectures = cfg.get("architectures", ["LlamaForCausalLM"])
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise CheckpointError(f"{source}: field architectures: {architectures!r}; expected a list of class names")
    other = [a for a in architectures if "llama" not in a.lower()]
    if other:
        raise CheckpointError(
            f"{source}: field architectures names {', '.join(other)} although model_type is llama; this loader reads "
            "LlamaForCausalLM checkpoints only (another architecture would load with wrong results)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not part of the LLaMA architecture we implement")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{source}: field hidden_act: {cfg['hidden_act']!r}; the LLaMA feed-forward block is SwiGLU, only 'silu' "
            "is supported"
        )
    try:
        return LlamaConfig.from_hf_config(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{source}: field {e.field}: {e.problem}") from None


class _WeightFile:
    """Lazy access to one safetensors or PyTorch weight file: keys, shapes, then one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._safetensors = open_safetensors(path) if path.suffix == ".safetensors" else None
        self._state = None if self._safetensors is not None else torch_load(path)

    def keys(self) -> list[str]:
        return list(self._safetensors.keys() if self._safetensors is not None else self._state)

    def dtype(self, key: str) -> torch.dtype | str:
        if self._safetensors is not None:
            stored = self._safetensors.get_slice(key).get_dtype()
            return BASE_DTYPES.get(stored, stored)
        return self._state[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        if self._safetensors is not None:
            return tuple(self._safetensors.get_slice(key).get_shape())
        return tuple(self._state[key].shape)

    def get(self, key: str) -> Tensor:
        return self._safetensors.get_tensor(key) if self._safetensors is not None else self._state[key]


def _read_hf_tensor(file: _WeightFile, key: str, permuted_heads: int | None) -> Tensor:
    tensor = file.get(key)
    return hf_rows_to_meta(tensor, permuted_heads) if permuted_heads else tensor


def open_hf(path: Path) -> BaseCheckpoint:
    """A Hugging Face base directory (config.json + weight files) opened lazily, under Meta names."""
    config_file = path / "config.json"
    cfg = read_json(config_file)
    llama = hf_config_to_llama(cfg, config_file)
    entries: dict[str, WeightEntry] = {}
    index, files = hf_weight_files(path)
    for file_path, listed in files.items():
        file = _WeightFile(file_path)
        held = file.keys()
        not_held = sorted(set(listed or ()) - set(held))
        if not_held:
            raise CheckpointError(f"{index}: names {file_path.name} for keys it does not hold: {listing(not_held)}")
        for key in listed or held:  # each key from the file the index names for it
            if key.endswith("rotary_emb.inv_freq"):  # buffer written by old transformers, recomputed by us
                continue
            name = hf_to_meta_name(key) or key  # unknown keys keep their name and surface as unexpected
            heads = rope_permuted_heads(name, llama)  # q rows per query head, k rows per key/value head (GQA)
            load = functools.partial(_read_hf_tensor, file, key, heads)
            entries[name] = WeightEntry(f"{file.path.name}: {key}", file.shape(key), file.dtype(key), load)
    if "output.weight" not in entries and cfg.get("tie_word_embeddings") and "tok_embeddings.weight" in entries:
        emb = entries["tok_embeddings.weight"]
        entries["output.weight"] = dataclasses.replace(emb, alias="tok_embeddings.weight")
    return BaseCheckpoint(path, "hf", config_file.name, llama, entries)

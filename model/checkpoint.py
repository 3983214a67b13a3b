"""Checkpoint formats: base weights (Meta, Hugging Face), our adapter files, and importers.

Base weights are read lazily (memory-mapped ``torch.load`` or ``safetensors``; a shard index may only name files
inside the base folder), renamed to Meta's key names, checked against the model strictly (shapes, floating-point
dtypes), then copied tensor by tensor in the target dtype into a model built on the meta device, so no second
full-size copy of the weights is ever held in memory.

Adapter files hold only the trainable tensors (``Transformer.adapter_state_dict()``) as safetensors, plus a JSON
sidecar with the configs, the base, the tokenizer, the CLIP weights, the prompt format and two fingerprints of the
base: its architecture (refused when it differs) and its weights' content (``weights_fingerprint``; a warning, or
an error under ``strict_base``). Importers turn the official LLaMA-Adapter V1 release file and PEFT adaption-prompt
directories into the same trainable tensors.

Every problem with a file raises ``CheckpointError`` naming the file (and the keys or the field), never a stack
trace from torch; every failed write raises ``WriteError`` naming the file, and leaves its previous version intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from model.config import AdapterConfig, ConfigError, LlamaConfig, ModelConfig, VisualConfig
from model.llama import Transformer, is_trainable

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_SIDECAR = "adapter.json"
SIDECAR_VERSION = 1
INIT_STD = 0.02  # random presets: N(0, 0.02) like transformers' initializer_range; norms at 1
MAX_LISTED = 8  # keys listed per category in an error message


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, unreadable or does not match the model."""


class WriteError(OSError):
    """A file could not be written (disk full, no permission, I/O error); its previous version is unchanged.

    ``path`` is the file; ``errno`` the OS error number when one is known.
    """

    def __init__(self, path: Path, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.path, self.errno = path, errno


class BaseWeightsWarning(UserWarning):
    """An adapter is loaded onto a base whose weights differ from those it was trained on (same shapes)."""


# ---- reading files ------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or CheckpointError naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def torch_load(path: Path) -> dict[str, Tensor]:
    """A flat state dict from a PyTorch file: ``weights_only=True`` always, memory-mapped when the file allows it."""
    # mmap needs the zip format (torch >= 1.6); the legacy pickle format is read into memory.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises OSError, RuntimeError or UnpicklingError depending on the damage
        refusal = weights_only_refusal(e)
        if refusal is not None:
            raise CheckpointError(f"{path}: {refusal}") from None
        raise CheckpointError(f"{path}: cannot read PyTorch weights, file truncated or corrupt? ({e})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a flat state dict of name -> tensor, got {type(obj).__name__}")
    return obj


def weights_only_refusal(error: Exception) -> str | None:
    """Our message for a pickle that ``torch.load(weights_only=True)`` refused: torch's reason, without its advice
    to retry with ``weights_only=False`` or to allowlist the class (either would let the file run code). None for
    other errors."""
    message = str(error)
    if not (isinstance(error, pickle.UnpicklingError) and message.startswith("Weights only load failed")):
        return None
    lines = [line.split(" Please use")[0].strip() for line in message.split("\n")]  # drop the allowlist advice
    lines = [line.removeprefix("WeightsUnpickler error: ") for line in lines]
    kept = [line for line in lines if line and "weights_only" not in line and "Weights only load failed" not in line]
    reason = " ".join(kept) or "not a plain state dict of tensors"
    return f"refused: the file holds Python objects other than tensors, which are never unpickled here ({reason})"


def open_safetensors(path: Path) -> Any:
    """A lazy safetensors handle (tensors are read one at a time with ``get_tensor``)."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (header/length checks) or OSError
        raise CheckpointError(f"{path}: cannot read safetensors, file truncated or corrupt? ({e})") from e


def load_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, or CheckpointError naming the file."""
    handle = open_safetensors(path)
    try:
        return {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from e


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` all or nothing: ``write(tmp)`` fills a temporary file beside it, which is flushed to disk
    (fsync), given the mode a plain ``open()`` gives (0o666 & ~umask) and renamed over ``path``; the directory is
    then synced too where the OS allows.

    Any failure to write (disk full, no permission, I/O error; OSError, safetensors' SafetensorError, the
    RuntimeError of torch.save) raises one WriteError naming ``path``; the previous ``path`` is then unchanged
    and no temporary file is left. Other errors from ``write`` pass through after the same clean-up.
    """
    atomic_write_files({Path(path): write})


def atomic_write_files(writes: dict[Path, Callable[[Path], None]]) -> None:
    """``atomic_write`` for files that belong together: every file is written and synced first, then all are
    renamed, so a failed write (the WriteError names that file) leaves all of them unchanged."""
    temps: list[tuple[str, Path]] = []
    path = None
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append((tmp, path))
            write(Path(tmp))
            _fsync(tmp)
            # After write: safetensors writes a new file of mode 0600 and renames it over the one it is given.
            os.chmod(tmp, _new_file_mode())
        for tmp, path in temps:
            os.replace(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as e:
        errno, reason = _failure_reason(e)
        kept = "the previous file is unchanged" if path.exists() else "no file was written"
        raise WriteError(path, f"{path}: cannot write ({reason}); {kept}", errno) from e
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    for folder in {path.parent for path in writes}:
        _fsync_directory(folder)


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` and sync it to disk (append-only logs). A failed write raises one WriteError
    naming ``path``; the lines written before are kept (a line cut by the failure is the reader's to drop)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(path, f"{path}: cannot write ({e.strerror or e}); earlier records are kept", e.errno) from e


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(file: str) -> None:
    fd = os.open(file, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable; skipped where a directory cannot be opened (Windows) or synced."""
    with contextlib.suppress(OSError):  # the rename is done either way; only its durability is at stake
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _failure_reason(error: BaseException) -> tuple[int | None, str]:
    """errno and text of a failed write: the OSError itself or the one behind it (torch.save raises a RuntimeError
    in its context when writing to a file object; safetensors quotes 'os error N' in its message)."""
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.errno, cause.strerror
    code = re.search(r"os error (\d+)", str(error))
    if code:
        return int(code[1]), os.strerror(int(code[1]))
    return None, str(error)


# ---- strict key checking ------------------------------------------------------------------------------------------
def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _lines(items: list[str]) -> list[str]:
    more = [f"    ... and {len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED else []
    return [f"    {item}" for item in items[:MAX_LISTED]] + more


def check_keys(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    source: str | Path,
    what: str,
    origin: dict[str, str] | None = None,
) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys unless ``found`` matches exactly.

    ``origin`` optionally says, per found key, where it came from (file and original key name).
    """
    origin = origin or {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or misshaped):
        return
    at = {k: f"  [{origin[k]}]" if k in origin else "" for k in found}
    lines = [f"{source}: {what} do not match the model"]
    if missing:
        lines += ["  missing keys:", *_lines(missing)]
    if unexpected:
        lines += ["  unexpected keys:", *_lines([f"{k}{at[k]}" for k in unexpected])]
    if misshaped:
        lines += ["  mis-shaped keys (file shape vs model shape):"]
        lines += _lines([f"{k}: {tuple(found[k])} vs {tuple(expected[k])}{at[k]}" for k in misshaped])
    raise CheckpointError("\n".join(lines))


def base_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the frozen LLaMA weights (Meta names): no adapter tensors, no visual tower."""
    return {
        n: tuple(t.shape) for n, t in model.state_dict().items() if not is_trainable(n) and not n.startswith("visual.")
    }


# ---- base checkpoints ---------------------------------------------------------------------------------------------
BASE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
"""The floating-point dtypes accepted for base weights, under their safetensors names."""


@dataclass
class _Entry:
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


@dataclass
class BaseCheckpoint:
    """A base model directory opened lazily: its architecture and its weights under Meta names."""

    path: Path
    format: Literal["meta", "hf"]
    config_file: str  # params.json / config.json, named in errors
    llama: LlamaConfig
    entries: dict[str, _Entry]

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
                f"found {_listing(not_float)}"
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


def detect_base_format(path: Path) -> Literal["meta", "hf"]:
    """``meta`` for params.json + consolidated.*.pth, ``hf`` for config.json + weights; else CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: base weights must be a directory (Meta or Hugging Face layout)")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").is_file() and _hf_weight_files(path)[1]:
        return "hf"
    raise CheckpointError(
        f"{path}: neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a Hugging Face one "
        "(config.json + model.safetensors / pytorch_model.bin, optionally sharded with *.index.json); "
        f"found {sorted(p.name for p in path.iterdir())[:MAX_LISTED]}"
    )


def open_base(path: str | Path) -> BaseCheckpoint:
    """Open a Meta or Hugging Face base directory (format detected from the files present)."""
    path = Path(path)
    return _open_meta(path) if detect_base_format(path) == "meta" else _open_hf(path)


# Meta model-parallel shards: the axis each weight was split along (fairscale Column/RowParallelLinear and
# ParallelEmbedding); norms are replicated. Read from the transformers converter's concatenation axes.
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _merge_shards(shards: list[dict[str, Tensor]], name: str, dim: int | None) -> Tensor:
    return shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)


def _open_meta(path: Path) -> BaseCheckpoint:
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
            raise CheckpointError(f"{f}: model-parallel shard keys differ from {files[0].name}: {_listing(diff)}")
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
        n: _Entry(
            f"{origin}: {n}",
            merged_shape(n),
            shards[0][n].dtype,
            functools.partial(_merge_shards, shards, n, split_dim(n)),
        )
        for n in names
    }
    return BaseCheckpoint(path, "meta", params_file.name, llama, entries)


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
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def hf_to_meta_name(name: str) -> str | None:
    """Meta key for a Hugging Face LlamaForCausalLM key (None if it has no Meta counterpart)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER_KEY.fullmatch(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.weight"
    return None


def hf_rows_to_meta(weight: Tensor, n_heads: int) -> Tensor:
    """Undo the converter's q/k row permutation: per head, HF rows [evens..., odds...] back to Meta's pairs.

    HF RoPE rotates halves (x[j], x[j + hd/2]); Meta rotates adjacent pairs (x[2j], x[2j+1]). HF row j is Meta
    row 2j and HF row j + hd/2 is Meta row 2j + 1 (reference/data_formats.md §4.4).
    """
    out_features, in_features = weight.shape
    half = out_features // n_heads // 2
    per_head = weight.view(n_heads, 2, half, in_features)  # (nh, [even|odd], hd/2, dim)
    return per_head.transpose(1, 2).reshape(out_features, in_features)  # rows 2j, 2j+1 adjacent again


def _hf_weight_files(path: Path) -> tuple[Path | None, dict[Path, list[str] | None]]:
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
                raise CheckpointError(f"{index}: shard files listed but absent: {_listing(absent)}")
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


def _open_hf(path: Path) -> BaseCheckpoint:
    config_file = path / "config.json"
    cfg = read_json(config_file)
    llama = hf_config_to_llama(cfg, config_file)
    # q rows are permuted per query head, k rows per key/value head (GQA).
    permuted = {"attention.wq.weight": llama.n_heads, "attention.wk.weight": llama.n_kv_heads}
    entries: dict[str, _Entry] = {}
    index, files = _hf_weight_files(path)
    for file_path, listed in files.items():
        file = _WeightFile(file_path)
        held = file.keys()
        not_held = sorted(set(listed or ()) - set(held))
        if not_held:
            raise CheckpointError(f"{index}: names {file_path.name} for keys it does not hold: {_listing(not_held)}")
        for key in listed or held:  # each key from the file the index names for it
            if key.endswith("rotary_emb.inv_freq"):  # buffer written by old transformers, recomputed by us
                continue
            name = hf_to_meta_name(key) or key  # unknown keys keep their name and surface as unexpected
            heads = permuted.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
            load = functools.partial(_read_hf_tensor, file, key, heads)
            entries[name] = _Entry(f"{file.path.name}: {key}", file.shape(key), file.dtype(key), load)
    if "output.weight" not in entries and cfg.get("tie_word_embeddings") and "tok_embeddings.weight" in entries:
        emb = entries["tok_embeddings.weight"]
        entries["output.weight"] = dataclasses.replace(emb, alias="tok_embeddings.weight")
    return BaseCheckpoint(path, "hf", config_file.name, llama, entries)


# ---- weights without a checkpoint -----------------------------------------------------------------------------------
def init_random_base(model: Transformer, *, seed: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Random frozen weights for a preset: N(0, 0.02) matrices and unit norms, drawn on the CPU from ``seed``;
    return their ``weights_fingerprint`` (None on the meta device, where nothing is drawn).

    Drawing on the CPU makes the weights identical on every device, so an adapter trained on a random preset
    on a GPU still fits the same preset loaded on a CPU.
    """
    if device.type == "meta":
        return None
    gen = torch.Generator().manual_seed(seed)
    sampled = fingerprinted_weights(model.config.llama)
    state, samples = {}, {}
    for name, shape in base_shapes(model).items():
        if name.endswith("norm.weight"):
            value = torch.ones(shape)
        else:
            value = torch.empty(shape).normal_(0.0, INIT_STD, generator=gen)
        if name in sampled:
            samples[name] = fingerprint_sample(value)
        state[name] = value.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    return weights_fingerprint(samples)


def init_fresh_adapter(model: Transformer, *, seed: int, device: torch.device) -> None:
    """Materialize the LLaMA adapter tensors (not the visual projector) as a fresh zero-init adapter, in fp32.

    Same init as model/llama.py: prompts N(0, 1) like the official nn.Embedding, gates 0, so the model starts as
    exactly the base model. fp32 because they are the trained master weights (the forward casts them).
    """
    if device.type == "meta":
        return
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if is_trainable(name) and not name.startswith("visual."):
            value = torch.randn(p.shape, generator=gen) if name.endswith("adapter_prompt") else torch.zeros(p.shape)
            state[name] = value.to(device)
    model.load_state_dict(state, strict=False, assign=True)


def check_materialized(model: Transformer) -> None:
    """Every parameter and buffer must have left the meta device after loading."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {_listing(left)}")


# ---- our adapter files ----------------------------------------------------------------------------------------------
FINGERPRINT_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")


def base_fingerprint(llama: LlamaConfig) -> dict[str, int]:
    """The architecture an adapter fits: shapes of the frozen base, vocabulary included."""
    return {f: getattr(llama, f) for f in FINGERPRINT_FIELDS}


def _describe(fp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fp.get(k)}" for k in FINGERPRINT_FIELDS)


def adapter_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, sidecar) for an adapter file ``x.safetensors`` (sidecar ``x.json``) or a directory holding one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / ADAPTER_FILE, path / ADAPTER_SIDECAR


def _path_or_name(value: str | Path | None) -> str | None:
    """Existing paths are recorded absolute (the run directory may be read from elsewhere); names as given."""
    if value is None:
        return None
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


def save_adapter(
    model: Transformer,
    path_or_dir: str | Path,
    *,
    base: str | Path,
    tokenizer: str | Path | None = None,
    clip_weights: str | Path | None = None,
    prompt_format: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the trainable tensors (safetensors) and the JSON sidecar, both or neither; return the tensor file.

    ``path_or_dir``: a ``.safetensors`` path (sidecar beside it, ``.json``) or a directory (``adapter.safetensors``
    + ``adapter.json``). ``base``: preset name or base directory; ``extra``: free-form JSON-able metadata.
    The sidecar records the base's architecture and, for a model from ``load_model``, its content fingerprint
    (``weights_fingerprint``). Raises WriteError naming the file that could not be written.
    """
    tensor_path, sidecar_path = adapter_paths(path_or_dir)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in model.adapter_state_dict().items()}
    sidecar = {
        "version": SIDECAR_VERSION,
        "model_config": model.config.to_dict(),
        "base": _path_or_name(base),
        "tokenizer": _path_or_name(tokenizer),
        "clip_weights": _path_or_name(clip_weights),
        "prompt_format": prompt_format,
        "base_fingerprint": base_fingerprint(model.config.llama),
        "base_weights_fingerprint": model.base_weights_fingerprint,
        "extra": extra or {},
    }
    text = json.dumps(sidecar, indent=2) + "\n"  # fails before anything is written if extra is not JSON-able
    atomic_write_files(
        {
            tensor_path: lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
            sidecar_path: lambda tmp: tmp.write_text(text),
        }
    )
    return tensor_path


@dataclass
class AdapterWeights:
    """Trainable tensors under our names, the configs they need, and where they came from."""

    tensors: dict[str, Tensor]
    adapter: AdapterConfig
    visual: VisualConfig | None
    source: Path
    sidecar: dict[str, Any] | None = None  # our own format only


def read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    """Our adapter sidecar, validated enough to build a model from it."""
    if not sidecar_path.is_file():
        raise CheckpointError(f"{sidecar_path}: adapter sidecar not found (written by save_adapter beside the tensors)")
    sidecar = read_json(sidecar_path)
    for key in ("model_config", "base_fingerprint"):
        if not isinstance(sidecar.get(key), dict):
            raise CheckpointError(f"{sidecar_path}: field {key!r} is missing or not an object")
    return sidecar


def read_adapter(path: str | Path) -> AdapterWeights:
    """Our adapter (file or directory) with its sidecar; not yet checked against any model."""
    tensor_path, sidecar_path = adapter_paths(path)
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path}: adapter file not found")
    sidecar = read_sidecar(sidecar_path)
    try:
        config = ModelConfig.from_dict(sidecar["model_config"])
    except ConfigError as e:
        raise CheckpointError(f"{sidecar_path}: field model_config.llama.{e.field}: {e.problem}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{sidecar_path}: invalid model_config ({e!r})") from e
    return AdapterWeights(load_safetensors(tensor_path), config.adapter, config.visual, tensor_path, sidecar)


def check_fingerprint(weights: AdapterWeights, llama: LlamaConfig, base_name: str) -> None:
    """CheckpointError naming both architectures unless the adapter was made for this base's architecture."""
    recorded = weights.sidecar["base_fingerprint"] if weights.sidecar else None
    if recorded is not None and recorded != base_fingerprint(llama):
        raise CheckpointError(
            f"{weights.source}: adapter was trained for another architecture:\n"
            f"  adapter base ({weights.sidecar.get('base')}): {_describe(recorded)}\n"
            f"  this base ({base_name}): {_describe(base_fingerprint(llama))}"
        )


def check_base_weights(weights: AdapterWeights, fingerprint: str | None, base_name: str, *, strict: bool) -> None:
    """Warn (BaseWeightsWarning), or with ``strict`` raise CheckpointError, when the adapter was trained on a base
    whose weights differ from this one's (``fingerprint``, see ``weights_fingerprint``) although the shapes match.

    Silent when either side has no content fingerprint: adapters saved before it was recorded, models whose
    weights were not loaded by ``load_model``.
    """
    recorded = weights.sidecar.get("base_weights_fingerprint") if weights.sidecar else None
    if recorded is None or fingerprint is None or recorded == fingerprint:
        return
    message = (
        f"{weights.source}: adapter was trained on base {weights.sidecar.get('base')}, whose weights differ from "
        f"those of this base ({base_name}) although the shapes match; its outputs will not be the trained ones"
    )
    if strict:
        raise CheckpointError(message)
    warnings.warn(f"{message} (strict_base=True refuses this)", BaseWeightsWarning, stacklevel=3)


def load_trainable(model: Transformer, weights: AdapterWeights) -> None:
    """Strictly load trainable tensors into ``model`` (values cast to each parameter's dtype)."""
    adapter_fields = ("prompt_len", "n_layers", "gate_fn")
    ours, theirs = model.config.adapter, weights.adapter
    if any(getattr(ours, f) != getattr(theirs, f) for f in adapter_fields):
        raise CheckpointError(
            f"{weights.source}: adapter config {dataclasses.asdict(theirs)} differs from the model's "
            f"{dataclasses.asdict(ours)}"
        )
    if (weights.visual is None) != (model.visual is None):
        have = "has a visual path" if weights.visual else "is text-only"
        raise CheckpointError(
            f"{weights.source}: the adapter {have} (visual={weights.visual}) but the model "
            f"{'has none' if model.visual is None else 'has one'}; pass clip=<model name> only for visual adapters"
        )
    params = dict(model.trainable_parameters())
    check_keys(
        {n: tuple(p.shape) for n, p in params.items()},
        {n: tuple(t.shape) for n, t in weights.tensors.items()},
        weights.source,
        "adapter tensors",
    )
    with torch.no_grad():
        for name, tensor in weights.tensors.items():
            if not params[name].is_meta:
                params[name].copy_(tensor)


def load_adapter(model: Transformer, path: str | Path, *, strict_base: bool = False) -> dict[str, Any]:
    """Load our adapter (file or directory) into ``model`` strictly; return its sidecar.

    Fails with CheckpointError when the sidecar's base fingerprint or adapter config differs from the model's,
    or when any key is missing, unexpected or mis-shaped. An adapter trained on other base weights of the same
    shapes warns (BaseWeightsWarning), or fails under ``strict_base`` (see ``check_base_weights``).
    """
    weights = read_adapter(path)
    check_fingerprint(weights, model.config.llama, "the model")
    check_base_weights(weights, model.base_weights_fingerprint, "the model", strict=strict_base)
    load_trainable(model, weights)
    return weights.sidecar


# ---- importers ----------------------------------------------------------------------------------------------------
def read_official_v1(
    path: str | Path,
    llama: LlamaConfig,
    *,
    prompt_len: int = 10,
    gate_fn: Literal["tanh", "raw"] = "tanh",
) -> AdapterWeights:
    """The official LLaMA-Adapter V1 release file (``llama_adapter_len10_layer30_release.pth``) as our tensors.

    Layout: ``adapter_query.weight`` (L*K, dim), the prompts of the top L layers in order, and
    ``layers.N.attention.gate`` per layer, (1, n_heads, 1, 1) per head or (1,) one scalar (the first release, before
    commit fa65dbc) broadcast to every head. L = rows / K. Gates of the bottom, non-adapted layers are in the file
    too; they never trained, so they must be zero.

    gate_fn: the official training code scales by tanh(gate) while its released inference code (llama/model.py)
    multiplies by the raw gate (issue #39). We default to "tanh", the semantics the weights were trained under;
    pass "raw" to reproduce the released inference code.
    """
    path = Path(path)
    state = {k: v.float() for k, v in torch_load(path).items()}
    if "adapter_query.weight" not in state:
        raise CheckpointError(f"{path}: no 'adapter_query.weight'; not an official LLaMA-Adapter V1 file")
    query = state.pop("adapter_query.weight")
    rows = query.shape[0]
    if query.ndim != 2 or query.shape[1] != llama.dim or rows % prompt_len:
        raise CheckpointError(
            f"{path}: adapter_query.weight has shape {tuple(query.shape)}; expected (L*{prompt_len}, {llama.dim})"
        )
    n_adapted = rows // prompt_len
    if n_adapted > llama.n_layers:
        raise CheckpointError(f"{path}: {n_adapted} adapted layers but the base has only {llama.n_layers}")
    first = llama.n_layers - n_adapted
    prompts = query.view(n_adapted, prompt_len, llama.dim)  # (L, K, dim): slice i feeds layer first + i
    tensors = {f"layers.{first + i}.attention.adapter_prompt": prompts[i].clone() for i in range(n_adapted)}
    gate_key = re.compile(r"layers\.(\d+)\.attention\.gate")
    unexpected = [k for k in state if not gate_key.fullmatch(k)]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys for an official V1 file: {_listing(sorted(unexpected))}")
    for key, gate in state.items():
        layer = int(gate_key.fullmatch(key).group(1))
        if gate.numel() not in (1, llama.n_heads):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(gate.shape)}; expected (1, {llama.n_heads}, 1, 1) or (1,)"
            )
        if layer >= llama.n_layers:
            raise CheckpointError(f"{path}: {key} names layer {layer} but the base has {llama.n_layers} layers")
        if layer < first:
            if gate.any():
                raise CheckpointError(f"{path}: {key} is non-zero but layer {layer} carries no prompts")
            continue
        tensors[f"layers.{layer}.attention.adapter_gate"] = gate.flatten().expand(llama.n_heads).clone()
    adapter = AdapterConfig(prompt_len=prompt_len, n_layers=n_adapted, gate_fn=gate_fn)
    return AdapterWeights(tensors, adapter, None, path)


_PEFT_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.adaption_(prompt|gate)")


def read_peft(path: str | Path, llama: LlamaConfig) -> AdapterWeights:
    """A PEFT adaption-prompt directory (adapter_config.json + adapter_model.safetensors / .bin) as our tensors.

    PEFT keeps one prompt (1, K, hidden) and ONE raw scalar gate (1,) per adapted layer, applied without tanh:
    the imported model uses gate_fn="raw" with the scalar copied to every head, which computes the same output.
    """
    path = Path(path)
    config_file = path / "adapter_config.json"
    cfg = read_json(config_file)
    if cfg.get("peft_type") != "ADAPTION_PROMPT":
        raise CheckpointError(f"{config_file}: peft_type={cfg.get('peft_type')!r}; only ADAPTION_PROMPT is supported")
    if cfg.get("target_modules", "self_attn") != "self_attn":
        raise CheckpointError(f"{config_file}: target_modules={cfg['target_modules']!r}; expected 'self_attn'")
    try:
        adapter = AdapterConfig(prompt_len=int(cfg["adapter_len"]), n_layers=int(cfg["adapter_layers"]), gate_fn="raw")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: invalid adaption-prompt config ({e!r})") from e
    if adapter.n_layers > llama.n_layers:
        raise CheckpointError(f"{config_file}: adapter_layers={adapter.n_layers} but the base has {llama.n_layers}")
    if (path / "adapter_model.safetensors").is_file():
        weight_file = path / "adapter_model.safetensors"
        state = load_safetensors(weight_file)
    elif (path / "adapter_model.bin").is_file():
        weight_file = path / "adapter_model.bin"
        state = torch_load(weight_file)
    else:
        raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            tensors[key] = value  # surfaces as an unexpected key in the strict check
        elif m.group(2) == "prompt":
            prompt = value.float().squeeze(0)  # (1, K, dim) -> (K, dim)
            tensors[f"layers.{m.group(1)}.attention.adapter_prompt"] = prompt
        elif value.numel() != 1:
            raise CheckpointError(f"{weight_file}: {key} has shape {tuple(value.shape)}; PEFT gates are (1,)")
        else:
            tensors[f"layers.{m.group(1)}.attention.adapter_gate"] = value.float().reshape(1).expand(llama.n_heads)
    return AdapterWeights(tensors, adapter, None, weight_file)


def open_adapter(
    path: str | Path, llama: LlamaConfig, *, official_gate_fn: Literal["tanh", "raw"] = "tanh"
) -> AdapterWeights:
    """Detect and read an adapter: ours (``.safetensors`` file or directory with ``adapter.safetensors``), a PEFT
    directory (``adapter_config.json``) or an official V1 file (``.pth``)."""
    path = Path(path)
    if path.is_dir():
        if (path / ADAPTER_FILE).is_file():
            return read_adapter(path)
        if (path / "adapter_config.json").is_file():
            return read_peft(path, llama)
        raise CheckpointError(
            f"{path}: no {ADAPTER_FILE} (our adapter / run directory) and no adapter_config.json (PEFT adaption prompt)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter not found")
    if path.suffix == ".safetensors":
        return read_adapter(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        return read_official_v1(path, llama, gate_fn=official_gate_fn)
    raise CheckpointError(f"{path}: unknown adapter format (expected .safetensors, .pth or a directory)")

"""Meta's base layout: params.json + consolidated.NN.pth, model-parallel shards merged per weight, checked against
Meta's checklist.chk (md5 of each file) when the directory holds one."""

from __future__ import annotations

import functools
import hashlib
import re
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


CHECKLIST_FILE = "checklist.chk"
_CHECKLIST_MAX_BYTES = 1 << 16  # Meta's lists a few lines; a larger file is no checklist
_CHECKLIST_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")  # md5sum's format: text (two spaces) or binary (" *")
_HASH_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks (no whole-file buffer)."""
    digest, chunk = hashlib.md5(usedforsecurity=False), bytearray(_HASH_CHUNK)  # an integrity check, not security
    view = memoryview(chunk)
    with open(path, "rb") as f:
        while n := f.readinto(chunk):
            digest.update(view[:n])
    return digest.hexdigest()


def read_checklist(path: Path) -> dict[str, str]:
    """File name -> md5 from a checklist.chk (``md5sum`` output: ``<md5 hex>  <name>`` per line); CheckpointError
    naming the file and line for anything else, a name outside the directory included."""
    try:
        size = path.stat().st_size
        if size > _CHECKLIST_MAX_BYTES:
            raise CheckpointError(f"{path}: {size:,} bytes; a checklist of md5 sums is a few lines")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _CHECKLIST_LINE.fullmatch(line)
        if match is None:
            raise CheckpointError(f"{path}:{number}: expected '<md5 hex>  <file name>', got {line[:80]!r}")
        name = match[2]
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{path}:{number}: {name!r} is not a file name in this directory")
        sums[name] = match[1].lower()
    return sums


def verify_checklist(path: Path, shards: list[Path]) -> None:
    """The md5 of every file Meta's checklist.chk lists (params.json, consolidated.NN.pth) against the file, before
    anything is loaded: CheckpointError naming the first file that differs or is missing, or a shard the checklist
    does not list. Nothing is checked when the directory holds no checklist.chk."""
    checklist = path / CHECKLIST_FILE
    if not checklist.is_file():
        return
    sums = read_checklist(checklist)
    unlisted = [f.name for f in shards if f.name not in sums]
    if unlisted:
        raise CheckpointError(f"{checklist}: does not list {listing(unlisted)}; is the checklist of another model?")
    for name in sums:  # every file first, before minutes of hashing
        if not (path / name).is_file():  # also a FIFO or device named like a weight file: never read
            raise CheckpointError(f"{path / name}: listed in {CHECKLIST_FILE} but missing (or not a regular file)")
    for name, expected in sums.items():
        file = path / name
        found = file_md5(file)
        if found != expected:
            raise CheckpointError(
                f"{file}: md5 {found} differs from {expected} in {CHECKLIST_FILE}; the file is damaged or "
                "incomplete (download it again)"
            )


def open_meta(path: Path, *, verify_checksums: bool = True) -> BaseCheckpoint:
    """A Meta base directory (params.json + consolidated.NN.pth) opened lazily; with ``verify_checksums`` its files
    are checked against its checklist.chk first, when it has one (``verify_checklist``)."""
    params_file = path / "params.json"
    files = sorted(path.glob("consolidated.*.pth"))
    if verify_checksums:
        verify_checklist(path, files)
    params = read_json(params_file)
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{params_file}: use_scaled_rope (LLaMA-3.1 RoPE scaling) is not supported")
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

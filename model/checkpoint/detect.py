"""Which layout a base directory has (Meta or Hugging Face), and opening it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from model.checkpoint.base import BaseCheckpoint
from model.checkpoint.files import CheckpointError
from model.checkpoint.hf import hf_weight_files, open_hf
from model.checkpoint.keys import MAX_LISTED
from model.checkpoint.meta import open_meta


def detect_base_format(path: Path) -> Literal["meta", "hf"]:
    """``meta`` for params.json + consolidated.*.pth, ``hf`` for config.json + weights; else CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: base weights must be a directory (Meta or Hugging Face layout)")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").is_file() and hf_weight_files(path)[1]:
        return "hf"
    raise CheckpointError(
        f"{path}: neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a Hugging Face one "
        "(config.json + model.safetensors / pytorch_model.bin, optionally sharded with *.index.json); "
        f"found {sorted(p.name for p in path.iterdir())[:MAX_LISTED]}"
    )


def open_base(path: str | Path, *, verify_checksums: bool = True) -> BaseCheckpoint:
    """Open a Meta or Hugging Face base directory (format detected from the files present); ``verify_checksums``:
    a Meta directory's files are checked against its checklist.chk first, when it has one."""
    path = Path(path)
    if detect_base_format(path) == "meta":
        return open_meta(path, verify_checksums=verify_checksums)
    return open_hf(path)

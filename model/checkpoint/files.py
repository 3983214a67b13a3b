"""Reading and writing checkpoint files, with one error type each way.

Reading: JSON objects, PyTorch state dicts (``weights_only=True`` always, memory-mapped when the file allows it)
and safetensors. Every problem with a file raises ``CheckpointError`` naming the file, never a stack trace from
torch.

Writing: ``atomic_write`` / ``atomic_write_files`` (temporary file, fsync, rename, directory fsync) and
``append_text`` for append-only logs. Every failed write raises ``WriteError`` naming the file, and leaves its
previous version intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, unreadable or does not match the model."""


class WriteError(OSError):
    """A file could not be written (disk full, no permission, I/O error); its previous version is unchanged.

    ``path`` is the file; ``errno`` the OS error number when one is known.
    """

    def __init__(self, path: Path, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.path, self.errno = path, errno


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or CheckpointError naming the file (also for nesting deeper than Python's
    recursion limit, where ``json`` raises RecursionError)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to read (lists / objects inside each other)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def torch_load_object(path: Path) -> Any:
    """Whatever a PyTorch file holds, read with ``weights_only=True`` always (tensors, dicts, lists, numbers),
    memory-mapped when the file allows it."""
    # mmap needs the zip format (torch >= 1.6); the legacy pickle format is read into memory.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises OSError, RuntimeError or UnpicklingError depending on the damage
        refusal = weights_only_refusal(e)
        if refusal is not None:
            raise CheckpointError(f"{path}: {refusal}") from None
        raise CheckpointError(f"{path}: cannot read PyTorch weights, file truncated or corrupt? ({e})") from e


def torch_load(path: Path, obj: Any = None) -> dict[str, Tensor]:
    """A flat state dict from a PyTorch file (``torch_load_object``; ``obj``: what it already read)."""
    if obj is None:
        obj = torch_load_object(path)
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


def check_writable(folder: Path, purpose: str) -> None:
    """WriteError naming ``folder`` unless files can be created in it (or, when it does not exist yet, in the nearest
    folder above it that does, where it would be made): what a read-only mount or a folder without write permission
    refuses, found before any work is done and leaving nothing behind. A real file is created and removed, since
    permission bits say nothing for root (``os.access`` answers yes)."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise WriteError(folder, f"{folder}: cannot write into this folder ({reason}); {purpose}", e.errno) from e


_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # mkstemp's name in atomic_write_files: .<name>.<8 chars>.tmp


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove the temporary files an atomic write killed before its rename left in ``folder`` (not below it); their
    names. Only for folders one process writes (a run directory at the start of its resume)."""
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):
        if _TEMP_NAME.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def check_output_dir(path: Path, names: Iterable[str]) -> None:
    """CheckpointError unless ``path`` is absent, empty or holds only files named ``names`` (an earlier export of
    the same kind): a stale weight file or shard index beside new files could be read in their place."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    names = set(names)
    others = sorted(p.name for p in path.iterdir() if p.name not in names) if path.is_dir() else []
    if others:
        raise CheckpointError(f"{path}: holds other files ({', '.join(others[:8])}); write into a new or empty folder")


def write_text_atomic(path: Path, text: str) -> None:
    """``atomic_write`` of UTF-8 text (JSON files, configs)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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

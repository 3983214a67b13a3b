"""Readers of the real dataset formats, prompt templates, batching, and synthetic data in the same formats.

- ``data.scienceqa``: the official ScienceQA layout (problems.json, pid_splits.json, images/) and the Hugging Face
  copy (save_to_disk or parquet); prompt formats (LLaMA-Adapter default, QCM-A, QCM-LEA, ...).
- ``data.coco``: COCO captions from the Karpathy split file or the official captions_*.json annotations.
- ``data.alpaca``: alpaca_data.json with the two exact Alpaca templates.
- ``data.collate``: ``Example`` -> token / label / image tensors (loss on the response and its EOS only).
- ``data.synthetic``: small datasets written in exactly those formats, and a tiny sentencepiece tokenizer.

``data`` may use the tokenizer interface of ``model`` (passed in, never imported here) and never imports
``model/visual.py``: images are turned into tensors by an injected ``image_transform``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset file or record that cannot be used; the message names the file and the record."""


def read_json(path: Path) -> Any:
    """Parse a JSON file; errors name the file (and line / column for invalid JSON).

    Refused with a DataError as well: a key twice in one object (``json`` would keep the last copy silently),
    nesting deeper than Python's recursion limit (``json`` raises RecursionError)
    and a string or key holding a lone surrogate (JSON allows the escape ``"\\ud800"``; it is not Unicode text and
    would fail later in the tokenizer or when the text is written out); that error gives the value's place in the
    file, e.g. ``[17]["output"]``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKeyError as e:
        raise DataError(f"{path}: key {e.key!r} appears twice in one object; which copy is meant is unknown") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read (lists / objects inside each other)") from None
    if _SURROGATE_ESCAPE.search(text):  # the only way a surrogate gets in: strict UTF-8 decoding refuses raw ones
        _refuse_lone_surrogates(path, data)
    return data


class DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: refuse a key given twice in one object (json.loads would silently keep the last), e.g. a
    ScienceQA pid listed twice in problems.json or a pid answered twice in a predictions file."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(key)
        obj[key] = value
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json joins valid escaped pairs, so any one left is alone


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` as an escape (``"\\ud800"``), or None for valid Unicode text."""
    match = _LONE_SURROGATE.search(text)
    return None if match is None else f"\\u{ord(match.group()):04x}"


def _refuse_lone_surrogates(path: Path, data: Any) -> None:
    stack: list[tuple[str, Any]] = [("the top level", data)]  # (place in the file, value); iterative: any depth
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            bad = lone_surrogate(value)
            if bad:
                raise DataError(f"{path}: {where} holds a lone surrogate {bad}, which is not text")
        elif isinstance(value, dict):
            prefix = "" if where == "the top level" else where
            for key, item in reversed(value.items()):
                stack += [(f"{prefix}[{json.dumps(key)}]", item), (f"the key {json.dumps(key)} of {where}", key)]
        elif isinstance(value, list):
            prefix = "" if where == "the top level" else where
            stack += [(f"{prefix}[{i}]", item) for i, item in reversed(list(enumerate(value)))]


class ImageFolder:
    """The folder that image paths named by a data file must stay inside.

    ``path(*parts)`` is ``base / parts``, refused (ValueError, message without the data file) when a part is
    absolute or has a ``..`` component, or when a link under ``base`` leads outside it. ``base`` itself may be a
    link (e.g. an image folder on another disk): containment is checked against the folder it resolves to, once.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        try:
            self.real = base.resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
            raise DataError(f"{base}: cannot be resolved: {e}") from None

    def path(self, *parts: str) -> Path:
        """The plain join ``base / parts`` (not resolved; it need not exist), once it is known to stay inside."""
        names = []
        for part in parts:
            if "\0" in part:
                raise ValueError(f"path {part!r} holds a NUL character")
            if os.path.isabs(part):
                raise ValueError(f"path {part!r} is absolute; it must be relative to {self.base}")
            part_names = part.split(os.sep)
            if ".." in part_names:
                raise ValueError(f"path {part!r} has a '..' component, which would leave {self.base}")
            names += part_names
        joined = self.base.joinpath(*parts)
        # Without '..' or an absolute part only a link can lead outside: resolve only when one is on the way.
        probe = str(self.real)
        for name in names:
            probe = os.path.join(probe, name)
            if os.path.islink(probe):
                break
        else:
            return joined
        try:
            real = self.real.joinpath(*parts).resolve()
        except (OSError, RuntimeError) as e:
            raise ValueError(f"path {joined} cannot be resolved: {e}") from None
        if not real.is_relative_to(self.real):
            raise ValueError(f"path {joined} resolves to {real}, outside {self.real} (a link that leaves the folder)")
        return joined


class InvalidRecords:
    """Invalid records of one file: raise DataError at the first (``skip=False``), or collect them and warn once
    with the count (``skip=True``, the loaders' ``skip_invalid``)."""

    def __init__(self, file: Path, skip: bool) -> None:
        self.file, self.skip, self.errors = file, skip, []

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise DataError(f"{self.file}: {message}")
        self.errors.append(message)

    def warn(self, total: int) -> None:
        """One warning with the number skipped out of ``total`` and the first reason (nothing if none)."""
        if self.errors:
            warnings.warn(
                f"{self.file}: skipped {len(self.errors)} of {total} invalid records (first: {self.errors[0]})",
                stacklevel=3,
            )

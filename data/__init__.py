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
import warnings
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset file or record that cannot be used; the message names the file and the record."""


def read_json(path: Path) -> Any:
    """Parse a JSON file; errors name the file (and line / column for invalid JSON)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


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

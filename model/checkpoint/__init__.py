"""Checkpoint formats: base weights (Meta, Hugging Face), our adapter files, and importers.

- ``files``: ``CheckpointError`` / ``WriteError``; reading JSON, PyTorch (``weights_only``) and safetensors files;
  atomic writes and append-only logs; a folder's writability checked up front.
- ``keys``: the strict key check (missing, unexpected, mis-shaped keys in one error).
- ``base``: ``BaseCheckpoint``, a base opened lazily and loaded strictly; the content fingerprint of its weights.
- ``meta`` / ``hf``: the two base layouts (Meta's checklist.chk verified when present); ``detect``: which one a
  directory holds (``open_base``).
- ``fresh``: weights without a checkpoint (random preset base, zero-init adapter).
- ``adapter``: our adapter format (safetensors + JSON sidecar): save, read, check against a base, load.
- ``importers``: the official LLaMA-Adapter V1 release file, PEFT adaption-prompt directories, ``open_adapter``.
- ``peft_export`` / ``hf_export`` / ``release_v2``: our models written as PEFT directories, merged Hugging Face
  checkpoints and the official V2 release file (``python -m model.export``).
"""

from model.checkpoint.adapter import (
    AdapterWeights,
    BaseWeightsWarning,
    adapter_paths,
    check_base_weights,
    check_fingerprint,
    init_trainable,
    load_adapter,
    load_trainable,
    save_adapter,
)
from model.checkpoint.detect import detect_base_format, open_base
from model.checkpoint.files import (
    CheckpointError,
    WriteError,
    append_text,
    atomic_write,
    check_writable,
    read_json,
    remove_stale_temps,
    weights_only_refusal,
    write_text_atomic,
)
from model.checkpoint.fresh import check_materialized, init_fresh_adapter, init_random_base
from model.checkpoint.hf import hf_rows_to_meta
from model.checkpoint.importers import open_adapter, read_official_v1
from model.checkpoint.keys import check_keys

__all__ = [
    "AdapterWeights",
    "BaseWeightsWarning",
    "CheckpointError",
    "WriteError",
    "adapter_paths",
    "append_text",
    "atomic_write",
    "check_base_weights",
    "check_fingerprint",
    "init_trainable",
    "check_keys",
    "check_materialized",
    "check_writable",
    "detect_base_format",
    "hf_rows_to_meta",
    "init_fresh_adapter",
    "init_random_base",
    "load_adapter",
    "load_trainable",
    "open_adapter",
    "open_base",
    "read_json",
    "read_official_v1",
    "remove_stale_temps",
    "save_adapter",
    "weights_only_refusal",
    "write_text_atomic",
]

"""The key / value cache of incremental decoding (model/llama.py): per-layer buffers, which slots hold real tokens,
and the PEFT method's per-sequence state."""

from __future__ import annotations

from typing import Any

import torch

from model.config import LlamaConfig


class KVCache:
    """Per-layer key/value buffers for incremental decoding, plus the method's state computed once per sequence.

    ``key_valid`` (B, max_len) marks which cache slots hold real tokens (False for left padding). The first
    ``n_soft`` slots hold the method's soft tokens (``Method.soft_tokens``), before any padding.
    """

    def __init__(
        self, cfg: LlamaConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device, n_soft: int = 0
    ):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.n_soft = n_soft
        self.reset()

    def reset(self) -> None:
        """Empty again for a new batch of sequences, keeping the buffers (and so their addresses, which a CUDA graph
        of ``Transformer.decode_step`` has baked in). Stale keys stay in the buffers, masked until overwritten."""
        self.key_valid.fill_(True)
        self.padded = False  # True once some slot is marked invalid: single-token steps then need a mask
        self.method_state: Any = None  # Method.sequence_state of this sequence (set by the first forward)
        self.length = 0  # slots filled, soft tokens included

    def mark_padding(self, row: int, n_slots: int) -> None:
        """The ``n_slots`` cache slots of ``row`` after the soft tokens hold left padding: no query may attend to
        them."""
        if n_slots > 0:
            self.key_valid[row, self.n_soft : self.n_soft + n_slots] = False
            self.padded = True

"""The training loss of the language model: next-token cross-entropy summed over the supervised targets, computed a
chunk of tokens at a time so that no full-vocabulary logits of the whole batch ever exist.

Why chunks: at LLaMA's 32,000-token vocabulary the fp32 logits of a batch outweigh everything else a PEFT step
keeps (8 x 512 tokens: 0.5 GiB of logits, again for their log-softmax, again for the gradient), while the frozen
base's activations are small next to them. Each chunk's final norm -> output projection -> cross-entropy runs
under a checkpoint: the forward pass keeps only the chunk's hidden states and drops its logits, and the backward
pass recomputes them, one chunk at a time. Only the positions with a target are projected at all (a prompt's tokens
have none), which saves their compute too. The sum is the same as one ``cross_entropy`` over the whole batch (up to
the order of fp32 additions) and so are the gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
"""The label of a position with no target: PyTorch's ``cross_entropy`` default, the value data.collate writes."""


def next_token_loss(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor], chunk: int = 0) -> Tensor:
    """fp32 sum over the targets of -log p(label[t + 1] | hidden[t]), where ``head`` maps hidden states (N, dim)
    to logits (N, vocab).

    hidden (B, T, dim): the last block's output at the caller's tokens; labels (B, T): token ids, IGNORE_INDEX where
    there is no target. chunk: targets per piece (0: all in one piece, nothing recomputed).
    """
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the tokens' {tuple(hidden.shape[:2])}")
    if chunk < 0:
        raise ValueError(f"loss_chunk must be >= 0, got {chunk}")
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    supervised = targets != IGNORE_INDEX  # (B, T-1)
    h = hidden[:, :-1][supervised]  # (N, dim): only the positions with a target
    y = targets[supervised]  # (N,)

    def piece_loss(h_piece: Tensor, y_piece: Tensor) -> Tensor:
        logits = head(h_piece).float()  # (n, vocab): in the autocast dtype, the loss in fp32
        return F.cross_entropy(logits, y_piece, reduction="sum")

    n = h.shape[0]
    if chunk == 0 or n <= chunk:
        return piece_loss(h, y)
    recompute = torch.is_grad_enabled()  # without a backward pass there is nothing to keep, so nothing to recompute
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk):
        h_piece, y_piece = h[start : start + chunk], y[start : start + chunk]  # (n, dim), (n,)
        if recompute:
            total = total + checkpoint(piece_loss, h_piece, y_piece, use_reentrant=False)
        else:
            total = total + piece_loss(h_piece, y_piece)
    return total

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
    h, y = supervised(hidden, labels, chunk)

    def piece_loss(h_piece: Tensor, y_piece: Tensor) -> Tensor:
        logits = head(h_piece).float()  # (n, vocab): in the autocast dtype, the loss in fp32
        return F.cross_entropy(logits, y_piece, reduction="sum")

    return sum_in_chunks(piece_loss, (h, y), chunk)


def symmetric_kl(
    hidden_a: Tensor, hidden_b: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor], chunk: int = 0
) -> Tensor:
    """fp32 sum over the target positions of 1/2 (KL(sg(q) || p) + KL(sg(p) || q)), p and q the next-token
    distributions of two passes (hidden states (B, T, dim) each) and sg a stop-gradient: each pass is pulled towards
    the other as a fixed target (AdaMix's consistency loss, microsoft/AdaMix ``symmetric_KL_loss``; it averages over
    the targets where this sums, the trainer divides by the target count)."""
    h_a, _ = supervised(hidden_a, labels, chunk)
    h_b, _ = supervised(hidden_b, labels, chunk)

    def piece_kl(a: Tensor, b: Tensor) -> Tensor:
        log_p, log_q = F.log_softmax(head(a).float(), -1), F.log_softmax(head(b).float(), -1)  # (n, vocab) each
        kl_qp = F.kl_div(log_p, log_q.detach(), reduction="sum", log_target=True)  # KL(sg(q) || p)
        kl_pq = F.kl_div(log_q, log_p.detach(), reduction="sum", log_target=True)  # KL(sg(p) || q)
        return 0.5 * (kl_qp + kl_pq)

    return sum_in_chunks(piece_kl, (h_a, h_b), chunk)


def supervised(hidden: Tensor, labels: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The hidden states (N, dim) of the positions with a target and their targets (N,); checks the arguments."""
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the tokens' {tuple(hidden.shape[:2])}")
    if chunk < 0:
        raise ValueError(f"loss_chunk must be >= 0, got {chunk}")
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    return hidden[:, :-1][mask], targets[mask]  # (N, dim), (N,): only the positions with a target


def sum_in_chunks(piece: Callable[..., Tensor], rows: tuple[Tensor, ...], chunk: int) -> Tensor:
    """sum of ``piece(*rows[start : start + chunk])`` over the N rows, each piece under a checkpoint when gradients
    are taken (its logits are recomputed in the backward pass); one piece when chunk is 0 or covers N."""
    n = rows[0].shape[0]
    if chunk == 0 or n <= chunk:
        return piece(*rows)
    recompute = torch.is_grad_enabled()  # without a backward pass there is nothing to keep, so nothing to recompute
    total = torch.zeros((), dtype=torch.float32, device=rows[0].device)
    for start in range(0, n, chunk):
        parts = [r[start : start + chunk] for r in rows]  # (n, ...) each
        total = total + (checkpoint(piece, *parts, use_reentrant=False) if recompute else piece(*parts))
    return total

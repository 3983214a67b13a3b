"""Transformer blocks through ``torch.compile`` for training steps (``Transformer.compile_blocks``, from
--train.compile): the same loss and gradients as eager blocks, fused kernels."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.llama import AttentionContext, TransformerBlock


def run_block(layer: TransformerBlock, x: Tensor, ctx: AttentionContext) -> Tensor:
    """One block's forward as a plain function of the block: one compiled function serves every block and model."""
    return layer(x, ctx)


BLOCK_GRAPHS = 256
"""Compiled block graphs one process may hold: torch's default recompile limit (8) is below a model's depth."""


@functools.cache
def _compiled_block() -> Callable[[TransformerBlock, Tensor, AttentionContext], Tensor]:
    return torch.compile(run_block, dynamic=True, fullgraph=True)


def compiled_block(layer: TransformerBlock, x: Tensor, ctx: AttentionContext) -> Tensor:
    """``run_block`` through ``torch.compile`` (``Transformer.compile_blocks``): each block one whole graph.

    One graph per block, not one for all: the methods index their per-layer state by ``layer_idx``, which torch
    specialises on, so every block compiles on the first training step (from the inductor cache in later runs);
    the recompile limit is raised to ``BLOCK_GRAPHS`` meanwhile. ``dynamic=True``: batch and sequence lengths vary
    from step to step without recompiling.
    """
    with torch._dynamo.config.patch(recompile_limit=BLOCK_GRAPHS):
        return _compiled_block()(layer, x, ctx)

"""Optimizer and schedule: AdamW over the trainable tensors, linear warmup then half-cycle cosine, per step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from training.config import OptimArgs


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable tensors only; no decay on 1-D tensors (per-head gates, biases), as timm's param_groups_weight_decay
    in the official code. (The official 4-D gate (1, H, 1, 1) did get decay; ours is (H,) and does not.)"""
    decay, no_decay = [], []
    for _, p in model.trainable_parameters():
        if p.requires_grad:  # optim.trainable may hold some of them still (a phase of the v2 recipe)
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Schedule:
    """Per-step learning rate: linear warmup, then half-cycle cosine down to min_lr (official V1 lr_sched)."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepPlan:
    """How a training set of a given size becomes optimizer steps on ``world`` processes."""

    examples: int
    """Size of the training set."""
    per_rank: int
    """Samples of each process per epoch (the DistributedSampler share, padded)."""
    steps_per_epoch: int
    effective_batch: int
    """Samples per optimizer step, all processes together."""
    schedule: Schedule


def plan_steps(o: OptimArgs, n_examples: int, world: int) -> StepPlan:
    """Steps per epoch, total steps (capped by optim.max_steps) and the learning-rate schedule over them; the peak
    lr is optim.lr, or blr * effective batch / 256."""
    per_rank = math.ceil(n_examples / world)
    steps_per_epoch = math.ceil(per_rank / (o.batch_size * o.grad_accum))
    total_steps = o.epochs * steps_per_epoch if o.max_steps is None else min(o.max_steps, o.epochs * steps_per_epoch)
    effective_batch = o.batch_size * o.grad_accum * world
    peak_lr = o.lr if o.lr is not None else o.blr * effective_batch / 256
    # Warmup keeps its share of the schedule when optim.max_steps shortens it.
    schedule = Schedule(peak_lr, o.min_lr, round(total_steps * o.warmup_epochs / o.epochs), total_steps)
    return StepPlan(n_examples, per_rank, steps_per_epoch, effective_batch, schedule)


def build_optimizer(model: nn.Module, o: OptimArgs, peak_lr: float) -> torch.optim.AdamW:
    """AdamW over the model's trainable tensors (param_groups); the schedule sets the lr of each step."""
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=peak_lr, betas=o.betas, eps=o.eps)


@contextlib.contextmanager
def hold_slices(optimizer: torch.optim.Optimizer, held: list[tuple[nn.Parameter, Tensor]]) -> Iterator[None]:
    """Around an optimizer step: the rows ``indices`` (along the first axis) of each (parameter, indices) in
    ``held`` come out of the step as they went in, values and every optimizer moment of the parameter's shape
    (AdamW's exp_avg, exp_avg_sq): no momentum or weight-decay step on them (``Method.held_in_step``). The step
    count of the parameter still advances."""
    saved = []
    for p, indices in held:
        indices = indices.to(p.device)
        moments = {k: v.index_select(0, indices) for k, v in optimizer.state.get(p, {}).items() if _moment(v, p)}
        saved.append((p, indices, p.detach().index_select(0, indices), moments))
    yield
    with torch.no_grad():
        for p, indices, values, moments in saved:
            p.index_copy_(0, indices, values)
            state = optimizer.state[p]
            for k, v in moments.items():
                state[k].index_copy_(0, indices, v)
            for k, v in state.items():  # moments the step created: zero before it, so zero for the held rows
                if k not in moments and _moment(v, p):
                    v.index_fill_(0, indices, 0)


def _moment(value: Any, p: nn.Parameter) -> bool:
    """Whether an optimizer state entry is a per-value moment of ``p`` (not its step count)."""
    return isinstance(value, Tensor) and value.shape == p.shape

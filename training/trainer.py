"""The trainer: one optimizer step over micro-batches (identical on every process), and the loop of steps with its
stops: a non-finite loss, running out of memory, run.stop_after, and SIGINT / SIGTERM.

Only the trainable tensors (``Transformer.trainable_parameters``) train; the frozen base runs in its dtype (bf16/fp16
on GPU, fp32 on CPU) while the trainable tensors stay fp32 under autocast. The loss of an optimizer step is the token
mean over the whole global batch (every micro-batch of every rank), so a run gives the same updates on 1 or N
processes and with any split into gradient accumulation.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data.collate import IGNORE_INDEX
from training import TrainingError
from training.batching import IndexedCollate, MicroBatch, epoch_steps, step_batches
from training.config import TrainConfig
from training.dist import Dist, all_reduce_sum, average_gradients, is_sharded, leave_together, memory_mib
from training.metrics import StepLog
from training.optim import Schedule, StepPlan, hold_slices
from training.state import Position, save_checkpoint


class StopRequest:
    """A request to stop at the next step boundary with the state saved.

    With ``handle_signals`` (train.py run as a program), SIGINT and SIGTERM make the request while the with-block
    runs, and a second Ctrl-C aborts (KeyboardInterrupt); without it (a library call, a test) the process's signal
    handlers are left alone.
    """

    def __init__(self, handle_signals: bool) -> None:
        self.signal: str | None = None
        self.handle_signals = handle_signals
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this step and saving the state (Ctrl-C again aborts)", file=sys.stderr)


class OutOfMemory(TrainingError):
    """Out of memory in the forward or backward pass (the parameters are still those of the last step)."""


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is the allocator running out of memory (CUDA, or the CPU allocator)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)  # CPU allocator
    )


@dataclass
class StepResult:
    """What one optimizer step did, agreed between all processes."""

    loss: float
    """Token-mean loss over the global batch."""
    tokens: int
    """Non-padding tokens processed, all processes together."""
    lr: float
    """The learning rate of the step."""
    stop: bool
    """Some process received SIGINT / SIGTERM."""


class Trainer:
    """One optimizer step at a time over micro-batches, identical on every process of the job."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        schedule: Schedule,
        dtype: torch.dtype,
        d: Dist,
        collate: IndexedCollate,
    ) -> None:
        self.cfg, self.model, self.net, self.optimizer, self.scaler = cfg, model, net, optimizer, scaler
        self.schedule, self.dtype, self.d, self.collate = schedule, dtype, d, collate
        self.examples = collate.examples
        self.params = [p for _, p in model.trainable_parameters()]
        self.average_grads = is_sharded(net)  # fsdp: the trainable tensors are replicated, not FSDP's (dist.py)

    def _forward_loss(self, batch: dict[str, Any], denom: float) -> Tensor:
        dev = self.d.device
        tokens = batch["tokens"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        images, mask = batch.get("images"), batch.get("image_mask")
        if images is None and self.model.visual is not None:
            # A micro-batch without images still runs the projection (on blank images, masked out: it adds
            # nothing), so that every step uses every trainable tensor and DDP needs no unused-parameter search.
            size = self.model.visual.image_size
            images, mask = torch.zeros(tokens.shape[0], 3, size, size), torch.zeros(tokens.shape[0], dtype=torch.bool)
        if images is not None:
            images, mask = images.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
        # The model computes the loss itself (the fp32 sum over target tokens, position t predicting token t+1, in
        # chunks of --train.loss_chunk tokens: model/loss.py), inside the call DDP / FSDP wrap. Divided by the
        # global target count it is the global token mean.
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.net(tokens, images, image_mask=mask, labels=labels, loss_chunk=self.cfg.train.loss_chunk)
        return loss / denom

    def step(self, micro: list[MicroBatch], pos: Position, stop: StopRequest) -> StepResult:
        """Forward/backward every micro-batch, check the loss, all-reduce, clip, update."""
        lr = self.schedule.lr(pos.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.method.begin_step(pos.step, self.cfg.run.seed)
        counts = torch.tensor(
            [float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, b in micro))], device=self.d.device
        )
        denom = max(all_reduce_sum(counts, self.d).item(), 1.0)
        loss_sum = torch.zeros((), device=self.d.device)
        bad: tuple[int, list[int], float] | None = None
        n_tokens = 0
        try:
            for j, (indices, batch) in enumerate(micro):
                # Gradients are all-reduced on the last micro-batch only (DDP), or averaged once after it (fsdp); both
                # average over processes, so the loss is scaled by the world size to make the update the gradient of
                # the global token mean.
                no_sync = hasattr(self.net, "no_sync") and j < len(micro) - 1
                with self.net.no_sync() if no_sync else contextlib.nullcontext():
                    loss = self._forward_loss(batch, denom)
                    if bad is None and not torch.isfinite(loss):
                        bad = (j, indices, loss.item())
                    self.scaler.scale(loss * self.d.world).backward()
                loss_sum += loss.detach()
                n_tokens += int(batch["lengths"].sum())
            if self.average_grads:
                average_gradients(self.params, self.d)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise OutOfMemory(self._oom_message(micro, pos)) from None
        flags = torch.stack(
            [
                loss_sum.float(),
                torch.tensor(float(bad is not None), device=self.d.device),
                torch.tensor(float(stop.signal is not None), device=self.d.device),
                torch.tensor(float(n_tokens), device=self.d.device),
            ]
        )
        all_reduce_sum(flags, self.d)
        if flags[1] > 0:
            leave_together(self.d)  # the flag is shared: every rank stops here
            raise TrainingError(self._nonfinite_message(bad, pos, lr, len(micro)))
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        with hold_slices(self.optimizer, self.model.method.held_in_step(self.model)):  # e.g. unrouted experts
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=flags[0].item(), tokens=int(flags[3].item()), lr=lr, stop=bool(flags[2] > 0))

    def _example_ids(self, indices: list[int]) -> list[str]:
        ids = []
        for i in indices:
            meta = getattr(self.examples[i], "meta", None) or {}
            named = next((meta[k] for k in ("pid", "id", "image_id") if k in meta), None)
            ids.append(f"{i}" if named is None else f"{i} ({named})")
        return ids

    def _nonfinite_message(self, bad: tuple[int, list[int], float] | None, pos: Position, lr: float, n: int) -> str:
        where = f"optimizer step {pos.step + 1} (epoch {pos.epoch + 1})"
        if bad is None:
            return f"the loss became non-finite on another process at {where}; see that process's message"
        j, indices, value = bad
        rank = f" on rank {self.d.rank}" if self.d.world > 1 else ""
        return (
            f"the loss is {value} at {where}, micro-batch {j + 1} of {n}{rank}; examples (index in the "
            f"{self.cfg.data.train_split} split): {', '.join(self._example_ids(indices))}.\n"
            f"The learning rate was {lr:.3g}: lower it (--optim.blr / --optim.lr) or set --optim.grad_clip; "
            "the parameters of the last saved state are unaffected (continue with --resume RUN_DIR --allow-changes "
            "plus the change)."
        )

    def _oom_message(self, micro: list[MicroBatch], pos: Position) -> str:
        o = self.cfg.optim
        batch_tokens = max(tuple(b["tokens"].shape) for _, b in micro)
        smaller = o.batch_size // 2 if o.batch_size % 2 == 0 else 1  # keeps batch_size * grad_accum
        advice = (
            f"--optim.batch_size {smaller} --optim.grad_accum {o.grad_accum * o.batch_size // smaller} "
            "(the same effective batch, so the same run)"
            if o.batch_size > 1
            else f"--data.max_len {self.cfg.data.max_len // 2} (shorter sequences)"
        )
        dtype = "" if self.dtype != torch.float32 or self.d.device.type == "cpu" else " or --model.dtype bfloat16"
        return (
            f"out of memory on {self.d.device} at optimizer step {pos.step + 1}, micro-batch of shape "
            f"{batch_tokens} (batch x tokens), peak {memory_mib(self.d.device):.0f} MiB.\n"
            f"Next thing to try: {advice}{dtype}."
        )


def train_loop(
    cfg: TrainConfig, trainer: Trainer, run_dir: Path, pos: Position, plan: StepPlan, handle_signals: bool
) -> str:
    """Steps until done, run.stop_after or a stop request (StopRequest); saves on the way and logs every step
    (training.metrics.StepLog). Returns done | stopped | SIGINT | SIGTERM."""
    d, total_steps, o = trainer.d, plan.schedule.total_steps, cfg.optim
    lengths = trainer.collate.lengths if cfg.data.group_by_length else None  # tokenizes the set once
    log = StepLog(cfg, run_dir, d, plan, pos)
    saved_step, outcome = pos.step, "done"
    with StopRequest(handle_signals) as stop:
        while pos.step < total_steps and outcome == "done":
            steps = epoch_steps(len(trainer.examples), d, cfg.run.seed, pos.epoch, o.batch_size * o.grad_accum, lengths)
            epoch_samples = sum(map(len, steps))
            for micro in step_batches(steps, pos.sample, o.batch_size, trainer.collate, cfg.data.num_workers):
                try:
                    result = trainer.step(micro, pos, stop)
                except OutOfMemory:
                    if d.world == 1 and pos.step > saved_step:  # parameters are those of the last completed step
                        save_checkpoint(cfg, run_dir, trainer.model, trainer.optimizer, trainer.scaler, pos, d)
                    raise
                pos.step += 1
                pos.sample += sum(len(indices) for indices, _ in micro)
                epoch_end = pos.sample >= epoch_samples
                if epoch_end:
                    pos.epoch, pos.sample = pos.epoch + 1, 0
                log.after_step(pos, micro, result, epoch_end)
                if result.stop:
                    outcome = stop.signal or "SIGTERM"  # another process received the signal
                elif cfg.run.stop_after is not None and pos.step >= cfg.run.stop_after:
                    outcome = "stopped"
                if outcome != "done" or pos.step == total_steps or pos.step % cfg.run.save_every == 0:
                    save_checkpoint(cfg, run_dir, trainer.model, trainer.optimizer, trainer.scaler, pos, d)
                    saved_step = pos.step
                if outcome != "done" or pos.step >= total_steps:
                    break
    log.close()
    return outcome

"""Metrics of a run: metrics.jsonl (one record per logged step), TensorBoard events (tb/) and loss_curve.png, and
the training loop's bookkeeping that fills them (``StepLog``: the progress bar, the records, the epoch summaries)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.checkpoint import write_text_atomic
from training.batching import MicroBatch
from training.config import TrainConfig
from training.dist import Dist, all_reduce_sum, memory_mib
from training.optim import StepPlan
from training.state import Position

if TYPE_CHECKING:
    from training.trainer import StepResult

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Complete records of metrics.jsonl (a line cut short by a killed process is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: keep only the records up to the step the state was saved at (later ones are re-done)."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_loss_curve(run_dir: Path) -> None:
    """loss_curve.png from metrics.jsonl: loss (log scale) and learning rate against the optimizer step."""
    records = read_metrics(run_dir / METRICS_FILE)
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.checkpoint import atomic_write

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (token mean)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6, label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title(run_dir.name)
    fig.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(run_dir / CURVE_FILE, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


class MetricsLog:
    """metrics.jsonl (one JSON record per logged step, appended and flushed whole) and TensorBoard, rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step drops events a killed run wrote after its last saved state.
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record {"step", "loss", ...}; every key but step is a TensorBoard scalar train/<key>."""
        if not self.enabled:
            return
        from model.checkpoint import append_text

        append_text(self.path, json.dumps(record) + "\n")  # a cut line is dropped on resume (truncate_metrics)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StepLog:
    """The training loop's bookkeeping, called once after every optimizer step (``after_step``): the progress bar,
    and a metrics.jsonl record every run.log_every steps, at the last step, on a stop request and at the end of every
    epoch, averaging the steps since the previous record.

    A record's "useful_tokens" is the share of the computed token positions (micro-batches padded to their longest
    row) that hold real tokens, over those steps; the record ending an epoch adds "epoch_useful_tokens", the same over
    the epoch (since the resume, when the run resumed inside it), which is also printed. Every process calls it at the
    same steps (the shares are summed over the processes); rank 0 alone writes and prints.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist, plan: StepPlan, pos: Position) -> None:
        from tqdm.auto import tqdm

        self.cfg, self.d, self.plan = cfg, d, plan
        self.records = MetricsLog(run_dir, d.main, cfg.run.tensorboard, pos.step)
        total_steps = plan.schedule.total_steps
        self.bar = tqdm(total=total_steps, initial=pos.step, unit="step", disable=not (d.main and cfg.run.progress))
        self._start_window()
        self._start_epoch(pos.step, resumed_inside=pos.sample > 0)

    def _start_window(self) -> None:
        self.window_loss, self.window_steps, self.window_tokens = 0.0, 0, 0
        self.window_padding, self.window_start = [0, 0], time.perf_counter()

    def _start_epoch(self, step: int, resumed_inside: bool) -> None:
        self.epoch_padding, self.epoch_from = [0, 0], (step, resumed_inside)

    def after_step(self, pos: Position, micro: list[MicroBatch], result: StepResult, epoch_end: bool) -> None:
        """Count the step that brought the run to ``pos`` (``epoch_end``: it ended an epoch) and log what is due."""
        self.window_loss += result.loss
        self.window_steps += 1
        self.window_tokens += result.tokens
        real, computed = padded_counts(micro)
        for counts in (self.window_padding, self.epoch_padding):
            counts[0], counts[1] = counts[0] + real, counts[1] + computed
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
        total_steps = self.plan.schedule.total_steps
        if pos.step % self.cfg.run.log_every == 0 or pos.step == total_steps or result.stop or epoch_end:
            self._write_record(pos, result.lr, epoch_end)
        if epoch_end:
            self._start_epoch(pos.step, resumed_inside=False)

    def _write_record(self, pos: Position, lr: float, epoch_end: bool) -> None:
        from tqdm.auto import tqdm

        elapsed = time.perf_counter() - self.window_start
        useful = useful_fractions([self.window_padding, self.epoch_padding], self.d)  # the same steps on every rank
        record = {
            "step": pos.step,
            "epoch": round(pos.step / self.plan.steps_per_epoch, 4),
            "loss": self.window_loss / self.window_steps,
            "lr": lr,
            "tokens_per_s": round(self.window_tokens / max(elapsed, 1e-9), 1),
            "useful_tokens": useful[0],
            "max_memory_mib": round(memory_mib(self.d.device), 1),
        }
        if epoch_end:
            record["epoch_useful_tokens"] = useful[1]
            if self.d.main:
                tqdm.write(epoch_summary(self.cfg, pos, self.epoch_from, useful[1]))
        self.records.write(record)
        self._start_window()

    def close(self) -> None:
        """End the progress bar and the TensorBoard events."""
        self.bar.close()
        self.records.close()


def padded_counts(micro: list[MicroBatch]) -> list[int]:
    """[real tokens, computed token positions] of one step's micro-batches on this process (each micro-batch is
    padded to its longest row)."""
    return [sum(int(b["lengths"].sum()) for _, b in micro), sum(b["tokens"].numel() for _, b in micro)]


def useful_fractions(counts: list[list[int]], d: Dist) -> list[float]:
    """Real / computed tokens of each [real, computed] pair, summed over the processes (one collective)."""
    totals = all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=d.device), d)
    return [round(real / max(computed, 1.0), 4) for real, computed in totals.tolist()]


def epoch_summary(cfg: TrainConfig, pos: Position, epoch_from: tuple[int, bool], useful: float) -> str:
    """The line printed at the end of an epoch (``pos`` is already at the next one): its share of real tokens."""
    first_step, resumed_inside = epoch_from
    since = f", steps {first_step + 1}-{pos.step} since the resume" if resumed_inside else ""
    how = (
        "batches grouped by length"
        if cfg.data.group_by_length
        else "random batches; --data.group_by_length true pads less"
    )
    return (
        f"epoch {pos.epoch}/{cfg.optim.epochs} done at step {pos.step}: {useful:.1%} of the computed tokens were "
        f"real, the rest padding ({how}{since})"
    )

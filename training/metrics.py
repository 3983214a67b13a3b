"""Metrics of a run: metrics.jsonl (one record per logged step), TensorBoard events (tb/) and loss_curve.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.checkpoint import write_text_atomic

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

"""``python -m bench train --lengths alpaca`` in the parent process: both sides on the same realistic-length examples
(bench/lengths.py says how they are drawn and batched), and the report as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bench.lengths import length_plan
from bench.measure import loadavg_1m, run_header
from bench.report import config_record, loadavg_text, mib
from bench.shapes import get_shape
from bench.sides import run_sides

if TYPE_CHECKING:
    from bench.config import BenchConfig


def bench_train_lengths(cfg: BenchConfig) -> dict[str, Any]:
    """Useful tokens/s of training on realistic lengths: ours grouped vs PEFT random, same examples and weights."""
    header = run_header(torch.device(cfg.device))
    plan = length_plan(cfg)
    sides = run_sides(cfg)
    ours, peft = sides["ours"], sides["peft"]
    return {
        "bench": "train",
        **header,
        "config": config_record(cfg, get_shape(cfg.shape)),
        "lengths": {key: value for key, value in plan.items() if key not in ("ours", "peft", "warmup")},
        "ours": ours,
        "peft": peft,
        "speedup_useful_tokens_per_s": ours["useful_tokens_per_s"] / peft["useful_tokens_per_s"],
        "memory_ratio": ours["peak_memory_bytes"] / peft["peak_memory_bytes"],
        "first_loss_rel_diff": abs(ours["first_loss"] - peft["first_loss"]) / abs(peft["first_loss"]),
        "loadavg_1m_at_end": loadavg_1m(),
    }


def format_train_lengths(report: dict[str, Any]) -> str:
    """The report as a few lines: per side the batching, useful share, useful and computed tokens/s, memory."""
    c, lengths = report["config"], report["lengths"]
    lines = [
        f"train --lengths {c['lengths']}  shape={c['shape']} ({c['base_parameters'] / 1e6:.1f}M) "
        f"device={report['device']['type']} dtype={c['dtype']} batch={c['batches'][0]} threads={c['threads']} "
        f"steps={c['steps']}x{c['rounds']} warmup={c['warmup']} commit={report['git_commit']} {loadavg_text(report)}",
        f"lengths: mean {lengths['lengths_mean']:.0f}, median {lengths['lengths_median']:.0f}, max "
        f"{lengths['lengths_max']} tokens; whole-epoch useful share: grouped {lengths['epoch_useful_grouped']:.1%}, "
        f"random {lengths['epoch_useful_random']:.1%}",
        f"{'side':<6}{'batches':<10}{'useful':>8}{'useful tok/s':>14}{'computed tok/s':>16}{'total s':>9}"
        f"{'peak MiB':>10}{'first loss':>12}",
    ]
    for side, batching in (("ours", "grouped"), ("peft", "random")):
        r = report[side]
        lines.append(
            f"{side:<6}{batching:<10}{r['useful_fraction']:>8.1%}{r['useful_tokens_per_s']:>14,.1f}"
            f"{r['computed_tokens_per_s']:>16,.1f}{r['total_s']:>9.1f}{mib(r['peak_memory_bytes']):>10}"
            f"{r['first_loss']:>12.6f}"
        )
    lines.append(
        f"ours/PEFT: {report['speedup_useful_tokens_per_s']:.2f}x useful tokens/s, {report['memory_ratio']:.2f}x "
        f"peak memory (first-loss relative difference {report['first_loss_rel_diff']:.1e})"
    )
    return "\n".join(lines)

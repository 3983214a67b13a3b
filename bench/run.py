"""``python -m bench train|generate``: both sides run (bench/sides.py), their figures side by side, and the report
printed as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bench.measure import DTYPES, decode_bytes_per_step, loadavg_1m, run_header, train_step_flops
from bench.methods import accounting
from bench.report import config_record, loadavg_text, mib, optional, run_peaks
from bench.shapes import get_shape
from bench.sides import run_sides
from bench.train_lengths import bench_train_lengths, format_train_lengths
from bench.worker import SIDES

if TYPE_CHECKING:
    from bench.config import BenchConfig


def bench_train(cfg: BenchConfig) -> dict[str, Any]:
    """Adapter training step, ours vs PEFT: tokens/s, peak memory, and FLOP rate / MFU (frozen-base FLOPs)."""
    if cfg.lengths is not None:
        return bench_train_lengths(cfg)
    shape = get_shape(cfg.shape)
    header = run_header(torch.device(cfg.device))
    sides = run_sides(cfg)
    counted = accounting(cfg.method, shape)
    flops = train_step_flops(
        shape.llama, counted.adapter_layers, counted.adapter_len, cfg.batches[0], cfg.seq + counted.train_extra_tokens
    )
    peaks = run_peaks(cfg)
    for result in sides.values():
        result["model_tflops_per_s"] = flops / result["median_step_s"] / 1e12
        result["mfu"] = result["model_tflops_per_s"] / peaks["peak_tflops"] if peaks["peak_tflops"] else None
    ours, peft = sides["ours"], sides["peft"]
    return {
        "bench": "train",
        **header,
        "config": config_record(cfg, shape),
        "flops_per_step": flops,
        "device_peaks": peaks,
        "ours": ours,
        "peft": peft,
        "speedup_tokens_per_s": ours["tokens_per_s"] / peft["tokens_per_s"],
        "speedup_best_tokens_per_s": ours["best_tokens_per_s"] / peft["best_tokens_per_s"],
        "memory_ratio": ours["peak_memory_bytes"] / peft["peak_memory_bytes"],
        "first_loss_rel_diff": abs(ours["first_loss"] - peft["first_loss"]) / abs(peft["first_loss"]),
        "loadavg_1m_at_end": loadavg_1m(),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare_tokens(ours: list[list[int]], peft: list[list[int]]) -> dict[str, Any]:
    """Greedy agreement: identical rows, the share of equal tokens and the first (row, step) that differs."""
    pairs = [(r, s) for r in range(len(ours)) for s in range(len(ours[r]))]
    mismatches = [(r, s) for r, s in pairs if ours[r][s] != peft[r][s]]
    return {
        "greedy_agree": not mismatches,
        "matching_tokens": (len(pairs) - len(mismatches)) / len(pairs),
        "first_mismatch": min(mismatches, key=lambda rs: (rs[1], rs[0])) if mismatches else None,
    }


def bench_generate(cfg: BenchConfig) -> dict[str, Any]:
    """Greedy generation, ours vs PEFT + transformers generate: TTFT, decode tokens/s, bandwidth, agreement."""
    shape = get_shape(cfg.shape)
    header = run_header(torch.device(cfg.device))
    sides = run_sides(cfg)
    peaks = run_peaks(cfg)
    counted = accounting(cfg.method, shape)
    context = cfg.seq + cfg.new_tokens / 2 + counted.cache_extra_tokens  # mean cache length over the decode steps
    rows = []
    for i, batch in enumerate(cfg.batches):
        bytes_per_step = decode_bytes_per_step(
            shape.llama, counted.adapter_layers, counted.adapter_len, batch, context, DTYPES[cfg.dtype]
        )
        per_side = {}
        for side in SIDES:
            m = dict(sides[side]["batches"][i])
            step_s = m["decode_step_s"]
            m["bandwidth_gbs"] = bytes_per_step / step_s / 1e9 if step_s else None
            peak = peaks["peak_bandwidth_gbs"]
            m["bandwidth_use"] = m["bandwidth_gbs"] / peak if peak and m["bandwidth_gbs"] else None
            per_side[side] = m
        agreement = compare_tokens(per_side["ours"].pop("token_ids"), per_side["peft"].pop("token_ids"))
        ours, peft = per_side["ours"], per_side["peft"]
        rows.append(
            {
                "batch": batch,
                "ours": ours,
                "peft": peft,
                "ttft_speedup": peft["ttft_s"] / ours["ttft_s"],
                "ttft_speedup_best": peft["best_ttft_s"] / ours["best_ttft_s"],
                "decode_speedup": _ratio(ours["decode_tokens_per_s"], peft["decode_tokens_per_s"]),
                "decode_speedup_best": _ratio(ours["best_decode_tokens_per_s"], peft["best_decode_tokens_per_s"]),
                "memory_ratio": ours["peak_memory_bytes"] / peft["peak_memory_bytes"],
                "decode_bytes_per_step": bytes_per_step,
                **agreement,
            }
        )
    return {
        "bench": "generate",
        **header,
        "config": config_record(cfg, shape),
        "device_peaks": peaks,
        "load_s": {side: sides[side]["load_s"] for side in SIDES},
        "batches": rows,
        "greedy_agree": all(r["greedy_agree"] for r in rows),
        "loadavg_1m_at_end": loadavg_1m(),
    }


# ---- printing -------------------------------------------------------------------------------------------------------
def format_train(report: dict[str, Any]) -> str:
    c = report["config"]
    if c.get("lengths"):
        return format_train_lengths(report)
    lines = [
        f"train  shape={c['shape']} ({c['base_parameters'] / 1e6:.1f}M) device={report['device']['type']} "
        f"dtype={c['dtype']} batch={c['batches'][0]} seq={c['seq']} threads={c['threads']} "
        f"steps={c['steps']}x{c['rounds']} warmup={c['warmup']} {'ours compiled ' if c.get('compile') else ''}"
        f"commit={report['git_commit']} {loadavg_text(report)}",
        f"{'side':<6}{'tokens/s':>11}{'best':>9}{'step ms':>10}{'peak MiB':>10}{'TFLOP/s':>9}{'MFU':>7}"
        f"{'first loss':>12}",
    ]
    for side in SIDES:
        r = report[side]
        lines.append(
            f"{side:<6}{r['tokens_per_s']:>11,.1f}{r['best_tokens_per_s']:>9,.1f}{r['median_step_s'] * 1e3:>10,.1f}"
            f"{mib(r['peak_memory_bytes']):>10}{r['model_tflops_per_s']:>9.3f}{optional(r['mfu'], '.1%'):>7}"
            f"{r['first_loss']:>12.6f}"
        )
    speedup, best = report["speedup_tokens_per_s"], report["speedup_best_tokens_per_s"]
    lines.append(
        f"ours/PEFT: {speedup:.2f}x tokens/s (best steps {best:.2f}x), {report['memory_ratio']:.2f}x peak memory "
        f"(first-loss relative difference {report['first_loss_rel_diff']:.1e})"
    )
    return "\n".join(lines)


def format_generate(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"generate  shape={c['shape']} ({c['base_parameters'] / 1e6:.1f}M) device={report['device']['type']} "
        f"dtype={c['dtype']} prompt={c['seq']} new={c['new_tokens']} threads={c['threads']} "
        f"runs={c['steps']}x{c['rounds']} {'ours compiled ' if c.get('compile') else ''}"
        f"commit={report['git_commit']} {loadavg_text(report)}",
        f"{'batch':<6}{'side':<6}{'TTFT ms':>10}{'best':>9}{'decode tok/s':>14}{'best':>9}{'GB/s':>8}{'BW use':>8}"
        f"{'peak MiB':>10}",
    ]
    for row in report["batches"]:
        for side in SIDES:
            r = row[side]
            lines.append(
                f"{row['batch']:<6}{side:<6}{r['ttft_s'] * 1e3:>10,.1f}{r['best_ttft_s'] * 1e3:>9,.1f}"
                f"{optional(r['decode_tokens_per_s'], ',.1f'):>14}{optional(r['best_decode_tokens_per_s'], ',.1f'):>9}"
                f"{optional(r['bandwidth_gbs'], ',.1f'):>8}{optional(r['bandwidth_use'], '.1%'):>8}"
                f"{mib(r['peak_memory_bytes']):>10}"
            )
        agree = "agree" if row["greedy_agree"] else f"DIFFER from (row, step) {row['first_mismatch']}"
        lines.append(
            f"      ours/PEFT speedup: TTFT {row['ttft_speedup']:.2f}x (best {row['ttft_speedup_best']:.2f}x), "
            f"decode {optional(row['decode_speedup'], '.2f')}x (best {optional(row['decode_speedup_best'], '.2f')}x), "
            f"peak memory {row['memory_ratio']:.2f}x; greedy outputs {agree} "
            f"({row['matching_tokens']:.1%} of tokens equal)"
        )
    return "\n".join(lines)

"""``python -m bench.gpu_check OUT_DIR``: the one table of scripts/gpu_check.sh, from the reports it left in OUT_DIR.

The script runs each stage as its own ``python -m bench ...`` with ``--json`` (``STAGES``) and records every stage's
exit status and seconds in ``stages.tsv``; this module reads what is there (a stage that failed or ran out of time
shows as such, the others still fill their rows), writes ``gpu_check.json`` (every figure below, plus the reports
themselves) and ``gpu_check.md``, and prints the markdown. Derived figures, each from measured ones:

- training MFU on useful tokens: useful tokens/s x the frozen-base FLOPs per token of a row of the mean length
  (``train_step_flops``, the MFU convention of ``bench train``) / the device's dense 16-bit peak;
- the Alpaca recipe projected: 5 epochs x 52,002 examples x the mean length / ours' useful tokens/s;
- decode: ours eager and compiled, each against PEFT ``generate`` in its own run, with the share of the bandwidth
  roofline each reaches (``decode_bytes_per_step``) and greedy agreement with PEFT.

The targets of issue 16 are shown beside the figures; they are goals for the GPU, not checks of this module.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

STAGES = {
    "train": "train_lengths.json",
    "generate_eager": "generate_eager.json",
    "generate_compiled": "generate_compiled.json",
    "memory_nf4": "memory_nf4.json",
}
"""Stage name (as the script records it in stages.tsv) -> the JSON report it writes."""

ALPACA_EXAMPLES, ALPACA_EPOCHS = 52_002, 5
"""The Alpaca recipe of the paper: 52K instructions, 5 epochs (1 hour on 8 A100)."""
TARGETS = {
    "decode_speedup_batch1": 2.0,
    "decode_bandwidth_use_batch1": 0.70,
    "train_speedup": 1.3,
    "train_mfu_useful": 0.45,
    "alpaca_minutes": 30.0,
}
"""Issue 16's GPU targets: decode >= 2x PEFT and >= 70% of the bandwidth roofline at batch 1; training >= 1.3x
PEFT and >= 45% MFU on useful tokens; the Alpaca 5-epoch recipe under 30 minutes on one H100."""
GIB = 2**30


def read_stages(folder: Path) -> list[dict[str, Any]]:
    """stages.tsv: one ``name<TAB>exit status<TAB>seconds`` line per stage the script ran, in order."""
    path = folder / "stages.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stage record; run scripts/gpu_check.sh (it writes this file)")
    stages = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{line_no}: expected 'name<TAB>status<TAB>seconds', got {line!r}")
        name, status, seconds = parts
        stages.append({"stage": name, "exit_status": int(status), "seconds": float(seconds)})
    return stages


def load_reports(folder: Path, stages: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """The JSON report of each stage that succeeded; None for the others (failed, timed out or not run)."""
    ok = {s["stage"] for s in stages if s["exit_status"] == 0}
    return {
        name: json.loads((folder / file).read_text()) if name in ok and (folder / file).is_file() else None
        for name, file in STAGES.items()
    }


def peak_tflops(reports: dict[str, dict[str, Any] | None]) -> float | None:
    """The device's dense 16-bit peak as the generate reports recorded it (None on a CPU or an unknown GPU)."""
    for name in ("generate_eager", "generate_compiled"):
        report = reports[name]
        if report is not None and report.get("device_peaks", {}).get("peak_tflops"):
            return float(report["device_peaks"]["peak_tflops"])
    return None


def train_summary(report: dict[str, Any] | None, peak: float | None) -> dict[str, Any] | None:
    """Useful tokens/s per side, MFU on useful tokens, peak memory, and the projected Alpaca recipe."""
    if report is None:
        return None
    from bench.measure import train_step_flops
    from bench.shapes import get_shape

    config, lengths = report["config"], report["lengths"]
    llama = get_shape(config["shape"]).llama
    mean_len = float(lengths["lengths_mean"])
    flops_per_token = train_step_flops(llama, config["adapter_layers"], config["adapter_len"], 1, round(mean_len))
    flops_per_token /= round(mean_len)
    sides = {}
    for side in ("ours", "peft"):
        r = report[side]
        sides[side] = {
            "useful_tokens_per_s": r["useful_tokens_per_s"],
            "useful_fraction": r["useful_fraction"],
            "mfu_useful": r["useful_tokens_per_s"] * flops_per_token / (peak * 1e12) if peak else None,
            "peak_memory_gib": r["peak_memory_bytes"] / GIB,
        }
    alpaca_tokens = ALPACA_EPOCHS * ALPACA_EXAMPLES * mean_len
    return {
        "batch": config["batches"][0],
        "lengths_mean": mean_len,
        "flops_per_useful_token": flops_per_token,
        **sides,
        "speedup_useful_tokens_per_s": report["speedup_useful_tokens_per_s"],
        "first_loss_rel_diff": report["first_loss_rel_diff"],
        "alpaca_5_epochs_minutes": alpaca_tokens / sides["ours"]["useful_tokens_per_s"] / 60,
    }


def decode_rows(eager: dict[str, Any] | None, compiled: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per batch size: ours eager and compiled, each with its speedup over the PEFT side of its own run
    (measured minutes apart, not hours), and PEFT's figures from the eager run (else the compiled one)."""
    by_batch: dict[int, dict[str, Any]] = {}
    for kind, report in (("eager", eager), ("compiled", compiled)):
        for row in report["batches"] if report is not None else []:
            entry = by_batch.setdefault(row["batch"], {"batch": row["batch"]})
            entry[kind] = {
                "decode_tokens_per_s": row["ours"]["decode_tokens_per_s"],
                "bandwidth_use": row["ours"]["bandwidth_use"],
                "ttft_ms": row["ours"]["ttft_s"] * 1e3,
                "greedy_agree_with_peft": row["greedy_agree"],
                "matching_tokens": row["matching_tokens"],
                "speedup_vs_peft": row["decode_speedup"],  # against the PEFT side of the same run
            }
            entry.setdefault("peft", {
                "decode_tokens_per_s": row["peft"]["decode_tokens_per_s"],
                "bandwidth_use": row["peft"]["bandwidth_use"],
                "ttft_ms": row["peft"]["ttft_s"] * 1e3,
            })  # fmt: skip
    return [by_batch[batch] for batch in sorted(by_batch)]


def memory_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    measured = report.get("measured")
    return {
        "setup": report["setup"],
        "predicted_gib": report["bytes"]["total"] / GIB,
        "measured_peak_gib": measured["peak_bytes"] / GIB if measured else None,
    }


def collect(folder: Path) -> dict[str, Any]:
    """Everything of one check: stages, derived figures, targets and the raw reports."""
    stages = read_stages(folder)
    reports = load_reports(folder, stages)
    first = next((r for r in reports.values() if r is not None and "device" in r), None)
    peak = peak_tflops(reports)
    return {
        "date": first["date"] if first else datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": first.get("git_commit") if first else None,
        "device": first["device"] if first else None,
        "peak_tflops": peak,
        "stages": stages,
        "train": train_summary(reports["train"], peak),
        "decode": decode_rows(reports["generate_eager"], reports["generate_compiled"]),
        "memory_nf4": memory_summary(reports["memory_nf4"]),
        "targets": TARGETS,
        "reports": reports,
    }


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(gib: float | None) -> str:
    """GiB with 2 decimals; MiB below 1 GiB (the dry run's tiny shape)."""
    if gib is None:
        return "-"
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def to_markdown(check: dict[str, Any]) -> str:
    """The tables of one check (what the script prints and BENCHMARKS.md takes)."""
    device = check["device"] or {}
    where = device.get("gpu") or f"CPU {device.get('cpu_model', '?')}"
    status = ", ".join(
        f"{s['stage']} {'ok' if s['exit_status'] == 0 else 'TIMED OUT' if s['exit_status'] == 124 else 'FAILED'} "
        f"{s['seconds']:.0f} s"
        for s in check["stages"]
    )
    lines = [
        f"GPU check: {where}, {check['date']}, commit {check['git_commit']}",
        f"stages: {status} (total {sum(s['seconds'] for s in check['stages']):.0f} s)",
        "",
    ]
    t = check["train"]
    if t is not None:
        lines += [
            f"Training step, Alpaca-like lengths (mean {t['lengths_mean']:.0f} tokens), batch {t['batch']}:",
            "",
            "| side | batches | useful share | useful tok/s | MFU (useful) | peak memory |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for side, label, batching in (("ours", "ours", "grouped"), ("peft", "PEFT", "random")):
            r = t[side]
            lines.append(
                f"| {label} | {batching} | {r['useful_fraction']:.1%} | {r['useful_tokens_per_s']:,.0f} | "
                f"{_f(r['mfu_useful'], '.1%')} | {_size(r['peak_memory_gib'])} |"
            )
        lines += [
            "",
            f"ours/PEFT {t['speedup_useful_tokens_per_s']:.2f}x useful tokens/s (target >= "
            f"{TARGETS['train_speedup']}x, MFU >= {TARGETS['train_mfu_useful']:.0%}); Alpaca 5 epochs projected "
            f"{t['alpaca_5_epochs_minutes']:.1f} min (target < {TARGETS['alpaca_minutes']:.0f} on one H100)",
            "",
        ]
    if check["decode"]:
        lines += [
            "Greedy decode, decode tokens/s (share of the bandwidth roofline), ours vs PEFT generate:",
            "",
            "| batch | ours eager | ours compiled | PEFT | eager/PEFT | compiled/PEFT | TTFT ms ours / PEFT "
            "| greedy = PEFT |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in check["decode"]:
            eager, compiled, peft = row.get("eager", {}), row.get("compiled", {}), row["peft"]

            def rate(r: dict[str, Any]) -> str:
                if not r.get("decode_tokens_per_s"):
                    return "-"
                use = r.get("bandwidth_use")
                return f"{r['decode_tokens_per_s']:,.1f}" + (f" ({use:.0%})" if use else "")

            agree = "/".join(
                ("yes" if r["greedy_agree_with_peft"] else f"{r['matching_tokens']:.0%}") if r else "-"
                for r in (eager, compiled)
            )
            lines.append(
                f"| {row['batch']} | {rate(eager)} | {rate(compiled)} | {rate(peft)} | "
                f"{_f(eager.get('speedup_vs_peft'), '.2f')}x | {_f(compiled.get('speedup_vs_peft'), '.2f')}x | "
                f"{_f(eager.get('ttft_ms'), ',.1f')} / {peft['ttft_ms']:,.1f} | {agree} |"
            )
        lines += [
            "",
            f"(targets at batch 1: >= {TARGETS['decode_speedup_batch1']}x PEFT, >= "
            f"{TARGETS['decode_bandwidth_use_batch1']:.0%} of the bandwidth roofline. Ratios: each run against its "
            "own PEFT side; PEFT column: the eager run's. greedy = PEFT: eager/compiled)",
            "",
        ]
    m = check["memory_nf4"]
    if m is not None:
        s = m["setup"]
        lines += [
            f"NF4 training memory, {s['shape']} {s['method']} batch {s['batch']} x {s['seq']}: predicted "
            f"{_size(m['predicted_gib'])}, measured peak {_size(m['measured_peak_gib'])}",
        ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.gpu_check OUT_DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    try:
        check = collect(folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from bench.report import write_json
    from model.checkpoint import write_text_atomic

    write_json(check, folder / "gpu_check.json")
    markdown = to_markdown(check)
    write_text_atomic(folder / "gpu_check.md", markdown)
    print(markdown, end="")
    return 0 if all(s["exit_status"] == 0 for s in check["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

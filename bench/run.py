"""Run both sides of a benchmark and put them side by side.

The parent draws one random ``LlamaForCausalLM`` and one non-zero PEFT adapter of ``--method`` (default the
adaption prompt: prompts N(0, 1) as PEFT initialises them, gates set away from zero so the adapter changes the
outputs; bench/methods.py), writes them as a Hugging Face base directory and a PEFT adapter directory, and starts
a fresh worker process per side and round (bench/worker.py).
PEFT loads them with ``from_pretrained``; ours with ``model.load_model``, which maps the HF weights (q/k rows
permuted back to Meta's RoPE layout) and imports the PEFT adapter through the method's ``from_peft`` (adaption
prompts: one scalar gate per layer copied to every head, gate_fn="raw": PEFT's semantics). Same weights, same
inputs, same threads, same optimizer.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bench.measure import (
    DTYPES,
    ROOT,
    decode_bytes_per_step,
    device_peaks,
    loadavg_1m,
    run_header,
    train_step_flops,
)
from bench.methods import METHODS, accounting, peft_config, perturb_zero_init, virtual_tokens
from bench.shapes import BenchShape, get_shape, hf_config_kwargs, parameter_count
from bench.worker import SIDES, SideSpec, spec_json, summarize_generate, summarize_train
from model.checkpoint import write_text_atomic


@dataclass
class BenchConfig:
    """One benchmark run, fully resolved (no None left except the optional overrides)."""

    task: Literal["train", "generate"]
    shape: str
    device: str
    dtype: str
    batches: list[int]
    """train: exactly one batch size; generate: one measurement per batch size."""
    seq: int
    """train: sequence length; generate: prompt length."""
    new_tokens: int
    steps: int
    warmup: int
    threads: int
    seed: int = 0
    rounds: int = 1
    """Runs of both sides, alternating which goes first; their timed steps are pooled (for busy machines)."""
    peak_tflops: float | None = None
    """Override of the device's dense peak TFLOP/s for MFU."""
    peak_bandwidth_gbs: float | None = None
    """Override of the device's memory bandwidth (GB/s) for decode bandwidth use."""
    workdir: str | None = None
    """Where the shared weights are written (kept); None: a temporary directory, removed afterwards."""
    method: str = "llama_adapter"
    """The PEFT method both sides load (bench/methods.py)."""
    compile: bool = False
    """Ours through torch.compile: train, its blocks (``Transformer.compile_blocks``); generate, the fixed-shape
    decode step (model.generate, compile=True)."""
    lengths: str | None = None
    """train: a realistic length distribution (bench/lengths.py: alpaca) instead of full rows of ``seq`` tokens;
    ``seq`` is then its longest example."""

    def __post_init__(self) -> None:
        shape = get_shape(self.shape)
        if self.lengths is not None:
            from bench.lengths import ALPACA_EXAMPLES, ALPACA_MAX, DISTRIBUTIONS

            if self.task != "train" or self.lengths not in DISTRIBUTIONS:
                raise ValueError(f"--lengths takes {', '.join(DISTRIBUTIONS)} with train, got {self.lengths!r}")
            if self.seq != ALPACA_MAX or self.steps * self.batches[0] > ALPACA_EXAMPLES:
                raise ValueError(
                    f"--lengths {self.lengths}: seq must be {ALPACA_MAX} and steps x batch at most "
                    f"{ALPACA_EXAMPLES:,}, got seq {self.seq}, {self.steps} x {self.batches[0]}"
                )
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task == "train" and virtual_tokens(self.method):
            raise ValueError(
                f"train --method {self.method}: PEFT cannot load a saved prompt-learning adapter as trainable "
                "(PeftModel.from_pretrained refuses); use generate, or --method llama_adapter | lora | dora | ia3"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"--batch must be positive integers, got {self.batches}")
        if self.task == "train" and len(self.batches) != 1:
            raise ValueError(f"train takes one --batch, got {self.batches}")
        for name in ("seq", "new_tokens", "steps", "warmup", "threads", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.task == "train" and self.seq < 2:
            raise ValueError(f"--seq must be >= 2 for a next-token loss, got {self.seq}")
        extra = virtual_tokens(self.method)
        longest = self.seq + (self.new_tokens if self.task == "generate" else 0) + extra
        if longest > shape.llama.max_seq_len:
            terms = (
                f"--seq{' + --new-tokens' if self.task == 'generate' else ''}{f' + {extra} virtual' if extra else ''}"
            )
            raise ValueError(
                f"{self.task}: {longest} tokens ({terms}) "
                f"exceed max_seq_len={shape.llama.max_seq_len} of shape {self.shape}"
            )


# ---- shared weights -------------------------------------------------------------------------------------------------
def write_shared_weights(shape: BenchShape, cfg: BenchConfig, folder: Path) -> tuple[Path, Path]:
    """A random HF base (drawn on the bench device, in the bench dtype) and a non-zero PEFT adapter of the method."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers import LlamaConfig as HFLlamaConfig

    base_dir, adapter_dir = folder / "base", folder / "adapter"
    device = torch.device(cfg.device)
    hf_config = HFLlamaConfig(**hf_config_kwargs(shape.llama))
    # transformers and PEFT draw from the global RNG: seed it, and give the caller's RNG state back afterwards.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        with device:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[cfg.dtype], attn_implementation="sdpa")
        model.save_pretrained(base_dir)  # before PEFT wraps the attention modules (that renames their weights)
        peft_model = get_peft_model(model, peft_config(cfg.method, shape))
    perturb_zero_init(peft_model, cfg.seed + 1)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def progress(message: str) -> None:
    """One line on stderr while a benchmark runs (stdout holds only the report)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_worker(spec: SideSpec, folder: Path) -> dict[str, Any]:
    """One side in a fresh interpreter; its stderr goes to ours so errors and warnings stay visible."""
    spec_path = folder / f"{spec.task}-{spec.side}-spec.json"
    out_path = folder / f"{spec.task}-{spec.side}-result.json"
    spec_path.write_text(spec_json(spec))
    threads = str(spec.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.worker", str(spec_path), str(out_path)], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {spec.side} side of {spec.task!r} failed (exit {proc.returncode}); its error is above")
    return json.loads(out_path.read_text())


def run_sides(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """Write the shared weights, then run ours and PEFT one after the other in fresh processes."""
    shape = get_shape(cfg.shape)
    keep = contextlib.nullcontext(cfg.workdir) if cfg.workdir else tempfile.TemporaryDirectory(prefix="bench-")
    with keep as folder_name:
        folder = Path(folder_name)
        folder.mkdir(parents=True, exist_ok=True)
        progress(f"writing the shared {cfg.shape} weights and PEFT adapter to {folder}")
        base_dir, adapter_dir = write_shared_weights(shape, cfg, folder)
        # Give the parent's copy back before the workers load theirs (13.5 GB of GPU memory at 7B).
        gc.collect()
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.empty_cache()
        rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for r in range(cfg.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                progress(f"round {r + 1}/{cfg.rounds}: {cfg.task}, {side} side ...")
                started = time.perf_counter()
                rounds[side].append(run_worker(side_spec(cfg, side, base_dir, adapter_dir), folder))
                progress(f"round {r + 1}/{cfg.rounds}: {side} side done in {time.perf_counter() - started:.0f} s")
    return {side: merge_rounds(cfg, results) for side, results in rounds.items()}


def side_spec(cfg: BenchConfig, side: str, base_dir: Path, adapter_dir: Path) -> SideSpec:
    """What the worker of ``side`` needs from the run's config."""
    return SideSpec(
        task=cfg.task,
        side=side,
        base_dir=str(base_dir),
        adapter_dir=str(adapter_dir),
        device=cfg.device,
        dtype=cfg.dtype,
        threads=cfg.threads,
        seed=cfg.seed,
        batches=cfg.batches,
        seq=cfg.seq,
        new_tokens=cfg.new_tokens,
        steps=cfg.steps,
        warmup=cfg.warmup,
        method=cfg.method,
        compile=cfg.compile,
        **length_rows(cfg, side),
    )


def length_rows(cfg: BenchConfig, side: str) -> dict[str, Any]:
    """The SideSpec fields of the realistic-length mode (bench/lengths.py): the side's steps and the warmup batch."""
    if cfg.lengths is None:
        return {}
    from bench.lengths import length_plan

    plan = length_plan(cfg)
    return {"length_steps": plan[side], "length_warmup": plan["warmup"]}


def merge_rounds(cfg: BenchConfig, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the timed steps of several runs of one side; peaks are the largest seen."""
    if cfg.lengths is not None:
        from bench.lengths import merge_length_rounds

        return merge_length_rounds(rounds)
    first = rounds[0]
    merged = {**first, "rounds": len(rounds), "load_s": min(r["load_s"] for r in rounds)}
    if cfg.task == "train":
        step_s = [t for r in rounds for t in r["step_s"]]
        merged.update(summarize_train(step_s, cfg.batches[0] * cfg.seq))
        merged["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in rounds)
        return merged
    batches = []
    for i, entry in enumerate(first["batches"]):
        entries = [r["batches"][i] for r in rounds]
        if any(e["token_ids"] != entry["token_ids"] for e in entries):
            raise RuntimeError(f"{first['side']}: greedy tokens differ between rounds at batch {entry['batch']}")
        runs = [run for e in entries for run in e["runs"]]
        batches.append(
            {
                **entry,
                **summarize_generate(runs, entry["batch"], cfg.new_tokens),
                "peak_memory_bytes": max(e["peak_memory_bytes"] for e in entries),
            }
        )
    merged["batches"] = batches
    return merged


# ---- reports --------------------------------------------------------------------------------------------------------
def _config_record(cfg: BenchConfig, shape: BenchShape) -> dict[str, Any]:
    counted = accounting(cfg.method, shape)
    return {
        **asdict(cfg),
        "llama": asdict(shape.llama),
        "base_parameters": parameter_count(shape.llama),
        "adapter_len": counted.adapter_len,
        "adapter_layers": counted.adapter_layers,
        "accounting": asdict(counted),
        "optimizer": "AdamW(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02) over trainable parameters only",
        "attention": "SDPA on both sides",
    }


def _peaks(cfg: BenchConfig) -> dict[str, Any]:
    peaks = device_peaks(torch.device(cfg.device), DTYPES[cfg.dtype])
    if cfg.peak_tflops is not None:
        peaks.update(peak_tflops=cfg.peak_tflops, source="--peak-tflops / device")
    if cfg.peak_bandwidth_gbs is not None:
        peaks.update(peak_bandwidth_gbs=cfg.peak_bandwidth_gbs, source="--peak-bandwidth-gbs / device")
    return peaks


def bench_train(cfg: BenchConfig) -> dict[str, Any]:
    """Adapter training step, ours vs PEFT: tokens/s, peak memory, and FLOP rate / MFU (frozen-base FLOPs)."""
    if cfg.lengths is not None:
        from bench.lengths import bench_train_lengths

        return bench_train_lengths(cfg)
    shape = get_shape(cfg.shape)
    header = run_header(torch.device(cfg.device))
    sides = run_sides(cfg)
    counted = accounting(cfg.method, shape)
    flops = train_step_flops(
        shape.llama, counted.adapter_layers, counted.adapter_len, cfg.batches[0], cfg.seq + counted.train_extra_tokens
    )
    peaks = _peaks(cfg)
    for result in sides.values():
        result["model_tflops_per_s"] = flops / result["median_step_s"] / 1e12
        result["mfu"] = result["model_tflops_per_s"] / peaks["peak_tflops"] if peaks["peak_tflops"] else None
    ours, peft = sides["ours"], sides["peft"]
    return {
        "bench": "train",
        **header,
        "config": _config_record(cfg, shape),
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
    peaks = _peaks(cfg)
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
        "config": _config_record(cfg, shape),
        "device_peaks": peaks,
        "load_s": {side: sides[side]["load_s"] for side in SIDES},
        "batches": rows,
        "greedy_agree": all(r["greedy_agree"] for r in rows),
        "loadavg_1m_at_end": loadavg_1m(),
    }


# ---- printing -------------------------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _load(report: dict[str, Any]) -> str:
    start, end = report["loadavg_1m_at_start"], report["loadavg_1m_at_end"]
    return f"loadavg {_opt(start, '.2f')}->{_opt(end, '.2f')}"


def format_train(report: dict[str, Any]) -> str:
    c = report["config"]
    if c.get("lengths"):
        from bench.lengths import format_train_lengths

        return format_train_lengths(report)
    lines = [
        f"train  shape={c['shape']} ({c['base_parameters'] / 1e6:.1f}M) device={report['device']['type']} "
        f"dtype={c['dtype']} batch={c['batches'][0]} seq={c['seq']} threads={c['threads']} "
        f"steps={c['steps']}x{c['rounds']} warmup={c['warmup']} {'ours compiled ' if c.get('compile') else ''}"
        f"commit={report['git_commit']} {_load(report)}",
        f"{'side':<6}{'tokens/s':>11}{'best':>9}{'step ms':>10}{'peak MiB':>10}{'TFLOP/s':>9}{'MFU':>7}"
        f"{'first loss':>12}",
    ]
    for side in SIDES:
        r = report[side]
        lines.append(
            f"{side:<6}{r['tokens_per_s']:>11,.1f}{r['best_tokens_per_s']:>9,.1f}{r['median_step_s'] * 1e3:>10,.1f}"
            f"{_mib(r['peak_memory_bytes']):>10}{r['model_tflops_per_s']:>9.3f}{_opt(r['mfu'], '.1%'):>7}"
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
        f"commit={report['git_commit']} {_load(report)}",
        f"{'batch':<6}{'side':<6}{'TTFT ms':>10}{'best':>9}{'decode tok/s':>14}{'best':>9}{'GB/s':>8}{'BW use':>8}"
        f"{'peak MiB':>10}",
    ]
    for row in report["batches"]:
        for side in SIDES:
            r = row[side]
            lines.append(
                f"{row['batch']:<6}{side:<6}{r['ttft_s'] * 1e3:>10,.1f}{r['best_ttft_s'] * 1e3:>9,.1f}"
                f"{_opt(r['decode_tokens_per_s'], ',.1f'):>14}{_opt(r['best_decode_tokens_per_s'], ',.1f'):>9}"
                f"{_opt(r['bandwidth_gbs'], ',.1f'):>8}{_opt(r['bandwidth_use'], '.1%'):>8}"
                f"{_mib(r['peak_memory_bytes']):>10}"
            )
        agree = "agree" if row["greedy_agree"] else f"DIFFER from (row, step) {row['first_mismatch']}"
        lines.append(
            f"      ours/PEFT speedup: TTFT {row['ttft_speedup']:.2f}x (best {row['ttft_speedup_best']:.2f}x), "
            f"decode {_opt(row['decode_speedup'], '.2f')}x (best {_opt(row['decode_speedup_best'], '.2f')}x), "
            f"peak memory {row['memory_ratio']:.2f}x; greedy outputs {agree} "
            f"({row['matching_tokens']:.1%} of tokens equal)"
        )
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """The report as indented JSON, atomically (model.checkpoint.write_text_atomic)."""
    write_text_atomic(Path(path), json.dumps(report, indent=2))

"""What every ``python -m bench train|generate`` report shares: the config record, the device's peaks, the
number formats of the printed tables, and the JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.measure import DTYPES, device_peaks
from bench.methods import accounting
from bench.shapes import BenchShape, parameter_count
from model.checkpoint import write_text_atomic

if TYPE_CHECKING:
    from bench.config import BenchConfig


def config_record(cfg: BenchConfig, shape: BenchShape) -> dict[str, Any]:
    """The report's ``config``: the run's settings, the shape, its parameter count and the method's accounting."""
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


def run_peaks(cfg: BenchConfig) -> dict[str, Any]:
    """The device's dense peak TFLOP/s and memory bandwidth (bench/measure.py), with the run's overrides."""
    peaks = device_peaks(torch.device(cfg.device), DTYPES[cfg.dtype])
    if cfg.peak_tflops is not None:
        peaks.update(peak_tflops=cfg.peak_tflops, source="--peak-tflops / device")
    if cfg.peak_bandwidth_gbs is not None:
        peaks.update(peak_bandwidth_gbs=cfg.peak_bandwidth_gbs, source="--peak-bandwidth-gbs / device")
    return peaks


def mib(n: float) -> str:
    """Bytes as whole MiB with thousands separators."""
    return f"{n / 2**20:,.0f}"


def optional(value: float | None, fmt: str) -> str:
    """``value`` formatted, or "-" when there is none."""
    return "-" if value is None else format(value, fmt)


def loadavg_text(report: dict[str, Any]) -> str:
    """The machine's 1-minute load average at the start and at the end of the run."""
    start, end = report["loadavg_1m_at_start"], report["loadavg_1m_at_end"]
    return f"loadavg {optional(start, '.2f')}->{optional(end, '.2f')}"


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """The report as indented JSON, atomically (model.checkpoint.write_text_atomic)."""
    write_text_atomic(Path(path), json.dumps(report, indent=2))

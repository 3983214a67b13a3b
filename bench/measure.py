"""What the benchmarks measure and how: clocks, peak memory, FLOP and byte counts, device limits.

Peak memory
- CUDA: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats`` (tensors only, not the
  allocator's cached blocks or the CUDA context).
- CPU (Linux): the process's resident-set high-water mark. Writing ``5`` to ``/proc/self/clear_refs`` resets it to
  the current RSS, so the peak covers only the measured phase; ``getrusage(RUSAGE_SELF).ru_maxrss`` reads it. Every
  side runs in a fresh subprocess, so nothing of the other side is resident. The figure includes the Python
  runtime and the libraries each side imports (ours: torch; PEFT: torch + transformers + peft), as a user would see.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.shapes import parameter_count
from model.config import LlamaConfig

ROOT = Path(__file__).resolve().parent.parent

# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; first substring match wins.
DENSE_TFLOPS_16BIT: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (HBM3)
    ("A100", 312.0),
)


# ---- environment ----------------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str | None:
    """Short hash of HEAD of the checkout the bench runs from (None outside a git checkout)."""
    return _git("rev-parse", "--short", "HEAD") or None


def git_dirty() -> bool | None:
    """True when tracked files differ from HEAD or untracked files exist (the figures are then not of HEAD alone)."""
    status = _git("status", "--porcelain")
    return None if status is None else bool(status)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Logical CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_info(device: torch.device) -> dict[str, Any]:
    """Device description recorded with every result."""
    info: dict[str, Any] = {
        "type": device.type,
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def loadavg_1m() -> float | None:
    """The machine's 1-minute load average: other work running beside the bench skews its timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_header(device: torch.device) -> dict[str, Any]:
    """Date, commit, device and the machine's load when the run starts."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "device": device_info(device),
        "loadavg_1m_at_start": loadavg_1m(),
    }


def resolve_device(name: str | None) -> torch.device:
    """--device: cuda when available unless told otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype: bf16 on a GPU, fp32 on a CPU unless told otherwise."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: choose one of {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- clocks and memory ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that a clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """A clock reading after all queued work on ``device`` has finished."""
    synchronize(device)
    return time.perf_counter()


def current_memory_bytes(device: torch.device) -> int:
    """Bytes in use now: allocated CUDA tensors, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window; returns how the peak will be measured (recorded with the result)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return "ru_maxrss of the whole subprocess (could not reset the RSS high-water mark)"
    return "peak RSS (ru_maxrss) of a fresh subprocess, high-water mark reset via /proc/self/clear_refs after loading"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes since the last ``reset_peak_memory``."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB


# ---- FLOPs and bytes ------------------------------------------------------------------------------------------------
def _linear_flops_per_token(llama: LlamaConfig) -> int:
    """Multiply-adds x 2 of one block's projections for one token: wq, wk, wv, wo and the SwiGLU FFN."""
    kv_dim = llama.n_kv_heads * llama.head_dim
    return 2 * (llama.dim * (2 * llama.dim + 2 * kv_dim) + 3 * llama.dim * llama.ffn_dim)


def train_step_flops(llama: LlamaConfig, adapter_layers: int, adapter_len: int, batch: int, seq: int) -> int:
    """FLOPs a frozen-base adapter step needs at minimum (the convention for MFU; both sides get the same count).

    Forward: every block (projections; causal attention counted as half of the full T x T score and value
    products, 2*T^2*dim per sequence), the adapter attention of the adapted blocks (scores and values over K
    prompts), the prompt K/V projections, the output head. Backward: only activation gradients, and only from the
    first adapted block up (nothing below it needs a gradient), including the head; attention backward costs twice
    its forward (dQ, dK, dV, dP); no weight gradients of the frozen base. The optimizer's FLOPs are negligible.
    """
    lin = _linear_flops_per_token(llama)
    kv_dim = llama.n_kv_heads * llama.head_dim
    tokens = batch * seq
    attn = batch * 2 * seq * seq * llama.dim  # causal token attention, per block
    adapter_attn = batch * 4 * seq * adapter_len * llama.dim  # per adapted block
    prompt_kv = 2 * 2 * adapter_len * llama.dim * kv_dim  # wk, wv on the K prompts, per adapted block
    head = 2 * tokens * llama.dim * llama.vocab_size
    forward = llama.n_layers * (tokens * lin + attn) + adapter_layers * (adapter_attn + prompt_kv) + head
    backward = adapter_layers * (tokens * lin + 2 * (attn + adapter_attn) + prompt_kv) + head
    return forward + backward


def decode_bytes_per_step(
    llama: LlamaConfig, adapter_layers: int, adapter_len: int, batch: int, context: float, dtype: torch.dtype
) -> float:
    """Bytes one decoding step must read: every weight except the embedding table (one row per token is read),
    plus the KV cache of ``context`` positions for every row, plus the cached adapter K/V."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv_dim = llama.n_kv_heads * llama.head_dim
    weights = parameter_count(llama) - llama.vocab_size * llama.dim
    kv_cache = batch * llama.n_layers * 2 * kv_dim * context
    adapter_kv = adapter_layers * 2 * adapter_len * kv_dim
    return (weights + kv_cache + adapter_kv) * elem


def device_peaks(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Peak dense TFLOP/s for ``dtype`` and memory bandwidth of a CUDA device (None where unknown; CPU: None).

    FLOP/s: NVIDIA data-sheet figures for 16-bit tensor cores (fp32 has none we can vouch for: pass
    --peak-tflops). Bandwidth: bus width x memory clock x 2 (double data rate) from the device properties.
    """
    peaks: dict[str, Any] = {"peak_tflops": None, "peak_bandwidth_gbs": None, "source": None}
    if device.type != "cuda":
        return peaks
    props = torch.cuda.get_device_properties(device)
    if dtype in (torch.bfloat16, torch.float16):
        peaks["peak_tflops"] = next((t for key, t in DENSE_TFLOPS_16BIT if key in props.name), None)
    bus_bits, clock_khz = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
    if bus_bits and clock_khz:
        peaks["peak_bandwidth_gbs"] = 2 * bus_bits / 8 * clock_khz * 1e3 / 1e9
    peaks["source"] = f"{props.name}: TFLOP/s from data sheet table, bandwidth from device properties"
    return peaks

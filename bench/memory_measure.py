"""``python -m bench memory --measure``: one real training step of a set-up (random weights) and its peak memory,
beside the prediction (bench/memory_predict.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import torch

from bench.memory_setup import Setup, build_model


def _vm_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now; VmHWM: its high-water mark)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``; a torchao tensor (NF4, int8) counts its inner tensors."""
    seen: dict[int, int] = {}

    def visit(t: torch.Tensor) -> None:
        if hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                visit(getattr(t, name))
        else:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in tensors:
        visit(t)
    return sum(seen.values())


def measure_step(setup: Setup, device: torch.device) -> dict[str, Any]:
    """Build the set-up with random weights on ``device``, run one training step (forward with labels, backward,
    AdamW step) so AdamW's moments exist and every code path has run once, then measure a second, identical step.

    CUDA: ``torch.cuda.max_memory_allocated`` of that step (tensors only: not the CUDA context or the caching
    allocator's spare blocks). CPU (run by ``main`` in a fresh subprocess, glibc's mmap threshold fixed at 64 KiB so
    freed tensors go back to the system at once): the tensors held between steps (weights, trainable tensors, AdamW
    state: their storage bytes, counted) plus the step's growth of the resident set, its high-water mark (VmHWM,
    reset through /proc/self/clear_refs just before the step) less the resident set just before it. The growth is
    measured after a first step so that neither side counts library code paged in on first use (~25 MB of
    libtorch), which is no part of the set-up's memory. ``rss_peak_over_imports_bytes`` keeps the plain figure.
    """
    import gc

    import model.checkpoint  # noqa: F401  imported before the baseline of rss_peak_over_imports
    import model.visual  # noqa: F401

    if setup.quantize != "none":
        import torchao.quantization  # noqa: F401
    cpu = device.type == "cpu"
    gc.collect()
    imports = _vm_kib("VmRSS") * 1024 if cpu else torch.cuda.memory_allocated(device)
    net = build_model(setup, device).train()
    net.activation_checkpointing = setup.activation_checkpointing
    optimizer = torch.optim.AdamW([p for _, p in net.trainable_parameters()], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(setup.llama.vocab_size, (setup.batch, setup.seq), generator=gen).to(device)
    images = mask = None
    if setup.images:
        size = net.visual.image_size
        images = torch.randn(setup.batch, 3, size, size).to(device)
        mask = torch.ones(setup.batch, dtype=torch.bool).to(device)
    dtype = getattr(torch, setup.dtype)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = net(tokens, images, image_mask=mask, labels=tokens, loss_chunk=setup.loss_chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    gc.collect()
    state = [t for group in optimizer.state.values() for t in group.values() if torch.is_tensor(t)]
    held = tensor_bytes([*net.parameters(), *net.buffers(), *state])
    if cpu:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        before = _vm_kib("VmRSS") * 1024
    else:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    loss = step()
    if cpu:
        hwm = _vm_kib("VmHWM") * 1024
        peak, how = held + hwm - before, "tensors held between steps + the step's VmHWM growth (clear_refs reset)"
    else:
        torch.cuda.synchronize(device)
        hwm = peak = torch.cuda.max_memory_allocated(device) - imports
        how = "torch.cuda.max_memory_allocated of the step"
    return {
        "peak_bytes": peak,
        "held_between_steps_bytes": held,
        "rss_peak_over_imports_bytes": hwm - imports,
        "loss": loss,
        "how": how,
        "device": str(device),
    }


def measure_in_subprocess(setup: Setup, device: torch.device) -> dict[str, Any]:
    """``measure_step`` in a fresh Python process (CPU: nothing else resident in it; CUDA: a clean allocator)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "bench.memory_measure", json.dumps(dataclasses.asdict(setup)), str(device)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    if out.returncode != 0:
        raise RuntimeError(f"the measuring process failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the measuring subprocess: python -m bench.memory_measure SETUP_JSON DEVICE
    result = measure_step(Setup(**json.loads(sys.argv[1])), torch.device(sys.argv[2]))
    print(json.dumps(result))

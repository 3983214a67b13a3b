"""Run both sides of a benchmark, ours and PEFT, each in fresh worker processes.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.lengths import length_plan, merge_length_rounds
from bench.measure import DTYPES, ROOT
from bench.methods import peft_config, perturb_zero_init
from bench.shapes import BenchShape, get_shape, hf_config_kwargs
from bench.worker import SIDES, SideSpec, spec_json, summarize_generate, summarize_train

if TYPE_CHECKING:
    from bench.config import BenchConfig


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
    plan = length_plan(cfg)
    return {"length_steps": plan[side], "length_warmup": plan["warmup"]}


def merge_rounds(cfg: BenchConfig, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the timed steps of several runs of one side; peaks are the largest seen."""
    if cfg.lengths is not None:
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

"""One side of one benchmark, run in a fresh process: ``python -m bench.worker SPEC.json RESULT.json``.

A fresh process per side keeps the measurements honest: nothing of the other side is resident or cached, and
each side imports only what it needs (ours: torch + model/; PEFT: torch + transformers + peft). Both sides load
the same base directory (Hugging Face layout) and the same PEFT adapter directory written by the parent
(bench/sides.py), draw the same inputs from the same seed and run with the same number of threads.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.lengths import run_train_lengths
from bench.measure import DTYPES, current_memory_bytes, now, peak_memory_bytes, reset_peak_memory
from model.checkpoint import write_text_atomic

SIDES = ("ours", "peft")


@dataclass
class SideSpec:
    """Everything one side needs; written as JSON by the parent."""

    task: Literal["train", "generate"]
    side: Literal["ours", "peft"]
    base_dir: str
    adapter_dir: str
    device: str
    dtype: str
    threads: int
    seed: int
    batches: list[int]
    """train: one batch size; generate: one run per batch size."""
    seq: int
    """train: sequence length; generate: prompt length."""
    new_tokens: int
    steps: int
    """train: timed optimizer steps; generate: timed generations per batch size."""
    warmup: int
    """Untimed steps (train) or generations (generate) before timing."""
    method: str = "llama_adapter"
    """The method of the PEFT adapter in ``adapter_dir`` (bench/methods.py)."""
    compile: bool = False
    """Ours through torch.compile: train, its blocks (compiled during the warmup steps); generate, the decode step
    (compiled during the warmup generations)."""
    length_steps: list[list[list[int]]] | None = None
    """train --lengths: the timed steps, each its rows as [example id, length] (bench/lengths.py)."""
    length_warmup: list[list[int]] | None = None
    """train --lengths: the warmup batch, the same on both sides."""

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        if self.task not in ("train", "generate"):
            raise ValueError(f"task must be train or generate, got {self.task!r}")


def random_tokens(seed: int, vocab_size: int, batch: int, length: int) -> Tensor:
    """The inputs both sides see: uniform token ids from a private CPU generator, (batch, length)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy in fp32, the same expression on both sides."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


# ---- loading --------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A side's model and the two calls the benchmarks make on it."""

    model: nn.Module
    vocab_size: int
    trainable: list[nn.Parameter]
    logits: Callable[[Tensor], Tensor]
    generate: Callable[[Tensor, int], tuple[list[list[int]], list[float]]]
    """(prompt (B, T), new_tokens) -> (new token ids per row, clock reading after each step's token reached the host)"""


def load_ours(spec: SideSpec, device: torch.device, dtype: torch.dtype) -> Loaded:
    """Our Transformer through the public loader: HF base (q/k rows permuted back) + PEFT adapter import."""
    from model import load_model
    from model.decode import generate_tokens

    model = load_model(spec.base_dir, spec.adapter_dir, dtype=dtype, device=device)
    if model.method.name != spec.method:
        raise RuntimeError(f"the PEFT directory loaded as method {model.method.name!r}, expected {spec.method!r}")
    if spec.method == "llama_adapter" and model.config.method.gate_fn != "raw":
        raise RuntimeError("a PEFT adapter must load with gate_fn='raw' to keep PEFT's semantics")
    model.compile_blocks = spec.compile and spec.task == "train"

    def generate(prompt: Tensor, new_tokens: int) -> tuple[list[list[int]], list[float]]:
        rows = prompt.tolist()
        stamps, steps = [], []
        decode = generate_tokens(
            model, rows, max_new_tokens=new_tokens, temperature=0.0, eos_id=None, compile=spec.compile
        )
        for token in decode:
            steps.append(token.tolist())  # device -> host copy: the step has really finished
            stamps.append(time.perf_counter())
        return [list(col) for col in zip(*steps, strict=True)], stamps

    return Loaded(
        model=model,
        vocab_size=model.config.llama.vocab_size,
        trainable=[p for _, p in model.trainable_parameters()],
        logits=model,
        generate=generate,
    )


def load_peft(spec: SideSpec, device: torch.device, dtype: torch.dtype) -> Loaded:
    """transformers' LlamaForCausalLM (SDPA attention) wrapped by PEFT's adapter, as PEFT users load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    base = AutoModelForCausalLM.from_pretrained(spec.base_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model = PeftModel.from_pretrained(base, spec.adapter_dir, is_trainable=spec.task == "train")

    class StepClock(BaseStreamer):
        """generate() pushes the prompt, then each step's tokens (already copied to the host): stamp those."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Tensor) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(prompt: Tensor, new_tokens: int) -> tuple[list[list[int]], list[float]]:
        clock = StepClock()
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,  # random weights: never stop early, decode exactly new_tokens like ours
            pad_token_id=0,
            streamer=clock,
        )
        return out[:, prompt.shape[1] :].tolist(), clock.stamps[1:]

    return Loaded(
        model=model,
        vocab_size=base.config.vocab_size,
        trainable=[p for p in model.parameters() if p.requires_grad],
        # prompt and p-tuning return logits of the soft tokens first: keep the text's, (B, T, vocab) as ours
        logits=lambda tokens: model(input_ids=tokens, use_cache=False).logits[:, -tokens.shape[1] :],
        generate=generate,
    )


# ---- the two benchmarks ---------------------------------------------------------------------------------------------
def run_train(spec: SideSpec, loaded: Loaded, device: torch.device) -> dict[str, Any]:
    """Warmup, then timed AdamW steps over the trainable parameters only; peak memory over the steps."""
    if spec.length_steps is not None:
        return run_train_lengths(spec, loaded, device)
    (batch,) = spec.batches
    tokens = random_tokens(spec.seed, loaded.vocab_size, batch, spec.seq).to(device)
    loaded.model.train()
    optimizer = torch.optim.AdamW(loaded.trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(loaded.logits(tokens), tokens)
        loss.backward()
        optimizer.step()
        return loss.item()

    baseline = current_memory_bytes(device)
    memory_method = reset_peak_memory(device)
    # The first loss comes before any update: with equal weights and inputs both sides must agree on it.
    first_loss = step()
    for _ in range(spec.warmup - 1):
        step()
    step_s = []
    for _ in range(spec.steps):
        start = now(device)
        step()
        step_s.append(now(device) - start)
    return {
        "first_loss": first_loss,
        **summarize_train(step_s, batch * spec.seq),
        "trainable_values": sum(p.numel() for p in loaded.trainable),
        "memory_before_steps_bytes": baseline,
        "peak_memory_bytes": peak_memory_bytes(device),
        "memory_method": memory_method,
    }


def summarize_train(step_s: list[float], tokens_per_step: int) -> dict[str, Any]:
    """Median (headline) and best (least disturbed by other work on the machine) of the timed steps."""
    median = statistics.median(step_s)
    return {
        "step_s": step_s,
        "median_step_s": median,
        "tokens_per_s": tokens_per_step / median,
        "best_tokens_per_s": tokens_per_step / min(step_s),
    }


def summarize_generate(runs: list[dict[str, float]], batch: int, new_tokens: int) -> dict[str, Any]:
    """Medians (headline) and bests over the timed generations of one batch size."""
    ttft = statistics.median(r["ttft_s"] for r in runs)
    decode = statistics.median(r["decode_s"] for r in runs)
    decode_steps = new_tokens - 1
    return {
        "runs": runs,
        "ttft_s": ttft,
        "decode_s": decode,
        "decode_step_s": decode / decode_steps if decode_steps else None,
        "decode_tokens_per_s": batch * decode_steps / decode if decode_steps else None,
        "best_ttft_s": min(r["ttft_s"] for r in runs),
        "best_decode_tokens_per_s": batch * decode_steps / min(r["decode_s"] for r in runs) if decode_steps else None,
    }


def run_generate(spec: SideSpec, loaded: Loaded, device: torch.device) -> dict[str, Any]:
    """Per batch size: warmup generations, then timed greedy generations of exactly ``new_tokens``.

    Time to first token = prefill + first token on the host, from the call. Decode rate = tokens of all rows
    after the first step / time from the first to the last step. Medians over the timed runs.
    """
    loaded.model.eval()
    results = []
    for batch in spec.batches:
        prompt = random_tokens(spec.seed + batch, loaded.vocab_size, batch, spec.seq).to(device)
        for _ in range(spec.warmup):  # full length: every cache length the timed runs will see has been seen once
            loaded.generate(prompt, spec.new_tokens)
        baseline = current_memory_bytes(device)
        memory_method = reset_peak_memory(device)
        runs, first_ids = [], None
        for _ in range(spec.steps):
            start = now(device)
            ids, stamps = loaded.generate(prompt, spec.new_tokens)
            if len(stamps) != spec.new_tokens or any(len(row) != spec.new_tokens for row in ids):
                raise RuntimeError(f"{spec.side}: expected {spec.new_tokens} new tokens, got {len(stamps)} steps")
            first_ids = first_ids or ids
            if ids != first_ids:
                raise RuntimeError(f"{spec.side}: greedy decoding is not deterministic across runs")
            decode_s = stamps[-1] - stamps[0]
            runs.append({"ttft_s": stamps[0] - start, "decode_s": decode_s, "total_s": stamps[-1] - start})
        results.append(
            {
                "batch": batch,
                **summarize_generate(runs, batch, spec.new_tokens),
                "memory_before_bytes": baseline,
                "peak_memory_bytes": peak_memory_bytes(device),
                "memory_method": memory_method,
                "token_ids": first_ids,
            }
        )
    return {"batches": results}


def run_side(spec: SideSpec) -> dict[str, Any]:
    """Load one side, run its benchmark, return the measurements."""
    torch.set_num_threads(spec.threads)
    device, dtype = torch.device(spec.device), DTYPES[spec.dtype]
    start = time.perf_counter()
    loaded = (load_ours if spec.side == "ours" else load_peft)(spec, device, dtype)
    load_s = now(device) - start
    result = (run_train if spec.task == "train" else run_generate)(spec, loaded, device)
    return {"side": spec.side, "load_s": load_s, "threads": torch.get_num_threads(), **result}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m bench.worker SPEC.json RESULT.json")
    spec = SideSpec(**json.loads(Path(argv[0]).read_text()))
    result = run_side(spec)
    out = Path(argv[1])
    write_text_atomic(out, json.dumps(result))


def spec_json(spec: SideSpec) -> str:
    return json.dumps(dataclasses.asdict(spec))


if __name__ == "__main__":
    main(sys.argv[1:])

"""``python -m bench train --lengths alpaca``: useful tokens/s on realistic example lengths, ours with batches
grouped by length (training.batching, the training default) vs PEFT with the usual random dynamic padding.

The fixed-shape ``bench train`` times full rows of ``--seq`` tokens, where padding cannot show. Real instruction
data is ragged: Alpaca examples (template + output, LLaMA tokenizer) are 136 tokens on average, 117 median, 405 at
most (first 100 real records; ../shared/reference/data_formats.md), and a batch is computed at the width of its
longest row. ``alpaca_like_lengths`` draws lengths from a log-normal fitted to those figures; random batches of
them keep 62% (batch 4) and 51% (batch 8) of the computed tokens real, the fractions measured on the real file.

One run, the same weights and the same examples on both sides: the parent draws 52,002 lengths (the size of the
real file), builds the epoch our trainer would run (``grouped_steps``, one process, batch-size steps), and picks
``--steps`` of its steps at random; PEFT gets the same examples shuffled into random batches of the same size, as
Hugging Face's Trainer gives them without ``group_by_length``. Each row is random tokens of its example's length,
right-padded; PEFT gets the attention mask its users pass; both take the loss on real tokens only. Useful tokens/s
= real tokens / time of all timed steps (the steps differ in shape, so totals, not medians). Warmup steps run on
the first random batch, identical on both sides: their first loss must agree.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.measure import current_memory_bytes, now, peak_memory_bytes, reset_peak_memory

if TYPE_CHECKING:
    from bench.config import BenchConfig
    from bench.worker import Loaded, SideSpec

DISTRIBUTIONS = ("alpaca",)
"""Length distributions ``--lengths`` takes."""

ALPACA_EXAMPLES = 52_002
"""Records of the real alpaca_data.json: the size of the epoch the grouped steps are drawn from."""
ALPACA_MEDIAN, ALPACA_SIGMA, ALPACA_MIN, ALPACA_MAX = 117, 0.55, 32, 405
"""Log-normal of median 117 and shape 0.55 (mean 136 before clipping at the template's ~32 tokens and the longest
real example's 405)."""
DEFAULT_BATCH = 8
"""Batch size of the lengths mode when --batch is left out: the batch of the recorded 51% random-padding figure."""


def alpaca_like_lengths(n: int, seed: int) -> list[int]:
    """``n`` token lengths with Alpaca's statistics (mean ~136, median ~117, max 405), reproducibly from ``seed``."""
    rng = random.Random(seed)
    return [
        min(max(round(math.exp(rng.gauss(math.log(ALPACA_MEDIAN), ALPACA_SIGMA))), ALPACA_MIN), ALPACA_MAX)
        for _ in range(n)
    ]


def useful_fraction(steps: list[list[int]], lengths: list[int], batch: int) -> float:
    """Real tokens / computed tokens when each step's rows are cut into batches of ``batch``, each padded to its
    longest row."""
    real = computed = 0
    for step in steps:
        for i in range(0, len(step), batch):
            rows = [lengths[k] for k in step[i : i + batch]]
            real, computed = real + sum(rows), computed + len(rows) * max(rows)
    return real / computed


def random_batches(n: int, batch: int, seed: int) -> list[list[int]]:
    """Indices 0..n-1 shuffled and cut into batches (the usual random sampler, last batch kept)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch] for i in range(0, n, batch)]


def length_plan(cfg: BenchConfig) -> dict[str, Any]:
    """Both sides' timed steps as [example id, length] rows, the warmup batch, and the epoch-level useful-token
    fractions of both schedules."""
    from training.batching import grouped_steps

    (batch,) = cfg.batches
    lengths = alpaca_like_lengths(ALPACA_EXAMPLES, cfg.seed)
    grouped = grouped_steps(lengths, world=1, seed=cfg.seed, epoch=0, samples_per_step=batch)
    whole = [step for step in grouped if len(step) == batch]
    ours = random.Random(cfg.seed).sample(whole, cfg.steps)
    picked = [k for step in ours for k in step]
    peft = [[picked[i] for i in rows] for rows in random_batches(len(picked), batch, cfg.seed + 1)]

    def rows(steps: list[list[int]]) -> list[list[list[int]]]:
        return [[[k, lengths[k]] for k in step] for step in steps]

    return {
        "ours": rows(ours),
        "peft": rows(peft),
        "warmup": rows(peft[:1])[0],
        "epoch_useful_grouped": useful_fraction(grouped, lengths, batch),
        "epoch_useful_random": useful_fraction(random_batches(len(lengths), batch, cfg.seed), lengths, batch),
        "lengths_mean": statistics.mean(lengths),
        "lengths_median": statistics.median(lengths),
        "lengths_max": max(lengths),
    }


# ---- worker side ----------------------------------------------------------------------------------------------------
def padded_batch(rows: list[list[int]], vocab_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, labels, attention mask), each (B, T) at the longest row: an example's tokens are drawn from its id
    (the same on both sides whatever batch it is in), right-padded with 0, labels -100 on the padding."""
    width = max(length for _, length in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (example, length) in enumerate(rows):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + example)
        tokens[r, :length] = torch.randint(0, vocab_size, (length,), generator=gen)
        mask[r, :length] = 1
    return tokens, tokens.masked_fill(mask == 0, -100), mask


def run_train_lengths(spec: SideSpec, loaded: Loaded, device: torch.device) -> dict[str, Any]:
    """Warmup on the shared batch, then the side's timed steps: real and computed tokens, time, peak memory."""
    assert spec.length_steps is not None and spec.length_warmup is not None
    loaded.model.train()
    optimizer = torch.optim.AdamW(loaded.trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)

    def step(rows: list[list[int]]) -> float:
        tokens, labels, mask = (t.to(device) for t in padded_batch(rows, loaded.vocab_size, spec.seed))
        optimizer.zero_grad(set_to_none=True)
        if spec.side == "peft":  # the attention mask the data collator hands PEFT users
            logits = loaded.model(input_ids=tokens, attention_mask=mask, use_cache=False).logits[:, -tokens.shape[1] :]
        else:  # right padding under causal attention: no real token sees a pad, no mask needed
            logits = loaded.logits(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        return loss.item()

    baseline = current_memory_bytes(device)
    memory_method = reset_peak_memory(device)
    first_loss = step(spec.length_warmup)
    for _ in range(spec.warmup - 1):
        step(spec.length_warmup)
    step_s = []
    for rows in spec.length_steps:
        start = now(device)
        step(rows)
        step_s.append(now(device) - start)
    real = sum(length for rows in spec.length_steps for _, length in rows)
    computed = sum(len(rows) * max(length for _, length in rows) for rows in spec.length_steps)
    return {
        "first_loss": first_loss,
        "step_s": step_s,
        "real_tokens": real,
        "computed_tokens": computed,
        "trainable_values": sum(p.numel() for p in loaded.trainable),
        "memory_before_steps_bytes": baseline,
        "peak_memory_bytes": peak_memory_bytes(device),
        "memory_method": memory_method,
    }


def merge_length_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the rounds of one side (each ran the same steps): totals, and the rates they give."""
    total_s = sum(sum(r["step_s"]) for r in rounds)
    real, computed = sum(r["real_tokens"] for r in rounds), sum(r["computed_tokens"] for r in rounds)
    return {
        **rounds[0],
        "rounds": len(rounds),
        "load_s": min(r["load_s"] for r in rounds),
        "step_s": [t for r in rounds for t in r["step_s"]],
        "real_tokens": real,
        "computed_tokens": computed,
        "total_s": total_s,
        "useful_fraction": real / computed,
        "useful_tokens_per_s": real / total_s,
        "computed_tokens_per_s": computed / total_s,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rounds),
    }

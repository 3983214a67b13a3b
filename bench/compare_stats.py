"""The statistics of ``python -m bench methods`` (bench/compare.py): what its table can and cannot rank.

- A cell (one method, one visual entry): the test score of each seed's run at the chosen learning rate; mean, sample
  standard deviation over seeds, and a 95% interval for the mean, mean +- t(0.975, n - 1) sd / sqrt(n) (Student's
  t; none for one seed). It covers the training noise (seeds) on this test set, not the test set's own sampling.
- A pair of methods: the 95% interval of the difference of their mean scores by a two-level bootstrap that covers
  both noises: each resample draws the test items with replacement (the same items for both methods: paired) and,
  per method, its seeds with replacement, then takes each method's mean correctness over the drawn seeds and items.
  The pair differs significantly when the interval excludes 0. With per-item scores absent (COCO's corpus-level
  CIDEr) only the seeds are resampled. ``RESAMPLES`` draws from a generator seeded with ``BOOTSTRAP_SEED``, so two
  invocations give the same intervals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

RESAMPLES = 4000
BOOTSTRAP_SEED = 0
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # fmt: skip
"""Student's t 0.975 quantile for 1..30 degrees of freedom (tables; beyond 30: 1.96 is within 4%)."""


def t_quantile(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


def cell(scores: Sequence[float]) -> dict[str, Any]:
    """mean, sd (n - 1) and the 95% interval [low, high] of the mean of one cell's per-seed scores (sd and the
    interval None for one seed)."""
    n = len(scores)
    mean = sum(scores) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def pair_interval(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) - mean(b) for per-seed x per-item scores a (Sa, I) and b (Sb, I) (I = 1:
    per-seed scores only), in the units of the scores."""
    n_items = a.shape[1]
    if b.shape[1] != n_items:
        raise ValueError(f"the two methods were scored on {n_items} and {b.shape[1]} items")
    items = rng.integers(0, n_items, size=(RESAMPLES, n_items))  # (R, I): paired over items
    means = []
    for scores in (a, b):
        seeds = rng.integers(0, scores.shape[0], size=(RESAMPLES, scores.shape[0]))  # (R, S)
        drawn = scores[seeds[:, :, None], items[:, None, :]]  # (R, S, I)
        means.append(drawn.mean(axis=(1, 2)))
    low, high = np.percentile(means[0] - means[1], [2.5, 97.5])
    return float(low), float(high)


def significant_pairs(per_method: dict[str, np.ndarray], scale: float = 1.0) -> list[dict[str, Any]]:
    """Every pair of methods (in the given order) with its mean difference, interval (times ``scale``) and whether
    the interval excludes 0; ``per_method``: name -> (seeds, items) scores."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    pairs = []
    for (name_a, a), (name_b, b) in itertools.combinations(per_method.items(), 2):
        low, high = pair_interval(a, b, rng)
        diff = float(a.mean() - b.mean())
        pairs.append({
            "a": name_a, "b": name_b, "difference": diff * scale, "ci95": [low * scale, high * scale],
            "significant": low > 0 or high < 0,
        })  # fmt: skip
    return pairs


def item_matrix(runs: list[dict[str, Any]]) -> np.ndarray | None:
    """(seeds, items) 0 / 1 correctness of runs that recorded ``items`` ({pid: correct}) on the same items, in pid
    order; None when any lacks them."""
    if not runs or any(not r.get("items") for r in runs):
        return None
    pids = sorted(runs[0]["items"], key=lambda p: (len(p), p))
    if any(sorted(r["items"], key=lambda p: (len(p), p)) != pids for r in runs):
        raise ValueError("the seeds of one method were scored on different test items")
    return np.array([[float(r["items"][p]) for p in pids] for r in runs])


def add_statistics(methods: dict[str, dict[str, Any]], key: str, columns: Sequence[str]) -> dict[str, list]:
    """Give every cell of ``methods`` (``{name: {entry: figures, "no_images": ...}}``, as bench/compare_units.py
    makes them) its ``stats`` ({column: ``cell``}) over its seeds, drop the per-item scores, and return each
    entry's pairs of methods compared on ``key`` (``significant_pairs``)."""
    pairs: dict[str, list] = {}
    entries = list(dict.fromkeys(e for m in methods.values() for e in m if e != "no_images"))
    for entry in [*entries, "no_images"]:
        matrices = {}
        scale = 1.0
        for name, m in methods.items():
            figures = m.get(entry)
            runs = [s["test"] for s in (figures or {}).get("seeds", []) if s["error"] is None and s.get("test")]
            if not runs:
                continue
            figures["stats"] = {
                c: cell([t[c] for t in runs]) for c in columns if all(t.get(c) is not None for t in runs)
            }
            if key in figures["stats"]:
                items = item_matrix(runs)
                scale = 100.0 if items is not None else 1.0
                matrices[name] = items if items is not None else np.array([[t[key]] for t in runs])
        if entry != "no_images":
            pairs[entry] = significant_pairs(matrices, scale)
    for m in methods.values():
        for figures in m.values():
            for s in figures.get("seeds", []):
                (s.get("test") or {}).pop("items", None)
            (figures.get("test") or {}).pop("items", None)
            for r in figures.get("sweep", []):
                (r.get("val") or {}).pop("items", None)
    return pairs

"""The files ``python -m bench methods`` (bench/compare.py) writes from its figures: methods.md and methods.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.compare_measure import Scorer


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _mult(x: float | None) -> str:
    return "-" if x is None else f"x{x:g}"


def markdown(report: dict[str, Any], scorer: Scorer) -> str:
    """methods.md: the settings, the scores, the costs and the sweep."""
    s, h, methods = report["settings"], report["header"], report["methods"]
    dev = h["device"]
    machine = dev.get("gpu") or f"{dev['cpu_model']}, {dev['cpu_cores']} cores"
    dirty = " (uncommitted changes)" if h["git_dirty"] else ""
    key = scorer.key
    flags = f" with `{' '.join(s['train_flags'])}`" if s["train_flags"] else ""
    limit = "" if s["eval_limit"] is None else f" (val and test: the first {s['eval_limit']} items)"
    lines = [
        "# Every PEFT method on the same data, steps and machine",
        "",
        f"Recipe `{s['recipe']}`{flags}: {s['steps']} optimizer steps of {s['batch']} examples, seed {s['seed']}; "
        f"learning rate per method: the best val {key} of {', '.join(map(_mult, s['lr_multipliers']))} x the "
        f"recipe's peak lr {s['peak_lr']:.4g}, the chosen run's adapter then scored on test{limit}.",
        f"Machine: {machine}, torch {dev['torch']}; {h['date']}, commit {h['git_commit']}{dirty}.",
        "",
        "## Test scores at the chosen learning rate" + (", with and without images" if scorer.has_control else ""),
        "",
    ]
    control = ["no images: Avg", "no images: IMG"] if scorer.has_control else []
    columns = ["method", "lr", f"val {key}", *scorer.columns, *control]
    rows = []
    for name, m in methods.items():
        test, val = m.get("test") or {}, m.get("val") or {}
        cells = [f"`{name}`", _mult(m["chosen_lr_multiplier"]), _num(val.get(key))]
        cells += [_num(test.get(c)) for c in scorer.columns]
        if scorer.has_control:
            off = (m.get("no_images") or {}).get("test") or {}
            cells += [_num(off.get("Avg")), _num(off.get("IMG"))]
        rows.append(cells)
    lines += _table(columns, rows)
    lines += ["", "## Costs", ""]
    columns = ["method", "trainable values", "saved", "at 7B", "7B + CLIP", "adapter file", "train tokens/s",
               "peak memory MiB", "decode tokens/s", "loss at step 0", "base model's"]  # fmt: skip
    rows = []
    for name, m in methods.items():
        size = m.get("adapter_bytes")
        rows.append([
            f"`{name}`", _num(m.get("trainable_values"), 0), _num(m.get("saved_values"), 0),
            _num(m.get("trainable_values_7b"), 0),
            _num(m.get("trainable_values_7b_clip"), 0), "-" if size is None else f"{size / 2**10:,.1f} KiB",
            _num(m.get("tokens_per_s"), 0), _num(m.get("peak_memory_mib"), 0), _num(m.get("decode_tokens_per_s"), 1),
            _num(m.get("step0_loss"), 4) + (" (= base)" if m.get("starts_as_base") else ""),
            _num(m.get("base_step0_loss"), 4),
        ])  # fmt: skip
    lines += _table(columns, rows)
    lines += ["", f"## Learning-rate sweep: val {key} (final training loss)", ""]
    rows = []
    for name, m in methods.items():
        cells = [f"`{name}`"]
        for r in m["sweep"]:
            cells.append("failed" if r["error"] else f"{_num(r['val'][key])} ({r['final_loss']:.3f})")
        rows.append(cells)
    lines += _table(["method", *map(_mult, s["lr_multipliers"])], rows)
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """Trainable values: what the run trains (method + visual projection); saved: what its adapter file holds
(prefix tuning and P-tuning save their prompts without the MLP / encoder that made them); at 7B on the meta device
with the method's default settings, text-only, and with the CLIP ViT-L/14 projection. Train tokens/s: median of the
logged windows after the first. Peak memory: the training call (CUDA: max allocated; CPU: peak resident size of the
process, Python and torch included). Decode: greedy, batch 1, the first test item, EOS ignored. Loss at step 0: the
fresh adapter on the first global batch of the training split (file order, eval mode) beside the base model without
a method or image; "= base": exactly equal (the method starts as the base model). The control retrains at the chosen
learning rate with --no-images. Written by `python -m bench methods` (bench/compare.py)."""


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(columns) - 1)
    return ["| " + " | ".join(r) + " |" for r in (columns, align, *rows)]


def plot(report: dict[str, Any], scorer: Scorer, path: Path) -> None:
    """methods.png: test score against trainable values (log x), marker area ~ training tokens/s, labelled; hollow
    markers: the same method trained without images."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.checkpoint import atomic_write

    fig, ax = plt.subplots(figsize=(8, 5))
    done = {n: m for n, m in report["methods"].items() if m.get("test") and m.get("trainable_values")}
    fastest = max((m.get("tokens_per_s") or 0 for m in done.values()), default=0) or 1
    for name, m in done.items():
        x, y = m["trainable_values"], m["test"][scorer.key]
        area = 40 + 400 * (m.get("tokens_per_s") or 0) / fastest
        ax.scatter([x], [y], s=area, alpha=0.7)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        off = ((m.get("no_images") or {}).get("test") or {}).get(scorer.key)
        if off is not None:
            ax.scatter([x], [off], s=area, facecolors="none", edgecolors="grey")
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="both", labelsize=7, labelrotation=30)
    ax.set_xlabel("trainable values (run shape, log scale)")
    ax.set_ylabel(f"test {scorer.key}")
    s = report["settings"]
    no_images = "; hollow: trained without images" if scorer.has_control else ""
    ax.set_title(f"{s['recipe']}, {s['steps']} steps: marker area ~ training tokens/s{no_images}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

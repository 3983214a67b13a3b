"""The files ``python -m bench methods`` (bench/compare.py) writes from its figures: methods.md and methods.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.compare_measure import Scorer

ENTRY_TITLES = {
    "native": "native visual entry (each method takes the image its own way)",
    "shared": "shared visual entry (every method text-only; the image as the same gated visual prompt in the same "
    "top layers)",
}
SHOWN_COLUMNS = {"Avg": ("Avg", "IMG", "TXT", "NO"), "CIDEr": ("CIDEr", "BLEU-4")}
"""The test columns the score tables show (every category is in methods.json)."""


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _mult(x: float | None) -> str:
    return "-" if x is None else f"x{x:g}"


def _mean_sd(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "-"
    return _num(stat["mean"]) + ("" if stat["sd"] is None else f" ± {stat['sd']:.2f}")


def _interval(stat: dict[str, Any] | None) -> str:
    return "-" if not stat or stat["ci95"] is None else f"[{stat['ci95'][0]:.2f}, {stat['ci95'][1]:.2f}]"


def markdown(report: dict[str, Any], scorer: Scorer) -> str:
    """methods.md: the settings, the scores per visual entry with their intervals and significant pairs, the
    costs and the learning-rate search."""
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
        f"Recipe `{s['recipe']}`{flags}: {s['steps']} optimizer steps of {s['batch']} examples. Learning rate per "
        f"method and visual entry: the best val {key} of {', '.join(map(_mult, s['lr_multipliers']))} x the "
        f"recipe's peak lr {s['peak_lr']:.4g} (seed {s['seed']}), widened by up to {s['lr_widen']} more points "
        f"while the best is at the edge; then {s['seeds']} seed(s) at that rate scored on test{limit}.",
        f"Machine: {machine}, torch {dev['torch']}; {h['date']}, commit {h['git_commit']}{dirty}.",
    ]
    for entry in s["visual_entries"]:
        lines += _scores(report, scorer, entry)
    lines += _costs(methods, s["visual_entries"])
    lines += ["", f"## Learning-rate search: val {key} (final training loss), seed {s['seed']}", ""]
    rows = []
    for name, m in methods.items():
        for entry in s["visual_entries"]:
            f = m[entry]
            if f.get("same_as_native") and entry != "native":
                continue
            tried = ", ".join(
                f"{_mult(r['lr_multiplier'])}: " + ("failed" if r["error"] else f"{_num(r['val'][key])} "
                                                    f"({r['final_loss']:.3f})")
                for r in f["sweep"]
            )  # fmt: skip
            edge = " (edge)" if f["lr_edge"] else ""
            rows.append([f"`{name}`", entry, _mult(f["chosen_lr_multiplier"]) + edge, tried])
    lines += _table(["method", "entry", "chosen", "tried"], rows)
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def _scores(report: dict[str, Any], scorer: Scorer, entry: str) -> list[str]:
    """The score table of one visual entry and the list of its significant pairs."""
    key, seeds, methods = scorer.key, report["settings"]["seeds"], report["methods"]
    shown = SHOWN_COLUMNS[key]
    control = scorer.has_control and entry == "native"
    lines = ["", f"## Test scores, {ENTRY_TITLES[entry]}", ""]
    columns = ["method", "lr", f"val {key}", f"{key} (mean ± sd)", "95% interval", *shown[1:]]
    columns += [f"no images: {c}" for c in ("Avg", "IMG")] if control else []
    rows = []
    for name, m in methods.items():
        f = m[entry]
        stats = f.get("stats") or {}
        edge = " (edge)" if f["lr_edge"] else ""
        same = " (= native)" if f.get("same_as_native") and entry != "native" else ""
        cells = [f"`{name}`{same}", _mult(f["chosen_lr_multiplier"]) + edge, _num((f.get("val") or {}).get(key))]
        cells += [_mean_sd(stats.get(key)), _interval(stats.get(key))]
        cells += [_mean_sd(stats.get(c)) for c in shown[1:]]
        if control:
            off = m["no_images"].get("stats") or {}
            cells += [_mean_sd(off.get("Avg")), _mean_sd(off.get("IMG"))]
        rows.append(cells)
    lines += _table(columns, rows)
    pairs = report["pairs"].get(entry, [])
    significant = [p for p in pairs if p["significant"]]
    how = "test items and seeds" if key == "Avg" else "seeds"
    end = ":" if significant else "."
    lines += ["", f"{len(significant)} of {len(pairs)} pairs differ significantly on {key} ({seeds} seed(s); 95% "
              f"bootstrap interval of the difference over {how} excludes 0){end}"]  # fmt: skip
    for p in sorted(significant, key=lambda p: -abs(p["difference"])):
        a, b, d = (p["a"], p["b"], p["difference"]) if p["difference"] > 0 else (p["b"], p["a"], -p["difference"])
        low, high = sorted(abs(x) for x in p["ci95"])
        lines.append(f"- `{a}` over `{b}`: +{d:.2f} [{low:.2f}, {high:.2f}]")
    return lines


def _costs(methods: dict[str, Any], entries: list[str]) -> list[str]:
    """The cost table (the first entry's chosen runs)."""
    entry = entries[0]
    lines = ["", f"## Costs ({entry} entry)", ""]
    columns = ["method", "own trainable values", "visual projection", "shared entry", "saved", "at 7B", "7B + CLIP",
               "adapter file", "train tokens/s", "peak memory MiB", "decode tokens/s", "loss at step 0",
               "base model's"]  # fmt: skip
    rows = []
    for name, m in methods.items():
        f = m[entry]
        size = f.get("adapter_bytes")
        rows.append([
            f"`{name}`", _num(f.get("own_values"), 0), _num(f.get("projection_values"), 0),
            _num(f.get("entry_values"), 0), _num(f.get("saved_values"), 0), _num(f.get("trainable_values_7b"), 0),
            _num(f.get("trainable_values_7b_clip"), 0), "-" if size is None else f"{size / 2**10:,.1f} KiB",
            _num(f.get("tokens_per_s"), 0), _num(f.get("peak_memory_mib"), 0), _num(f.get("decode_tokens_per_s"), 1),
            _num(f.get("step0_loss"), 4) + (" (= base)" if f.get("starts_as_base") else ""),
            _num(f.get("base_step0_loss"), 4),
        ])  # fmt: skip
    return lines + _table(columns, rows)


NOTES = """Scores: mean ± sd over the seeds at the chosen learning rate; the 95% interval is the mean's (Student's t
over seeds: the training noise on this test set). A pair differs significantly when the 95% interval of its
difference, from a bootstrap that redraws both the test items (paired) and each method's seeds, excludes 0
(bench/compare_stats.py).
"(edge)": the best learning rate is still the lowest or highest tried after widening. "(= native)": the method's own
image path is the shared one (the gated visual prompt in the same layers): the same model, not trained twice. Own
trainable values: the method's (its own image entry included), apart from the visual projection and the shared
entry's gates; saved: what its adapter file holds (prefix tuning and P-tuning save their prompts without the MLP /
encoder that made them); at 7B on the meta device with the method's default settings, text-only, and with the CLIP
ViT-L/14 projection. Train tokens/s: median of the logged windows after the first. Peak memory: the training call
(CUDA: max allocated; CPU: peak resident size of the process, Python and torch included). Decode: greedy, batch 1,
the first test item, EOS ignored. Loss at step 0: the fresh adapter on the first global batch of the training split
(file order, eval mode) beside the base model without a method or image; "= base": exactly equal. The control
retrains at the native entry's chosen learning rate with --no-images, every seed. Written by `python -m bench
methods` (bench/compare.py)."""


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(columns) - 1)
    return ["| " + " | ".join(r) + " |" for r in (columns, align, *rows)]


def plot(report: dict[str, Any], scorer: Scorer, path: Path) -> None:
    """methods.png: mean test score (error bar: sd over seeds) against each method's own trainable values (log x),
    labelled; one marker per visual entry; hollow: the same method trained without images."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.checkpoint import atomic_write

    fig, ax = plt.subplots(figsize=(8, 5))
    key, markers, labelled = scorer.key, {"native": "o", "shared": "s"}, set()
    for entry in report["settings"]["visual_entries"]:
        for name, m in report["methods"].items():
            f = m[entry]
            stat = (f.get("stats") or {}).get(key)
            if not stat or not f.get("own_values") or (f.get("same_as_native") and entry != "native"):
                continue
            x = f["own_values"]
            label = None if entry in labelled else f"{entry} entry"
            labelled.add(entry)
            ax.errorbar([x], [stat["mean"]], yerr=[stat["sd"] or 0], fmt=markers[entry], alpha=0.75, capsize=3,
                        label=label)  # fmt: skip
            if entry == "native":
                ax.annotate(name, (x, stat["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
                off = ((m.get("no_images") or {}).get("stats") or {}).get(key)
                if off is not None:
                    ax.scatter([x], [off["mean"]], facecolors="none", edgecolors="grey")
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="both", labelsize=7, labelrotation=30)
    ax.set_xlabel("the method's own trainable values (run shape, log scale; visual projection apart)")
    ax.set_ylabel(f"test {key}, mean ± sd over seeds")
    s = report["settings"]
    no_images = "; hollow: trained without images" if scorer.has_control else ""
    ax.set_title(f"{s['recipe']}, {s['steps']} steps, {s['seeds']} seed(s){no_images}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

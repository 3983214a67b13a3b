"""The units of work of ``python -m bench methods`` (bench/compare.py) and the order they run in.

Per method and visual entry (native, shared):

1. The learning-rate search on the recipe's seed, scored on ``val``: the multipliers of ``--lr-sweep``, then, while
   the best is the lowest or the highest multiplier tried, one more beyond it (the grid's ratio at that end), up to
   ``--lr-widen`` more per method and entry. A best still at an edge is flagged (``lr_edge``). A run that failed
   (e.g. a non-finite loss) counts as tried, so a best next to a diverged run is bracketed.
2. The chosen run's adapter on ``test`` with its costs (the ``chosen`` unit), and ``--seeds`` - 1 more seeds at the
   chosen learning rate, trained on ``train`` and scored on ``test``.

A method whose own image path is the gated visual prompt in the shared layers (LoRA, Houlsby, AdaMix) is the same
model with either entry: its shared figures are its native ones (``same_as_native``), not trained twice.

Per method, the control: ``--seeds`` runs without images at the native entry's chosen learning rate, on ``test``.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.compare_measure import (
    decode_tokens_per_s,
    fresh_figures,
    load_trained,
    saved_and_7b_counts,
    train_run,
)
from bench.compare_plan import method_settings, run_config

if TYPE_CHECKING:
    from bench.compare_plan import Plan

DEFAULT_RATIO = 4.0
"""The widening step of a one-point ``--lr-sweep``."""


def choose(sweep: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The sweep run with the best val ``key``; ties to the multiplier nearest 1, then the smaller; None if none
    trained without error."""
    scored = [r for r in sweep if r["error"] is None and r["val"][key] is not None]
    return max(
        scored, key=lambda r: (r["val"][key], -abs(math.log(r["lr_multiplier"])), -r["lr_multiplier"]), default=None
    )


def next_multiplier(tried: list[float], best: float | None) -> float | None:
    """The multiplier beyond the edge where ``best`` lies (below the lowest when every run failed), by the ratio
    of the grid at that end; None when the best is interior."""
    xs = sorted(tried)
    low_ratio = xs[1] / xs[0] if len(xs) > 1 else DEFAULT_RATIO
    high_ratio = xs[-1] / xs[-2] if len(xs) > 1 else DEFAULT_RATIO
    if best is None or best == xs[0]:
        return xs[0] / low_ratio
    if best == xs[-1]:
        return xs[-1] * high_ratio
    return None


def unit_name(method: str, entry: str, multiplier: float, seed: int = 0, images: bool = True) -> str:
    """``lora-native-lr0.25`` (the search, seed 0), ``lora-native-lr0.25-seed1``, ``lora-noimages-lr1-seed0``."""
    name = f"{method}-{entry if images else 'noimages'}-lr{multiplier:g}"
    return name if images and seed == 0 else f"{name}-seed{seed}"


class Units:
    """Units of work with one result file each (OUT/results/<unit>.json), done at most once per OUT."""

    def __init__(self, plan: Plan, bar: Any) -> None:
        self.plan, self.bar = plan, bar
        self.trained = 0
        """Training runs started by this invocation (the resume test counts them)."""

    def do(self, unit: str, work: Callable[[Path], dict[str, Any]], expect: dict[str, Any]) -> dict[str, Any]:
        """The unit's result: read back when done earlier with the values of ``expect``, else ``work(run_dir)``
        (output into OUT/logs/<unit>.log) on a fresh run directory, written with ``expect`` when complete."""
        from bench.measure import run_header
        from data import DataError, read_json
        from eval.common import write_json
        from model.devices import resolve_device

        out = self.plan.out
        path = out / "results" / f"{unit}.json"
        self.bar.set_postfix_str(unit)
        if path.is_file():
            try:
                record = read_json(path)
            except DataError as e:  # truncated or damaged since: the unit is redone, and said so
                self.bar.write(f"{unit}: its result file cannot be read ({e}); redoing the unit")
            else:
                changed = [k for k, v in expect.items() if isinstance(record, dict) and record.get(k) != v]
                if isinstance(record, dict) and record.get("unit") == unit and not changed:
                    self.bar.update(1)
                    return record
                why = f"was made with another {', '.join(changed)}" if changed else "is not this unit's result"
                self.bar.write(f"{unit}: {path} {why}; redoing the unit")
        run_dir, log = out / "runs" / unit, out / "logs" / f"{unit}.log"
        if run_dir.exists():  # a unit interrupted earlier: redone from scratch
            shutil.rmtree(run_dir)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        header, started = run_header(resolve_device(self.plan.base.run.device)), time.perf_counter()
        try:
            with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                record = work(run_dir)
        except BaseException:
            self.bar.write(f"{unit} stopped; its output: {log}")
            raise
        if record.get("error"):
            self.bar.write(f"{unit}: {record['error'].splitlines()[0]} (recorded; output: {log})")
        record = {"unit": unit, **record, **expect, "unit_wall_s": round(time.perf_counter() - started, 1),
                  "header": header}  # fmt: skip
        write_json(path, record)
        self.bar.update(1)
        return record

    def trained_run(
        self, method: str, entry: str, multiplier: float, seed: int = 0, images: bool = True
    ) -> dict[str, Any]:
        """Train at ``multiplier`` x the recipe's peak lr on train with the recipe's seed + ``seed``; score on val
        (the search: seed 0 with images) or on test (the other seeds, the control)."""

        split = "val" if images and seed == 0 else "test"

        def work(run_dir: Path) -> dict[str, Any]:
            cfg = run_config(self.plan, method, multiplier, images, run_dir, entry=entry, seed=seed)
            self.trained += 1
            record = {"method": method, "entry": entry, "lr_multiplier": multiplier, "seed": cfg.run.seed,
                      "lr": cfg.optim.lr, **train_run(cfg, run_dir)}  # fmt: skip
            if record["error"] is None:
                model = load_trained(cfg, run_dir)
                record[split] = self.plan.scorer.score(cfg, model, run_dir, run_dir / f"eval-{split}", split,
                                                       self.plan.eval_limit)  # fmt: skip
            return record

        expect = {"method_settings": method_settings(self.plan, method)}
        return self.do(unit_name(method, entry, multiplier, seed, images), work, expect)

    def chosen(self, method: str, entry: str, best: dict[str, Any] | None) -> dict[str, Any]:
        """The chosen run's adapter on test, its decode speed, sizes and the loss at step 0."""
        from eval.common import file_sha256

        def work(out_dir: Path) -> dict[str, Any]:
            if best is None:
                return {"error": "no learning rate of the sweep trained without error"}
            run_dir = self.plan.out / "runs" / best["unit"]
            cfg = run_config(self.plan, method, best["lr_multiplier"], True, run_dir, entry=entry)
            model, limit = load_trained(cfg, run_dir), self.plan.eval_limit
            prompt, image = self.plan.scorer.sample(cfg)
            figures = {
                "error": None,
                "lr_multiplier": best["lr_multiplier"],
                "test": self.plan.scorer.score(cfg, model, run_dir, out_dir / "eval-test", "test", limit),
                "decode_tokens_per_s": round(decode_tokens_per_s(model, prompt, image), 1),
                "adapter_bytes": (run_dir / "adapter.safetensors").stat().st_size,
                **saved_and_7b_counts(method, model),
            }
            del model  # one model on the device at a time (7B)
            return figures | fresh_figures(cfg)

        expect = {"method_settings": method_settings(self.plan, method)}
        if best is not None:  # the adapter it measures: retrained since (other settings), the unit is redone
            expect["adapter_sha256"] = file_sha256(self.plan.out / "runs" / best["unit"] / "adapter.safetensors")
        return self.do(f"{method}-{entry}-chosen", work, expect)

    def search(self, method: str, entry: str) -> tuple[list[dict[str, Any]], bool]:
        """The learning-rate search (module docstring, step 1): its runs by multiplier, and whether the best is
        still at an edge of the multipliers tried."""
        key = self.plan.scorer.key
        tried = {x: self.trained_run(method, entry, x) for x in self.plan.multipliers}
        for _ in range(self.plan.widen):
            best = choose(list(tried.values()), key)
            beyond = next_multiplier(list(tried), best["lr_multiplier"] if best else None)
            if beyond is None:
                break
            self.bar.total += 1
            tried[beyond] = self.trained_run(method, entry, beyond)
        best = choose(list(tried.values()), key)
        edge = best is None or next_multiplier(list(tried), best["lr_multiplier"]) is not None
        return [tried[x] for x in sorted(tried)], edge


def shares_native_entry(plan: Plan, method: str) -> bool:
    """Whether ``method`` with the shared visual entry is its native model (its own image path is the gated
    visual prompt in the shared layers)."""
    from model.methods import method_class
    from model.methods.visual_prompt import with_shared_visual
    from training.run import method_config

    cls = method_class(method)
    if with_shared_visual(cls) is not cls:
        return False
    cfg = run_config(plan, method, 1.0, True, plan.out, entry="shared")
    return cfg.model.visual.shared_layers == getattr(method_config(cfg), "visual_layers", None)


def compare(plan: Plan) -> tuple[dict[str, dict[str, Any]], int]:
    """Every unit of every method, in order; returns the per-method figures ({entry: figures, "no_images": ...})
    and the number of training runs this invocation started."""
    from tqdm.auto import tqdm

    seeds = plan.seeds
    per_entry = len(plan.multipliers) + 1 + (seeds - 1)
    per_method = len(plan.entries) * per_entry + plan.scorer.has_control * seeds
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(plan.methods) * per_method, desc="bench methods", unit="run", dynamic_ncols=True) as bar:
        units = Units(plan, bar)
        for method in plan.methods:
            figures: dict[str, Any] = {}
            for entry in plan.entries:
                if entry == "shared" and "native" in figures and shares_native_entry(plan, method):
                    figures["shared"] = {**figures["native"], "same_as_native": True}
                    bar.update(per_entry)
                    continue
                sweep, edge = units.search(method, entry)
                best = choose(sweep, plan.scorer.key)
                chosen = units.chosen(method, entry, best)
                more = [] if best is None else [
                    units.trained_run(method, entry, best["lr_multiplier"], s) for s in range(1, seeds)
                ]  # fmt: skip
                if best is None:
                    bar.update(seeds - 1)
                figures[entry] = summarize(best, chosen, more, sweep, edge)
            if plan.scorer.has_control:
                x = next((f["chosen_lr_multiplier"] for f in figures.values() if f["chosen_lr_multiplier"]), None)
                runs = [] if x is None else [units.trained_run(method, "native", x, s, images=False)
                                             for s in range(seeds)]  # fmt: skip
                if x is None:
                    bar.update(seeds)
                figures["no_images"] = {"lr_multiplier": x, "seeds": [_test_of(r) for r in runs]}
            results[method] = figures
    return results, units.trained


def _test_of(record: dict[str, Any]) -> dict[str, Any]:
    """A run's seed, error and test scores, as the report keeps them."""
    return {"seed": record.get("seed"), "error": record["error"], "test": record.get("test")}


def summarize(
    best: dict[str, Any] | None,
    chosen: dict[str, Any],
    more: list[dict[str, Any]],
    sweep: list[dict[str, Any]],
    edge: bool,
) -> dict[str, Any]:
    """One method's figures at one visual entry: the chosen run's, every seed's test scores, and the search."""
    keep = ("trainable_values", "own_values", "projection_values", "entry_values", "saved_values",
            "trainable_values_7b", "trainable_values_7b_clip", "adapter_bytes", "decode_tokens_per_s", "step0_loss",
            "base_step0_loss", "test")  # fmt: skip
    figures: dict[str, Any] = {"error": chosen["error"], "chosen_lr_multiplier": None, "lr_edge": edge}
    if best is not None:
        figures |= {"chosen_lr_multiplier": best["lr_multiplier"], "chosen_lr": best["lr"], "val": best["val"]}
        figures |= {k: best[k] for k in ("steps", "final_loss", "tokens_per_s", "peak_memory_mib", "train_wall_s")}
    if chosen["error"] is None:
        figures |= {k: chosen[k] for k in keep if k in chosen}
        figures["starts_as_base"] = chosen["step0_loss"] == chosen["base_step0_loss"]
        figures["seeds"] = [{"seed": best["seed"], "error": None, "test": chosen["test"]}, *map(_test_of, more)]
    figures["sweep"] = [{k: v for k, v in r.items() if k != "header"} for r in sweep]
    return figures

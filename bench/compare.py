"""``python -m bench methods``: every PEFT method on the same frozen base, data, optimizer steps and machine, scored
by the recipe's scorer: OUT/methods.md (tables), OUT/methods.json (every figure, with machine, date, commit) and
OUT/methods.png (test score against trainable values).

The protocol, the same for every method:

- Learning rate: the method trains at each multiplier of the recipe's peak learning rate in ``--lr-sweep`` (default
  0.25, 1, 4: a factor 4 either way, since prompt-style methods usually want more than the adapter's rate and the
  weight-wrapping ones less) on the ``train`` split, and is scored on ``val``. The best val score (ScienceQA: Avg;
  COCO: CIDEr) wins; ties go to the multiplier nearest 1 (then the smaller). A run whose loss became non-finite
  (or that failed otherwise) is recorded with its error and never chosen. The chosen run's adapter, not a
  retrained one, is then scored on ``test``.
- Control: the chosen learning rate trained again with ``--no-images`` and scored on test: does the method use the
  image? (COCO has no control: a captioner without the image has nothing to caption.)
- Costs, measured alike for every method (bench/compare_measure.py says how): trainable values of the run and at 7B,
  adapter file size, training tokens/s, peak memory, decode tokens/s, and the loss at step 0 beside the base
  model's (equal exactly for the methods that start as the base model).

Runs execute in this process, one after another (``training.run.run``), seeded by the recipe's run.seed, so two
invocations give the same scores. Each unit of work (a sweep run, the chosen run's test scoring, the control)
writes OUT/results/<unit>.json when complete; an interrupted command resumes from those, and a unit without its
result file is redone from scratch (its run directory is removed first). Every file is written atomically, so a
kill -9 leaves no truncated result; SIGTERM stops like Ctrl-C (the unit under way is abandoned, exit status 143), and
a full disk stops with one error naming the file (status 1). OUT/settings.json holds what must not change between
invocations sharing OUT; ``--methods`` may (run the methods in several pieces).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.compare_measure import (
    DECODE_TOKENS,
    SCORERS,
    Scorer,
    decode_tokens_per_s,
    fresh_figures,
    load_trained,
    saved_and_7b_counts,
    train_run,
)
from bench.compare_report import markdown, plot

if TYPE_CHECKING:
    from training.config import TrainConfig

DEFAULT_LR_MULTIPLIERS = (0.25, 1.0, 4.0)
DEFAULT_OUT = "runs/bench-methods"


def shipped_methods() -> list[str]:
    """The methods of model/methods/ (llama_adapter first, then by name)."""
    from model.methods import method_class, method_names

    names = [n for n in method_names() if method_class(n).__module__.startswith("model.methods.")]
    return sorted(names, key=lambda n: (n != "llama_adapter", n))


def _method_list(text: str) -> list[str]:
    names, choices = [n.strip() for n in text.split(",") if n.strip()], shipped_methods()
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(choices)}"
        )
    return list(dict.fromkeys(names))


def _multipliers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected positive multipliers separated by commas, e.g. 0.25,1,4; got {text!r}"
        )
    return sorted(set(values))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench methods``."""
    from training.config import DEFAULT_RECIPE, load_recipe, recipe_names

    scored = [name for name in recipe_names() if load_recipe(name).data.task in SCORERS]
    parser.add_argument(
        "--recipe", choices=scored, default=DEFAULT_RECIPE, help=f"a train.py recipe with a score ({DEFAULT_RECIPE})"
    )
    parser.add_argument("--steps", type=_positive, help="optimizer steps of every run (default: the recipe's)")
    parser.add_argument("--methods", type=_method_list, help="comma list (default: every shipped method)")
    parser.add_argument(
        "--lr-sweep",
        type=_multipliers,
        default=list(DEFAULT_LR_MULTIPLIERS),
        metavar="X,Y,...",
        help="multipliers of the recipe's peak learning rate tried per method, chosen on val (default 0.25,1,4)",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT}); resumable")
    parser.add_argument("--eval-limit", type=_positive, help="score only the first N items of val and test")
    parser.add_argument(
        "settings",
        nargs="*",
        metavar="-- TRAIN_FLAG",
        help="after --: train.py settings for every run, e.g. -- --base /llama/7B --data /data/scienceqa",
    )


# ==== configuration =================================================================================================
@dataclasses.dataclass
class Plan:
    """What the comparison runs: the shared settings and the per-run variations."""

    base: TrainConfig
    """The recipe with the flags after ``--``, and what every run shares (steps, no evaluation by train.py)."""
    methods: list[str]
    multipliers: list[float]
    steps: int
    peak_lr: float
    eval_limit: int | None
    out: Path
    scorer: Scorer


def make_plan(args: argparse.Namespace) -> Plan:
    """The recipe with the flags after ``--`` (validated as train.py does), the step count and the scorer."""
    from training.batching import ensure_synthetic, load_examples
    from training.cli import parse_args
    from training.config import config_from_dict, config_to_dict
    from training.dist import Dist
    from training.optim import plan_steps

    cfg = parse_args(["--recipe", args.recipe, *args.settings]).config
    if cfg.data.task not in SCORERS:
        raise ValueError(
            f"--recipe {args.recipe}: task {cfg.data.task} has no automatic score; use tiny, scienceqa or coco"
        )
    if cfg.data.synthetic:
        ensure_synthetic(cfg, Dist(0, 1, 0, torch.device("cpu")))
    o = cfg.optim
    recipe_steps = plan_steps(o, len(load_examples(cfg, cfg.data.train_split)), 1)
    steps = args.steps or recipe_steps.schedule.total_steps
    values = config_to_dict(cfg)
    if steps > o.epochs * recipe_steps.steps_per_epoch:  # more epochs, the warmup keeping its share of the schedule
        epochs = math.ceil(steps / recipe_steps.steps_per_epoch) + 1  # + 1: examples too long to train are dropped
        values["optim"] |= {"epochs": epochs, "warmup_epochs": o.warmup_epochs * epochs / o.epochs}
    values["optim"]["max_steps"] = steps
    values["run"] |= {"eval": False, "progress": False, "tensorboard": False, "save_every": steps}
    peak_lr = o.lr if o.lr is not None else o.blr * o.batch_size * o.grad_accum / 256
    return Plan(
        base=config_from_dict(type(cfg), values),
        methods=args.methods or shipped_methods(),
        multipliers=args.lr_sweep,
        steps=steps,
        peak_lr=peak_lr,
        eval_limit=args.eval_limit,
        out=Path(args.out),
        scorer=SCORERS[cfg.data.task],
    )


def run_config(plan: Plan, method: str, multiplier: float, images: bool, run_dir: Path) -> TrainConfig:
    """The settings of one run: the shared ones with its method, learning rate, images and directory."""
    from training.config import config_from_dict, config_to_dict

    values = config_to_dict(plan.base)
    values["model"]["method"] = method
    values["optim"]["lr"] = plan.peak_lr * multiplier
    values["data"]["images"] = images and plan.base.data.images
    values["run"]["out"] = str(run_dir)
    return config_from_dict(type(plan.base), values)


def settings_record(plan: Plan, argv_settings: list[str]) -> dict[str, Any]:
    """What two invocations sharing OUT must agree on (the methods may differ), as JSON values: the command's
    options and every resolved setting the runs share (``config``)."""
    from training.config import config_to_dict

    record = {
        "recipe": plan.base.recipe,
        "train_flags": argv_settings,
        "steps": plan.steps,
        "peak_lr": plan.peak_lr,
        "lr_multipliers": plan.multipliers,
        "eval_limit": plan.eval_limit,
        "seed": plan.base.run.seed,
        "config": config_to_dict(plan.base),
    }
    return json.loads(json.dumps(record))


def settings_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for every (nested, dotted) value that differs."""
    changes = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += settings_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


# ==== the units of work =============================================================================================
def choose(sweep: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The sweep run with the best val ``key``; ties to the multiplier nearest 1, then the smaller; None if none
    trained without error."""
    scored = [r for r in sweep if r["error"] is None and r["val"][key] is not None]
    return max(
        scored, key=lambda r: (r["val"][key], -abs(math.log(r["lr_multiplier"])), -r["lr_multiplier"]), default=None
    )


def unit_name(method: str, multiplier: float, images: bool = True) -> str:
    return f"{method}-lr{multiplier:g}" + ("" if images else "-noimages")


class Units:
    """Units of work with one result file each (OUT/results/<unit>.json), done at most once per OUT."""

    def __init__(self, plan: Plan, bar: Any) -> None:
        self.plan, self.bar = plan, bar
        self.trained = 0
        """Training runs started by this invocation (the resume test counts them)."""

    def do(self, unit: str, work: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """The unit's result: read back when done earlier, else ``work(run_dir)`` (output into OUT/logs/<unit>.log)
        on a fresh run directory, written when complete."""
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
                if isinstance(record, dict) and record.get("unit") == unit:
                    self.bar.update(1)
                    return record
                self.bar.write(f"{unit}: {path} is not this unit's result; redoing the unit")
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
        record = {"unit": unit, **record, "unit_wall_s": round(time.perf_counter() - started, 1), "header": header}
        write_json(path, record)
        self.bar.update(1)
        return record

    def trained_run(self, method: str, multiplier: float, images: bool = True) -> dict[str, Any]:
        """Train at ``multiplier`` x the recipe's peak lr on train; score on val (a sweep run) or, without images
        (the control), on test."""
        split = "val" if images else "test"

        def work(run_dir: Path) -> dict[str, Any]:
            cfg = run_config(self.plan, method, multiplier, images, run_dir)
            self.trained += 1
            record = {"method": method, "lr_multiplier": multiplier, "lr": cfg.optim.lr, **train_run(cfg, run_dir)}
            if record["error"] is None:
                model = load_trained(cfg, run_dir)
                record[split] = self.plan.scorer.score(cfg, model, run_dir, run_dir / f"eval-{split}", split,
                                                       self.plan.eval_limit)  # fmt: skip
            return record

        return self.do(unit_name(method, multiplier, images), work)

    def chosen(self, method: str, best: dict[str, Any] | None) -> dict[str, Any]:
        """The chosen run's adapter on test, its decode speed, sizes and the loss at step 0."""

        def work(out_dir: Path) -> dict[str, Any]:
            if best is None:
                return {"error": "no learning rate of the sweep trained without error"}
            run_dir = self.plan.out / "runs" / best["unit"]
            cfg = run_config(self.plan, method, best["lr_multiplier"], True, run_dir)
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

        return self.do(f"{method}-chosen", work)


def compare(plan: Plan) -> tuple[dict[str, dict[str, Any]], int]:
    """Every unit of every method, in order (sweep, chosen, control); returns the per-method figures and the number
    of training runs this invocation started."""
    from tqdm.auto import tqdm

    per_method = len(plan.multipliers) + 1 + plan.scorer.has_control
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(plan.methods) * per_method, desc="bench methods", unit="run", dynamic_ncols=True) as bar:
        units = Units(plan, bar)
        for method in plan.methods:
            sweep = [units.trained_run(method, x) for x in plan.multipliers]
            best = choose(sweep, plan.scorer.key)
            chosen = units.chosen(method, best)
            control = None
            if plan.scorer.has_control and best is not None:
                control = units.trained_run(method, best["lr_multiplier"], images=False)
            elif plan.scorer.has_control:
                bar.update(1)
            results[method] = summarize(best, chosen, control, sweep)
    return results, units.trained


def summarize(
    best: dict[str, Any] | None, chosen: dict[str, Any], control: dict[str, Any] | None, sweep: list[dict[str, Any]]
) -> dict[str, Any]:
    """One method's figures: the chosen run's, its control's, and the sweep."""
    keep = ("trainable_values", "saved_values", "trainable_values_7b", "trainable_values_7b_clip", "adapter_bytes",
            "decode_tokens_per_s", "step0_loss", "base_step0_loss", "test")  # fmt: skip
    figures: dict[str, Any] = {"error": chosen["error"], "chosen_lr_multiplier": None}
    if best is not None:
        figures |= {"chosen_lr_multiplier": best["lr_multiplier"], "chosen_lr": best["lr"], "val": best["val"]}
        figures |= {k: best[k] for k in ("steps", "final_loss", "tokens_per_s", "peak_memory_mib", "train_wall_s")}
    if chosen["error"] is None:
        figures |= {k: chosen[k] for k in keep}
        figures["starts_as_base"] = chosen["step0_loss"] == chosen["base_step0_loss"]
    if control is not None:
        figures["no_images"] = {"error": control["error"], "test": control.get("test")}
    figures["sweep"] = [{k: v for k, v in r.items() if k != "header"} for r in sweep]
    return figures


# ==== the command ===================================================================================================
class Terminated(BaseException):
    """SIGTERM, raised where the main thread is as Ctrl-C raises KeyboardInterrupt: a BaseException, so that no
    ``except Exception`` on the way records the unit under way as failed; its result file is never written."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated while the block runs; the previous handler is restored after it."""

    def handle(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(args: argparse.Namespace) -> int:
    """Run (or resume) the comparison and write methods.md, methods.json and methods.png into --out."""
    from bench.measure import run_header
    from data import read_json
    from eval.common import write_json
    from model.checkpoint import WriteError, remove_stale_temps, write_text_atomic
    from model.devices import resolve_device
    from training import TrainingError

    try:
        plan = make_plan(args)
    except (ValueError, TrainingError) as e:
        print(f"python -m bench methods: error: {e}", file=sys.stderr)
        return 2
    settings = settings_record(plan, args.settings)
    recorded = plan.out / "settings.json"
    changes = settings_changes(read_json(recorded), settings) if recorded.is_file() else []
    if changes:
        print(f"python -m bench methods: error: {plan.out} holds runs made with other settings ({', '.join(changes)}); "
              "use another --out or delete it", file=sys.stderr)  # fmt: skip
        return 2
    again = f"the same command continues from the finished runs in {plan.out}"
    try:
        write_json(recorded, settings)
        remove_stale_temps(plan.out / "results")  # of result writes a kill -9 cut short
        with sigterm_raises():
            methods, trained = compare(plan)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {again}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"\nterminated (SIGTERM): {again}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except WriteError as e:  # a full disk: the message names the file; the unit under way has no result file
        print(f"python -m bench methods: error: {e}\n(make room, then {again})", file=sys.stderr)
        return 1
    o = plan.base.optim
    report = {
        "header": run_header(resolve_device(plan.base.run.device)),
        "settings": settings | {
            "batch": o.batch_size * o.grad_accum,
            "selection": f"best val {plan.scorer.key}; ties to the multiplier nearest 1, then the smaller",
            "decode_tokens": DECODE_TOKENS,
            "trained_by_this_invocation": trained,
        },
        "methods": methods,
    }  # fmt: skip
    write_json(plan.out / "methods.json", report)
    write_text_atomic(plan.out / "methods.md", markdown(report, plan.scorer))
    plot(report, plan.scorer, plan.out / "methods.png")
    print(f"{plan.out / 'methods.md'}, methods.json, methods.png ({trained} runs trained now)")
    return 0

"""``python -m bench methods``: every PEFT method on the same frozen base, data, optimizer steps and machine, scored
by the recipe's scorer: OUT/methods.md (tables), OUT/methods.json (every figure, with machine, date, commit) and
OUT/methods.png (test score against each method's own trainable values).

The protocol, the same for every method (the units and their order: bench/compare_units.py; the statistics:
bench/compare_stats.py):

- Visual entry (``--visual-entry``): native (each method takes the image its own way) and shared (every method
  runs text-only and the image enters as the same gated visual prompt in the same top layers:
  ``VisualConfig.entry``), reported side by side, so that the table can tell the method from its image path.
- Learning rate: per method and entry, the multipliers of the recipe's peak learning rate in ``--lr-sweep``
  (default 0.25, 1, 4) on the ``train`` split, scored on ``val``; the grid widens by itself while the best is at
  its edge (``--lr-widen`` more points at most; a best still at the edge is flagged). The best val score
  (ScienceQA: Avg; COCO: CIDEr) wins; ties go to the multiplier nearest 1 (then the smaller). A run whose loss
  became non-finite (or that failed otherwise) is recorded with its error and never chosen.
- Seeds (``--seeds``, default 3): the chosen run's adapter and ``--seeds`` - 1 more seeds at the chosen learning
  rate are scored on ``test``: mean, sd and a 95% interval per cell, and for each pair of methods whether their
  difference is significant (a bootstrap over test items and seeds).
- Control: the native entry's chosen learning rate trained again with ``--no-images``, every seed, scored on test:
  does the method use the image? (COCO has no control: a captioner without the image has nothing to caption.)
- Costs, measured alike for every method (bench/compare_measure.py says how): trainable values of the run (the
  method's own apart from the visual projection) and at 7B, adapter file size, training tokens/s, peak memory,
  decode tokens/s, and the loss at step 0 beside the base model's (equal exactly for the methods that start as the
  base model).

Runs execute in this process, one after another (``training.run.run``), seeded by the recipe's run.seed plus the
seed index, so two invocations give the same tables. Each unit of work writes OUT/results/<unit>.json when complete;
an interrupted command resumes from those, and a unit without its result file is redone from scratch (its run
directory is removed first). Every file is written atomically, so a kill -9 leaves no truncated result; SIGTERM
stops like Ctrl-C (the unit under way is abandoned, exit status 143), and a full disk stops with one error naming
the file (status 1). OUT/settings.json holds what must not change between invocations sharing OUT; ``--methods``
may (run the methods in several pieces).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.compare_measure import DECODE_TOKENS, SCORERS, Scorer
from bench.compare_report import markdown, plot
from bench.compare_stats import add_statistics
from bench.compare_units import compare

if TYPE_CHECKING:
    from training.config import TrainConfig

DEFAULT_LR_MULTIPLIERS = (0.25, 1.0, 4.0)
DEFAULT_LR_WIDEN = 3
DEFAULT_SEEDS = 3
ENTRIES = ("native", "shared")
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


def _entries(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in ENTRIES for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(ENTRIES)}, got {text!r}")
    return [e for e in ENTRIES if e in names]


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


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
    parser.add_argument(
        "--lr-widen",
        type=_count,
        default=DEFAULT_LR_WIDEN,
        metavar="N",
        help=f"more multipliers tried beyond the edge while the best is there, per method and entry "
        f"(default {DEFAULT_LR_WIDEN}; 0: the sweep as given)",
    )
    parser.add_argument(
        "--seeds", type=_positive, default=DEFAULT_SEEDS, help=f"seeds per cell at the chosen rate ({DEFAULT_SEEDS})"
    )
    parser.add_argument(
        "--visual-entry",
        type=_entries,
        default=list(ENTRIES),
        metavar="native,shared",
        help="how the image enters the methods: native (each its own way), shared (the same gated visual prompt "
        "for every method), or both (default)",
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
    widen: int
    seeds: int
    entries: list[str]
    """Visual entries compared (without images: the native one only, as shared and native are then the same)."""
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
        widen=args.lr_widen,
        seeds=args.seeds,
        entries=args.visual_entry if cfg.uses_images else ["native"],
        steps=steps,
        peak_lr=peak_lr,
        eval_limit=args.eval_limit,
        out=Path(args.out),
        scorer=SCORERS[cfg.data.task],
    )


def run_config(
    plan: Plan, method: str, multiplier: float, images: bool, run_dir: Path, *, entry: str = "native", seed: int = 0
) -> TrainConfig:
    """The settings of one run: the shared ones with its method, learning rate, images, visual entry, seed (the
    recipe's + ``seed``) and directory."""
    from training.config import config_from_dict, config_to_dict

    values = config_to_dict(plan.base)
    values["model"]["method"] = method
    values["model"]["visual"]["entry"] = entry
    values["optim"]["lr"] = plan.peak_lr * multiplier
    values["data"]["images"] = images and plan.base.data.images
    values["run"]["out"] = str(run_dir)
    values["run"]["seed"] = plan.base.run.seed + seed
    return config_from_dict(type(plan.base), values)


def settings_record(plan: Plan, argv_settings: list[str]) -> dict[str, Any]:
    """What two invocations sharing OUT must agree on (the methods may differ), as JSON values: the command's
    options and every resolved setting the runs share (``config``) but the methods' own sections."""
    from training.config import config_to_dict

    record = {
        "recipe": plan.base.recipe,
        "train_flags": argv_settings,
        "steps": plan.steps,
        "peak_lr": plan.peak_lr,
        "lr_multipliers": plan.multipliers,
        "lr_widen": plan.widen,
        "seeds": plan.seeds,
        "visual_entries": plan.entries,
        "eval_limit": plan.eval_limit,
        "seed": plan.base.run.seed,
        "config": config_to_dict(plan.base),
    }
    sections = set(shipped_methods())
    record["config"]["model"] = {k: v for k, v in record["config"]["model"].items() if k not in sections}
    return json.loads(json.dumps(record))


def method_settings(plan: Plan, method: str) -> dict[str, Any]:
    """``method``'s own section of the shared settings (``--model.<method>.*``), as JSON values: recorded in each
    of its units, which are redone when it changed (settings.json leaves the methods' sections out, so that a
    method added later runs into the same OUT)."""
    from training.config import config_to_dict

    return json.loads(json.dumps(config_to_dict(plan.base)["model"].get(method)))


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
        "pairs": add_statistics(methods, plan.scorer.key, plan.scorer.columns),
    }  # fmt: skip
    write_json(plan.out / "methods.json", report)
    write_text_atomic(plan.out / "methods.md", markdown(report, plan.scorer))
    plot(report, plan.scorer, plan.out / "methods.png")
    print(f"{plan.out / 'methods.md'}, methods.json, methods.png ({trained} runs trained now)")
    return 0

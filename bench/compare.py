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
import math
import signal
import sys
from collections.abc import Iterator
from typing import Any

from bench.compare_measure import DECODE_TOKENS, SCORERS
from bench.compare_plan import make_plan, recorded_changes, settings_record, shipped_methods
from bench.compare_report import markdown, plot
from bench.compare_stats import add_statistics
from bench.compare_units import compare

DEFAULT_LR_MULTIPLIERS = (0.25, 1.0, 4.0)
DEFAULT_LR_WIDEN = 3
DEFAULT_SEEDS = 3
ENTRIES = ("native", "shared")
DEFAULT_OUT = "runs/bench-methods"


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
    changes = recorded_changes(read_json(recorded), settings) if recorded.is_file() else []
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

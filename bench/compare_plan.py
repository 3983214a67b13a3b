"""What ``python -m bench methods`` (bench/compare.py) runs: the plan of shared settings and per-run variations,
each run's settings, and the record of what two invocations sharing OUT must agree on (OUT/settings.json).

Paths inside the repository (the recipe's base and data) are recorded relative to its root, so that a results
folder moved to another checkout, or continued from a git worktree, is the same plan; a record written before
(absolute paths) is read as relative where it points inside this checkout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.compare_measure import SCORERS, Scorer
from bench.measure import ROOT

if TYPE_CHECKING:
    from training.config import TrainConfig


def shipped_methods() -> list[str]:
    """The methods of model/methods/ (llama_adapter first, then by name)."""
    from model.methods import method_class, method_names

    names = [n for n in method_names() if method_class(n).__module__.startswith("model.methods.")]
    return sorted(names, key=lambda n: (n != "llama_adapter", n))


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
    options and every resolved setting the runs share (``config``, paths inside the repository relative to its
    root) but the methods' own sections."""
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
        "config": repo_relative(config_to_dict(plan.base)),
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


def repo_relative(value: Any) -> Any:
    """``value`` with every absolute path inside the repository (in nested dicts and lists too) relative to its
    root; other values as they are."""
    if isinstance(value, dict):
        return {key: repo_relative(v) for key, v in value.items()}
    if isinstance(value, list):
        return [repo_relative(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(os.path.normpath(value))
        if path.is_relative_to(ROOT):
            return path.relative_to(ROOT).as_posix()
    return value


def recorded_changes(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """``settings_changes`` from a recorded settings.json to this invocation's ``settings_record``; the record's
    config paths are read as ``repo_relative`` (records written before held them absolute)."""
    old = {**recorded, "config": repo_relative(recorded.get("config"))} if isinstance(recorded, dict) else {}
    return settings_changes(old, settings)

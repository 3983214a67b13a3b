"""Train LLaMA-Adapter prompts (and the visual projection) on ScienceQA, COCO Caption or Alpaca.

    python train.py                                   # embedded default: tiny model, synthetic ScienceQA, CPU
    python train.py --no-images                       # the same without images (the text-only control)
    python train.py --recipe scienceqa --base /llama/7B --clip-weights /clip/ViT-L-14.safetensors \\
        --data /data/scienceqa
    torchrun --nproc_per_node 8 train.py --recipe alpaca --base /llama/7B --data alpaca_data.json
    python train.py --resume runs/tiny-20250101-120000  # continue a stopped or killed run, as recorded
    python train.py --resume runs/x --epochs 10 --allow-changes  # continue it with a changed setting
    python train.py --recipe coco --help              # every setting, its meaning and the recipe's value

Settings live in four typed dataclasses (model, data, optim, run) filled by a named recipe; every field can be
overridden as ``--section.field VALUE`` (nested: ``--model.adapter.prompt_len 10``), and a few common ones have a
short alias (``--base``, ``--clip``, ``--data``, ``--lr`` ...). Field docstrings are the ``--help`` text.

Only the ``adapter_`` tensors train (``Transformer.trainable_parameters``); the frozen base is loaded once per
process in its dtype (bf16/fp16 on GPU, fp32 on CPU) while the trainable tensors stay fp32 under autocast. Data
parallelism is torch DDP over the trainable tensors (NCCL on GPU, gloo on CPU) with a DistributedSampler; rank 0
logs and saves. The loss of an optimizer step is the token mean over the whole global batch (every micro-batch of
every rank), so a run gives the same updates on 1 or N processes and with any split into gradient accumulation.

A run directory holds config.json (the resolved settings), adapter.safetensors + adapter.json (model.checkpoint),
metrics.jsonl, loss_curve.png, TensorBoard events (tb/, when tensorboard is installed), state.pt (everything needed
to resume: adapter tensors, optimizer, step, data position, RNG states) and, after ScienceQA training,
predictions.json + metrics.json from the test split. Every file is replaced atomically; a write that fails (a full
disk) stops the run with one error naming the file, and --resume continues from the last saved state.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import resource
import signal
import sys
import textwrap
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import AdapterConfig, VisualConfig

REPO_ROOT = Path(__file__).resolve().parent
TINY_BASE = REPO_ROOT / "assets" / "tiny-base"
SYNTHETIC_SCIENCEQA = REPO_ROOT / ".data" / "scienceqa-synthetic"
IGNORE_INDEX = -100

Task = Literal["scienceqa", "coco", "alpaca"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


# ==== configuration ================================================================================================
@dataclass
class ModelArgs:
    """The frozen base model, the adaption prompts and the visual path."""

    base: str | None = None
    """Frozen base: a Meta directory (params.json + consolidated.NN.pth), a Hugging Face directory (config.json +
    *.safetensors) or a preset name (tiny, 7B, 13B: random weights, for smoke tests and benchmarks)."""
    tokenizer: str | None = None
    """tokenizer.model / tokenizer.json, or a directory holding one; None: the one in the base directory."""
    clip_weights: str | None = None
    """Local weights file of the CLIP tower (never downloaded); None for the seeded 'tiny' tower."""
    dtype: DType = "auto"
    """dtype of the frozen base and CLIP tower; trainable tensors always stay float32. auto: float32 on CPU,
    bfloat16 on GPUs that support it, else float16 (with loss scaling)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)


@dataclass
class DataArgs:
    """What to train on and how examples become token sequences."""

    task: Task = "scienceqa"
    """scienceqa (multiple choice, answer 'The answer is (X)'), coco (image captioning) or alpaca (instructions)."""
    path: str | None = None
    """scienceqa: the folder holding problems.json, pid_splits.json and images/; coco: the folder holding the
    Karpathy split dataset_coco.json and the train2014/ val2014/ images; alpaca: the alpaca_data.json file."""
    synthetic: bool = False
    """Generate the synthetic ScienceQA-format dataset (data.synthetic) at data.path if it is absent."""
    images: bool = True
    """Feed images through the CLIP tower (scienceqa, coco). false (--no-images): a text-only adapter, the
    LLaMA-Adapter_T variant for ScienceQA."""
    train_split: str = "train"
    """Split to train on (scienceqa: train / trainval / minitrain; coco: train = Karpathy train + restval)."""
    eval_split: str = "test"
    """Split evaluated after training (scienceqa only)."""
    prompt_format: str = "llama_adapter"
    """ScienceQA prompt layout (data.scienceqa.build_prompt); recorded in the adapter sidecar."""
    max_len: int = 512
    """Longest training sequence in tokens (prompt + answer + EOS); longer examples are truncated."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ValueError(f"data.max_len must be >= 2, got {self.max_len}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class OptimArgs:
    """AdamW with linear warmup then half-cycle cosine decay, per optimizer step (official V1 recipe)."""

    epochs: int = 5
    """Passes over the training split."""
    warmup_epochs: float = 2.0
    """Linear warmup length, in epochs (fractions allowed)."""
    batch_size: int = 4
    """Micro-batch per process; effective batch = batch_size * grad_accum * number of processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    blr: float = 9e-3
    """Base learning rate: lr = blr * effective_batch / 256 (the official V1 scaling rule)."""
    lr: float | None = None
    """Absolute peak learning rate; when set it replaces the blr scaling rule."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.02
    """AdamW weight decay on matrices (prompts, projection weights); never on 1-D tensors (per-head gates,
    biases), as timm's param_groups_weight_decay in the official code."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = None
    """Clip the global gradient norm of the trainable tensors to this value; None: no clipping (official V1)."""
    max_steps: int | None = None
    """Cap on optimizer steps; the schedule is laid out over the capped length (smoke tests, quick trials)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"optim.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.blr <= 0:
            raise ValueError(f"optim.blr must be positive, got {self.blr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be positive (or none), got {self.grad_clip}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"optim.max_steps must be >= 1 (or none), got {self.max_steps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be in [0, 1), got {self.betas}")


@dataclass
class RunArgs:
    """Where the run goes, how often it logs and saves, and what happens after training."""

    out: str | None = None
    """Run directory; None: runs/<recipe>-<date>-<time>. Must not hold another run (use --resume for that)."""
    seed: int = 0
    """Seed of the fresh adapter, the visual projection, data order and every RNG of the run."""
    device: Device = "auto"
    """auto: CUDA when available (one GPU per process under torchrun), else CPU."""
    log_every: int = 10
    """Write metrics.jsonl / TensorBoard every this many optimizer steps (loss averaged over them)."""
    save_every: int = 500
    """Save the resumable state every this many optimizer steps (it is also saved at the end, on Ctrl-C or
    SIGTERM, and at run.stop_after)."""
    stop_after: int | None = None
    """Save and stop once this many optimizer steps are done, without changing the schedule (time-boxed jobs:
    continue later with --resume)."""
    eval: bool = True
    """Evaluate on data.eval_split after training and write predictions.json + metrics.json (scienceqa)."""
    eval_batch_size: int = 32
    """Prompts decoded together (greedy) during evaluation."""
    eval_max_new_tokens: int = 64
    """Longest generated answer during evaluation, in tokens."""
    eval_limit: int | None = None
    """Evaluate only the first N problems of the split (quick checks); None: all of them."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    tensorboard: bool = True
    """Write TensorBoard events to <run>/tb when tensorboard is installed."""

    def __post_init__(self) -> None:
        for name in ("log_every", "save_every", "eval_batch_size", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stop_after", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1 (or none), got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """Everything a run needs; written to <run>/config.json."""

    recipe: str = "tiny"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.data.synthetic and self.data.task != "scienceqa":
            raise ValueError(f"data.synthetic generates ScienceQA only; set it false for data.task={self.data.task}")

    def check_inputs(self) -> None:
        """The recipes for real data leave base and data unset: fail with what to pass."""
        if self.model.base is None:
            raise ValueError(f"recipe {self.recipe!r} needs --base: a Meta or Hugging Face LLaMA directory")
        if self.data.path is None:
            raise ValueError(f"recipe {self.recipe!r} needs --data: {_data_hint(self.data.task)}")

    @property
    def uses_images(self) -> bool:
        """Alpaca has no images; ScienceQA and COCO use them unless --no-images."""
        return self.data.images and self.data.task in ("scienceqa", "coco")


def _data_hint(task: str) -> str:
    return {
        "scienceqa": "the ScienceQA folder holding problems.json, pid_splits.json and images/",
        "coco": "the COCO folder holding dataset_coco.json and the images",
        "alpaca": "the alpaca_data.json file",
    }[task]


def recipe_tiny() -> TrainConfig:
    """The embedded default: tiny base + tiny CLIP on synthetic ScienceQA, CPU, minutes.

    The committed base (scripts/build_tiny_base.py) and the seeded tiny CLIP tower; the synthetic data is
    generated into .data/ on first use. Measured on 2 idle CPU cores: about 30 s in all (data, 600 steps, test
    split); image questions 100% (seeds 0, 1, 2), and with --no-images 36.6% on them (chance 35.7%).
    """
    return TrainConfig(
        recipe="tiny",
        model=ModelArgs(
            base=str(TINY_BASE),
            adapter=AdapterConfig(prompt_len=10, n_layers=3),
            visual=VisualConfig(clip_model="tiny", proj_hidden=128),
        ),
        data=DataArgs(task="scienceqa", path=str(SYNTHETIC_SCIENCEQA), synthetic=True, max_len=256),
        optim=OptimArgs(epochs=6, warmup_epochs=1, batch_size=16, blr=0.3, weight_decay=0.02),
        run=RunArgs(device="cpu", log_every=5, save_every=100, eval_max_new_tokens=16),
    )


def recipe_scienceqa() -> TrainConfig:
    """Paper V1 ScienceQA: LLaMA-7B, K=10, L=30, CLIP ViT-L/14 projection.

    Sec. 5.1 of arXiv 2303.16199. 30 epochs: the ablations' default (Table 6: 30 epochs -> 83.85 val, the figure
    of the 30-layer row of Table 4); the rest is the official V1 script (blr 9e-3, wd 0.02, 2 warmup epochs, 4 per
    GPU, 512 tokens).
    """
    return TrainConfig(
        recipe="scienceqa",
        model=ModelArgs(adapter=AdapterConfig(prompt_len=10, n_layers=30), visual=VisualConfig()),
        data=DataArgs(task="scienceqa"),
        optim=OptimArgs(epochs=30, warmup_epochs=2),
    )


def recipe_coco() -> TrainConfig:
    """COCO Caption (Karpathy split) with the V1 visual prompt.

    The paper gives no COCO schedule; the V1 Alpaca one is used, with 128-token sequences (captions are short).
    """
    return TrainConfig(
        recipe="coco",
        model=ModelArgs(adapter=AdapterConfig(prompt_len=10, n_layers=30), visual=VisualConfig()),
        data=DataArgs(task="coco", max_len=128),
        optim=OptimArgs(epochs=5, warmup_epochs=2),
    )


def recipe_alpaca() -> TrainConfig:
    """Official V1 Alpaca: LLaMA-7B, K=10, L=30, text-only, 5 epochs.

    alpaca_finetuning_v1/finetuning.sh: 2 warmup epochs, blr 9e-3, wd 0.02, 4 per GPU, 512 tokens.
    """
    return TrainConfig(
        recipe="alpaca",
        model=ModelArgs(adapter=AdapterConfig(prompt_len=10, n_layers=30)),
        data=DataArgs(task="alpaca", images=False),
        optim=OptimArgs(epochs=5, warmup_epochs=2),
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "tiny": recipe_tiny,
    "scienceqa": recipe_scienceqa,
    "coco": recipe_coco,
    "alpaca": recipe_alpaca,
}

ALIASES: dict[str, str] = {
    "model.base": "--base",
    "model.tokenizer": "--tokenizer",
    "model.visual.clip_model": "--clip",
    "model.clip_weights": "--clip-weights",
    "data.path": "--data",
    "optim.lr": "--lr",
    "optim.epochs": "--epochs",
    "run.out": "--out",
    "run.seed": "--seed",
}


# ==== dataclasses <-> command line and JSON =========================================================================
SECTIONS = ("model", "data", "optim", "run")


class ConfigError(ValueError):
    """A setting given on the command line or in a run's config.json is unknown or invalid."""


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # source unavailable (frozen app): help without descriptions
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@dataclass
class Setting:
    """One leaf of the configuration tree: its dotted path, type and help text."""

    path: str
    type: Any
    doc: str


def settings(cls: type, prefix: str) -> Iterator[Setting]:
    """Every leaf field of a (nested) dataclass, depth first, as ``prefix.field[.subfield]``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from settings(hints[f.name], path)
        else:
            yield Setting(path, hints[f.name], docs.get(f.name, ""))


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else None


def parse_value(text: str, tp: Any) -> Any:
    """Command-line text -> a value of field type ``tp`` (int, float, str, bool, Literal, tuple, X | None)."""
    options = _union_args(tp)
    if options is not None:
        if type(None) in options and text.strip().lower() in ("none", "null"):
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return parse_value(text, inner)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if text not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}")
        return text
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError("expected true or false")
    if origin is tuple:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(s, args[0]) for s in items)
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values")
        return tuple(parse_value(s, a) for s, a in zip(items, args))
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if tp is int else 'a number'}") from None
    raise TypeError(f"unsupported setting type {tp!r}")


def _metavar(tp: Any) -> str:
    options = _union_args(tp)
    if options is not None:
        (inner,) = [o for o in options if o is not type(None)]
        return f"{_metavar(inner)}|none"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin is tuple:
        return f"{_metavar(args[0])},..." if args[-1] is Ellipsis else ",".join(_metavar(a) for a in args)
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}[tp]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or '""'
    return str(value).lower() if isinstance(value, bool) else str(value)


def get_setting(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _converter(s: Setting) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse_value(text, s.type)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    convert.__name__ = s.path  # argparse names the setting in its error message
    return convert


def build_parser(defaults: TrainConfig) -> argparse.ArgumentParser:
    """The command line: --recipe, --resume, --no-images, --print-config, and --section.field for every setting.

    Values shown in ``--help`` are those of the chosen recipe (or of the run being resumed).
    """
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--recipe", choices=list(RECIPES), help=f"preset of every setting below (default: tiny); {_recipe_help()}"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its state.pt with the settings of its config.json; a setting that "
        "changes what is trained (anything but the logging, saving and evaluation settings, data.num_workers and "
        "batch_size/grad_accum at the same product) is refused unless --allow-changes",
    )
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: apply the settings given that differ from the run's (and a changed training set, "
        "continued from the next epoch boundary); each change is recorded with its step under 'changes' in "
        "config.json",
    )
    parser.add_argument(
        "--no-images", dest="data.images", action="store_const", const=False, help="same as --data.images false"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    for section in SECTIONS:
        cls = type(getattr(defaults, section))
        group = parser.add_argument_group(f"--{section}.*", cls.__doc__)
        for s in settings(cls, section):
            flags = [f"--{s.path}", *([ALIASES[s.path]] if s.path in ALIASES else [])]
            help_text = f"{s.doc} [{defaults.recipe}: {_show(get_setting(defaults, s.path))}]".replace("%", "%%")
            kwargs: dict[str, Any] = dict(dest=s.path, type=_converter(s), metavar=_metavar(s.type), help=help_text)
            if s.type is bool:
                kwargs.update(nargs="?", const=True)  # "--run.eval" alone means true
            group.add_argument(*flags, **kwargs)
    return parser


def _recipe_help() -> str:
    return "; ".join(f"{name}: {fn.__doc__.splitlines()[0].rstrip('.')}" for name, fn in RECIPES.items())


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """Rebuild a (nested) dataclass from plain values; unknown keys and invalid values raise ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"setting {where.rstrip('.') or 'config'} must be an object, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = config_from_dict(tp, value, f"{where}{name}.")
        elif isinstance(value, list):
            value = tuple(value)  # JSON has no tuples; every list-valued setting is a tuple
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        d = d[part]
    d[leaf] = value


RESUME_FREE = frozenset(
    {
        "data.num_workers",
        "data.eval_split",
        "optim.batch_size",  # with grad_accum: load_state refuses a changed product (samples per step)
        "optim.grad_accum",
        "run.out",  # always the resumed directory
        "run.log_every",
        "run.save_every",
        "run.stop_after",
        "run.eval",
        "run.eval_batch_size",
        "run.eval_max_new_tokens",
        "run.eval_limit",
        "run.progress",
        "run.tensorboard",
    }
)
"""Settings a resume may change without --allow-changes: they do not change the adapter a run trains."""


@dataclass
class Resume:
    """A --resume request: the run directory, and the settings the user changes on purpose (--allow-changes)."""

    run_dir: Path
    allow_changes: bool = False
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Setting path -> (recorded value, new value), for settings outside RESUME_FREE."""


@dataclass
class Invocation:
    """What the command line asks for: the resolved settings, and whether to resume or only print them."""

    config: TrainConfig
    resume: Resume | None
    print_only: bool


def parse_args(argv: list[str] | None = None) -> Invocation:
    """Recipe (or the resumed run's config.json), then command-line overrides, validated together.

    Exits with a usage error (status 2) that names the setting for anything unknown or invalid.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    resume = Path(known.resume) if known.resume else None
    try:
        if resume is not None:
            if known.recipe:
                raise ConfigError("--resume continues a run with its recorded settings; drop --recipe")
            defaults = read_run_config(resume)
        else:
            defaults = RECIPES.get(known.recipe or "tiny", recipe_tiny)()
    except ConfigError as e:
        build_parser(recipe_tiny()).error(str(e))
    parser = build_parser(defaults)
    args = vars(parser.parse_args(argv))
    values = config_to_dict(defaults)
    for path, value in args.items():
        if path.split(".")[0] in SECTIONS:
            _set_path(values, path, value)
    if resume is not None:
        values["run"]["out"] = str(resume)
    try:
        cfg = config_from_dict(TrainConfig, values)
        cfg.check_inputs()
    except ValueError as e:
        parser.error(str(e))
    if resume is None:
        if args.get("allow_changes"):
            parser.error("--allow-changes applies to --resume RUN_DIR only")
        return Invocation(cfg, None, bool(args.get("print_config")))
    changes = {
        path: (get_setting(defaults, path), get_setting(cfg, path))
        for path in args
        if path.split(".")[0] in SECTIONS
        and path not in RESUME_FREE
        and get_setting(defaults, path) != get_setting(cfg, path)
    }
    allow = bool(args.get("allow_changes"))
    if changes and not allow:
        parser.error(
            f"--resume {resume} continues the run with the settings of {resume / CONFIG_FILE}; these differ: "
            f"{describe_changes(changes)}. Drop them, or add --allow-changes to apply them from the saved step on "
            "(recorded in config.json)"
        )
    return Invocation(cfg, Resume(resume, allow, changes), bool(args.get("print_config")))


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """'--optim.lr 0.01 -> 0.02, --run.seed 0 -> 1'."""
    return ", ".join(f"--{path} {_show(old)} -> {_show(new)}" for path, (old, new) in changes.items())


def read_run_config(run_dir: Path) -> TrainConfig:
    """The settings recorded in a run directory; run.stop_after is per invocation and is not carried over, and the
    record of accepted changes (see write_run_config) is not a setting."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; --resume takes a run directory written by train.py")
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    if isinstance(values, dict):
        values.pop("changes", None)
        if isinstance(values.get("run"), dict):
            values["run"]["stop_after"] = None
    try:
        return config_from_dict(TrainConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


# ==== processes and devices =========================================================================================
class TrainingError(RuntimeError):
    """A run cannot go on; the message says why and what to try. main() prints it without a traceback."""


@dataclass
class Dist:
    """This process's place in the job (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is 0 of 1)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Pick the device and join the process group: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device=cuda but no CUDA device is available; use --run.device cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, dev)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def all_reduce_sum(x: Tensor, d: Dist) -> Tensor:
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def leave_together(d: Dist) -> None:
    """A barrier as the last collective before every rank stops (the end of a run, or a stop all ranks agreed on).

    Otherwise a rank can reach interpreter teardown while a gloo worker thread still drops the Python tensors of an
    earlier collective; that decref needs the GIL, which a finalizing interpreter cannot give, and the process aborts
    ("terminate called without an active exception"). A barrier's work holds no Python tensors, and waiting on it
    frees the GIL for the workers.
    """
    if d.world > 1:
        dist.barrier()


# ==== model =========================================================================================================
def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The frozen base in ``dtype`` with a fresh zero-init adapter (fp32), the tokenizer, and the visual path.

    Every process builds the same model from the same seed; nothing is broadcast.
    """
    from model import attach_tokenizer, load_model

    try:
        model = load_model(
            cfg.model.base,
            adapter_config=cfg.model.adapter,
            clip=cfg.model.visual if cfg.uses_images else None,
            clip_weights=cfg.model.clip_weights if cfg.uses_images else None,
            dtype=dtype,  # the frozen base and CLIP tower; adapter tensors and the visual projection stay fp32
            device=device,
            seed=cfg.run.seed,
        )
        if cfg.model.tokenizer is not None:
            attach_tokenizer(model, Path(cfg.model.tokenizer))
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(with_flag_names(str(e))) from e
    if model.tokenizer is None:
        raise TrainingError(f"no tokenizer found for base {cfg.model.base}; pass --tokenizer PATH")
    return model


def with_flag_names(message: str) -> str:
    """The model package names config fields (``AdapterConfig.n_layers``); add the flag that sets each one."""
    sections = {"AdapterConfig": "model.adapter", "VisualConfig": "model.visual"}
    fields = re.finditer(r"\b(AdapterConfig|VisualConfig)\.(\w+)", message)
    flags = dict.fromkeys(f"--{sections[m[1]]}.{m[2]}" for m in fields)
    return f"{message} (set with {', '.join(flags)})" if flags else message


def tokenizer_source(cfg: TrainConfig) -> Path | None:
    """The tokenizer file the run uses (recorded in the adapter sidecar)."""
    from model import find_tokenizer

    if cfg.model.tokenizer is not None:
        return Path(cfg.model.tokenizer)
    base = Path(cfg.model.base)
    return find_tokenizer(base) if base.is_dir() else None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable tensors only; no decay on 1-D tensors (per-head gates, biases), as timm's param_groups_weight_decay
    in the official code. (The official 4-D gate (1, H, 1, 1) did get decay; ours is (H,) and does not.)"""
    decay, no_decay = [], []
    for _, p in model.trainable_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Schedule:
    """Per-step learning rate: linear warmup, then half-cycle cosine down to min_lr (official V1 lr_sched)."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ==== data ==========================================================================================================
def ensure_synthetic(cfg: TrainConfig, d: Dist) -> None:
    """Generate the synthetic ScienceQA-format dataset (data.synthetic, its fixed default seed) at data.path once:
    rank 0 writes it, the others wait."""
    from data.synthetic import ensure_scienceqa

    root = Path(cfg.data.path)
    if d.main and not (root / "problems.json").is_file():
        print(f"generating the synthetic ScienceQA-format dataset in {root}", flush=True)
        ensure_scienceqa(root)
    if d.world > 1:
        dist.barrier()


def load_examples(cfg: TrainConfig, split: str) -> list[Any]:
    """Training examples (data.collate.Example) of a split; images dropped when the run is text-only."""
    task, root = cfg.data.task, Path(cfg.data.path)
    try:
        if task == "scienceqa":
            from data.scienceqa import load_problems, to_example

            examples = [to_example(p, cfg.data.prompt_format) for p in load_problems(root, split)]
        elif task == "coco":
            from data.coco import load_examples as load_coco

            examples = load_coco(root, split)
        else:
            from data.alpaca import load_examples as load_alpaca

            examples = load_alpaca(root)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from e
    if not examples:
        raise TrainingError(f"{root}: no {task} examples in split {split!r}")
    if not cfg.uses_images:
        examples = [dataclasses.replace(ex, image=None) for ex in examples]
    return examples


class IndexedCollate:
    """Collates a list of dataset indices into (indices, batch): the indices name the examples in error messages."""

    def __init__(self, examples: list[Any], collator: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.examples, self.collator = examples, collator

    def __call__(self, indices: list[int]) -> tuple[list[int], dict[str, Any]]:
        return indices, self.collator([self.examples[i] for i in indices])


def epoch_indices(n_examples: int, d: Dist, seed: int, epoch: int) -> list[int]:
    """This rank's shuffled share of one epoch (DistributedSampler: the same permutation on every rank, dealt out
    round-robin, padded by repetition to a multiple of the world size)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n_examples), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def step_batches(
    indices: list[int], start: int, batch_size: int, grad_accum: int, collate: IndexedCollate, num_workers: int
) -> Iterator[list[tuple[list[int], dict[str, Any]]]]:
    """The micro-batches of each remaining optimizer step of an epoch, from sample ``start`` (a step boundary).

    A step takes the next batch_size * grad_accum samples of this rank, so the schedule and the data position
    depend only on that product: resuming with half the micro-batch and twice the accumulation is the same run.
    """
    from torch.utils.data import DataLoader

    chunks = [indices[i : i + batch_size] for i in range(start, len(indices), batch_size)]
    loader = DataLoader(chunks, batch_size=None, collate_fn=collate, num_workers=num_workers)
    micro: list[tuple[list[int], dict[str, Any]]] = []
    for item in loader:
        micro.append(item)
        if len(micro) == grad_accum:
            yield micro
            micro = []
    if micro:
        yield micro


# ==== run directory =================================================================================================
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


def write_text_atomic(path: Path, text: str) -> None:
    from model.checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_run_config(run_dir: Path, cfg: TrainConfig, change: dict[str, Any] | None) -> None:
    """config.json: the settings, plus under 'changes' every change accepted on resume (--allow-changes) with the
    step it took effect at; ``change`` is appended to those already recorded."""
    path = run_dir / CONFIG_FILE
    changes = json.loads(path.read_text()).get("changes", []) if path.is_file() else []
    values = config_to_dict(cfg)
    if change:
        changes.append(change)
    if changes:
        values["changes"] = changes
    write_text_atomic(path, json.dumps(values, indent=2) + "\n")


def default_run_dir(recipe: str) -> Path:
    return REPO_ROOT / "runs" / f"{recipe}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(cfg: TrainConfig, resume: Resume | None) -> Path:
    """The run directory: a fresh one must not hold another run; a resumed one must hold config.json."""
    run_dir = Path(cfg.run.out) if cfg.run.out else default_run_dir(cfg.recipe)
    if resume is None and (run_dir / CONFIG_FILE).exists():
        raise TrainingError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick --out")
    return run_dir


def rng_state() -> dict[str, Any]:
    """Every RNG this process could draw from, as plain Python values (gathered across processes as objects and
    read back by torch.load(weights_only=True))."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    def as_tensor(raw: bytes) -> Tensor:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(as_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(as_tensor(state["cuda"]))


def seed_everything(seed: int, rank: int) -> None:
    import numpy as np

    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # the same on every rank: identical fresh adapters without a broadcast


@dataclass
class Position:
    """Where training stands: optimizer steps done, current epoch, samples of this rank consumed in it."""

    step: int = 0
    epoch: int = 0
    sample: int = 0
    examples: int | None = None
    """Size of the training set the epoch and sample count in (None: a state.pt written before it was recorded)."""


def save_state(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    pos: Position,
    d: Dist,
    samples_per_step: int,
) -> None:
    """Write state.pt (collective: every rank sends its RNG state; rank 0 writes). The adapter tensors are inside,
    so state.pt alone resumes the run, whatever happens to adapter.safetensors."""
    rng = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng[0] = rng_state()
    if not d.main:
        return
    from model.checkpoint import atomic_write

    state = {
        "step": pos.step,
        "epoch": pos.epoch,
        "sample": pos.sample,
        "examples": pos.examples,
        "world_size": d.world,
        "samples_per_step": samples_per_step,
        "adapter": {n: t.detach().to("cpu", copy=True) for n, t in model.adapter_state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
    }
    atomic_write(run_dir / STATE_FILE, lambda tmp: save_torch(state, tmp))


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through a file object: a failed write then keeps the OS error (a path gives only torch's
    "unexpected pos" message)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def load_state(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    d: Dist,
    samples_per_step: int,
) -> Position:
    """Restore adapter, optimizer, loss scaler and RNG states from state.pt; the position to continue from."""
    path = run_dir / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt: torch raises RuntimeError, UnpicklingError, EOFError ...
        raise TrainingError(f"{path}: cannot read the saved state ({e})") from e
    if state["world_size"] != d.world:
        raise TrainingError(
            f"{path}: the run used {state['world_size']} process(es), this one {d.world}; resume with the same "
            "number (the data order of each process depends on it)"
        )
    if state["samples_per_step"] != samples_per_step:
        raise TrainingError(
            f"{path}: the run took {state['samples_per_step']} samples per step and process (optim.batch_size x "
            f"optim.grad_accum), this one {samples_per_step}; keep the product (e.g. halve batch_size and double "
            "grad_accum) so that the data position and the schedule stay valid"
        )
    from model.checkpoint import CheckpointError, check_keys

    params = dict(model.trainable_parameters())
    saved = state["adapter"]
    try:
        check_keys(
            {n: tuple(p.shape) for n, p in params.items()},
            {n: tuple(t.shape) for n, t in saved.items()},
            path,
            "adapter tensors",
        )
    except CheckpointError as e:
        raise TrainingError(f"{e}\n(the model settings differ from those the state was saved with)") from e
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, current in zip(optimizer.param_groups, settings):
        group.update(current)  # this invocation's betas, eps, weight decay (a change accepted on resume)
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][d.rank])
    return Position(state["step"], state["epoch"], state["sample"], state.get("examples"))


def data_position_fits(pos: Position, n_examples: int, per_rank: int, cfg: TrainConfig, resume: Resume) -> bool:
    """Whether the saved position counts in this invocation's training set. On a set of another size it is
    meaningless (another shuffle, maybe past the end of the epoch): refused, unless --allow-changes (False)."""
    if pos.examples in (None, n_examples) and pos.sample < per_rank:  # None: only the bound can be checked
        return True
    if not resume.allow_changes:
        saved = "another number of" if pos.examples is None else f"{pos.examples:,}"
        raise TrainingError(
            f"{resume.run_dir}: the saved data position (epoch {pos.epoch + 1}, sample {pos.sample}) is in a "
            f"training set of {saved} examples, but {cfg.data.path} now gives {n_examples:,} "
            f"({cfg.data.train_split} split, up to data.max_len={cfg.data.max_len} tokens).\n"
            f"Resume with the data the run had, start a new run (--out), or continue on this set from the next "
            f"epoch boundary with: python train.py --resume {resume.run_dir} --allow-changes"
        )
    return False


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Complete records of metrics.jsonl (a line cut short by a killed process is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: keep only the records up to the step the state was saved at (later ones are re-done)."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_loss_curve(run_dir: Path) -> None:
    """loss_curve.png from metrics.jsonl: loss (log scale) and learning rate against the optimizer step."""
    records = read_metrics(run_dir / METRICS_FILE)
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.checkpoint import atomic_write

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (token mean)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6, label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title(run_dir.name)
    fig.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(run_dir / CURVE_FILE, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


class MetricsLog:
    """metrics.jsonl (one JSON record per logged step, appended and flushed whole) and TensorBoard, rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step drops events a killed run wrote after its last saved state.
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from model.checkpoint import append_text

        append_text(self.path, json.dumps(record) + "\n")  # a cut line is dropped on resume (truncate_metrics)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ==== training ======================================================================================================
class StopRequest:
    """SIGINT / SIGTERM ask to stop at the next step boundary with the state saved; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this step and saving the state (Ctrl-C again aborts)", file=sys.stderr)


class OutOfMemory(TrainingError):
    """Out of memory in the forward or backward pass (the parameters are still those of the last step)."""


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)  # CPU allocator
    )


def memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory, or the process's peak resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class StepResult:
    loss: float
    """Token-mean loss over the global batch."""
    tokens: int
    """Non-padding tokens processed, all processes together."""
    stop: bool
    """Some process received SIGINT / SIGTERM."""


class Trainer:
    """One optimizer step at a time over micro-batches, identical on every process of the job."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        schedule: Schedule,
        dtype: torch.dtype,
        d: Dist,
        collate: IndexedCollate,
    ) -> None:
        self.cfg, self.model, self.net, self.optimizer, self.scaler = cfg, model, net, optimizer, scaler
        self.schedule, self.dtype, self.d, self.collate = schedule, dtype, d, collate
        self.examples = collate.examples
        self.params = [p for _, p in model.trainable_parameters()]

    def _forward_loss(self, batch: dict[str, Any], denom: float) -> Tensor:
        dev = self.d.device
        tokens = batch["tokens"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        images, mask = batch.get("images"), batch.get("image_mask")
        if images is None and self.model.visual is not None:
            # A micro-batch without images still runs the projection (on blank images, masked out: it adds
            # nothing), so that every step uses every trainable tensor and DDP needs no unused-parameter search.
            size = self.model.visual.image_size
            images, mask = torch.zeros(tokens.shape[0], 3, size, size), torch.zeros(tokens.shape[0], dtype=torch.bool)
        if images is not None:
            images, mask = images.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.net(tokens, images, image_mask=mask)  # (B, T, V)
        # Position t predicts token t+1; the sum over target tokens / the global target count = global token mean.
        loss = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss / denom

    def step(self, micro: list[tuple[list[int], dict[str, Any]]], pos: Position, stop: StopRequest) -> StepResult:
        """Forward/backward every micro-batch, check the loss, all-reduce, clip, update."""
        lr = self.schedule.lr(pos.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        counts = torch.tensor(
            [float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, b in micro))], device=self.d.device
        )
        denom = max(all_reduce_sum(counts, self.d).item(), 1.0)
        loss_sum = torch.zeros((), device=self.d.device)
        bad: tuple[int, list[int], float] | None = None
        n_tokens = 0
        try:
            for j, (indices, batch) in enumerate(micro):
                # Gradients are all-reduced on the last micro-batch only; DDP averages over processes, so the loss is
                # scaled by the world size to make the update the gradient of the global token mean.
                no_sync = hasattr(self.net, "no_sync") and j < len(micro) - 1
                with self.net.no_sync() if no_sync else contextlib.nullcontext():
                    loss = self._forward_loss(batch, denom)
                    if bad is None and not torch.isfinite(loss):
                        bad = (j, indices, loss.item())
                    self.scaler.scale(loss * self.d.world).backward()
                loss_sum += loss.detach()
                n_tokens += int(batch["lengths"].sum())
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise OutOfMemory(self._oom_message(micro, pos)) from None
        flags = torch.stack(
            [
                loss_sum.float(),
                torch.tensor(float(bad is not None), device=self.d.device),
                torch.tensor(float(stop.signal is not None), device=self.d.device),
                torch.tensor(float(n_tokens), device=self.d.device),
            ]
        )
        all_reduce_sum(flags, self.d)
        if flags[1] > 0:
            leave_together(self.d)  # the flag is shared: every rank stops here
            raise TrainingError(self._nonfinite_message(bad, pos, lr, len(micro)))
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=flags[0].item(), tokens=int(flags[3].item()), stop=bool(flags[2] > 0))

    def _example_ids(self, indices: list[int]) -> list[str]:
        ids = []
        for i in indices:
            meta = getattr(self.examples[i], "meta", None) or {}
            named = next((meta[k] for k in ("pid", "id", "image_id") if k in meta), None)
            ids.append(f"{i}" if named is None else f"{i} ({named})")
        return ids

    def _nonfinite_message(self, bad: tuple[int, list[int], float] | None, pos: Position, lr: float, n: int) -> str:
        where = f"optimizer step {pos.step + 1} (epoch {pos.epoch + 1})"
        if bad is None:
            return f"the loss became non-finite on another process at {where}; see that process's message"
        j, indices, value = bad
        rank = f" on rank {self.d.rank}" if self.d.world > 1 else ""
        return (
            f"the loss is {value} at {where}, micro-batch {j + 1} of {n}{rank}; examples (index in the "
            f"{self.cfg.data.train_split} split): {', '.join(self._example_ids(indices))}.\n"
            f"The learning rate was {lr:.3g}: lower it (--optim.blr / --optim.lr) or set --optim.grad_clip; "
            "the parameters of the last saved state are unaffected (continue with --resume RUN_DIR --allow-changes "
            "plus the change)."
        )

    def _oom_message(self, micro: list[tuple[list[int], dict[str, Any]]], pos: Position) -> str:
        o = self.cfg.optim
        batch_tokens = max(tuple(b["tokens"].shape) for _, b in micro)
        smaller = o.batch_size // 2 if o.batch_size % 2 == 0 else 1  # keeps batch_size * grad_accum
        advice = (
            f"--optim.batch_size {smaller} --optim.grad_accum {o.grad_accum * o.batch_size // smaller} "
            "(the same effective batch, so the same run)"
            if o.batch_size > 1
            else f"--data.max_len {self.cfg.data.max_len // 2} (shorter sequences)"
        )
        dtype = "" if self.dtype != torch.float32 or self.d.device.type == "cpu" else " or --model.dtype bfloat16"
        return (
            f"out of memory on {self.d.device} at optimizer step {pos.step + 1}, micro-batch of shape "
            f"{batch_tokens} (batch x tokens), peak {memory_mib(self.d.device):.0f} MiB.\n"
            f"Next thing to try: {advice}{dtype}."
        )


def describe_trainable(model: nn.Module) -> str:
    """'N trainable values (prompts a, gates b, visual projection c)'."""
    groups: dict[str, int] = {}
    for name, p in model.trainable_parameters():
        kind = "visual projection" if name.startswith("visual.") else name.rsplit("_", 1)[-1] + "s"
        groups[kind] = groups.get(kind, 0) + p.numel()
    parts = ", ".join(f"{kind} {n:,}" for kind, n in groups.items())
    return f"{sum(groups.values()):,} trainable values ({parts})"


def save_checkpoint(
    cfg: TrainConfig,
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    pos: Position,
    d: Dist,
) -> None:
    """The resumable state.pt, then the adapter for users (adapter.safetensors + adapter.json), each atomic.

    state.pt first: it is what a resume reads, and it holds the adapter tensors too. A failed write leaves the
    previous state.pt and adapter; an adapter write that fails after state.pt is redone on resume (save_adapter_files).
    """
    save_state(run_dir, model, optimizer, scaler, pos, d, cfg.optim.batch_size * cfg.optim.grad_accum)
    if d.main:
        save_adapter_files(cfg, run_dir, model, pos.step)


def save_adapter_files(cfg: TrainConfig, run_dir: Path, model: nn.Module, step: int) -> None:
    """adapter.safetensors + adapter.json (model.save_adapter) of the model as it is at optimizer step ``step``."""
    from model import save_adapter

    save_adapter(
        model,
        run_dir,
        base=cfg.model.base,
        tokenizer=tokenizer_source(cfg),
        clip_weights=cfg.model.clip_weights if cfg.uses_images else None,
        prompt_format=prompt_format(cfg),
        extra={"recipe": cfg.recipe, "task": cfg.data.task, "step": step, "seed": cfg.run.seed},
    )


def prompt_format(cfg: TrainConfig) -> str:
    return {"scienceqa": cfg.data.prompt_format, "coco": "coco_caption", "alpaca": "alpaca"}[cfg.data.task]


def run(cfg: TrainConfig, resume: Resume | None) -> int:
    """Train (or continue) one run; returns the exit status. Raises TrainingError for anything a user must fix."""
    from model.checkpoint import WriteError

    run_dir = prepare_run_dir(cfg, resume)
    d = setup_distributed(cfg.run.device)
    try:
        return _run(cfg, run_dir, resume, d)
    except WriteError as e:  # a full disk, a lost mount ...: the message names the file
        again = (
            f"continue with: python train.py --resume {run_dir}"
            if (run_dir / CONFIG_FILE).is_file()
            else "run the same command again"
        )
        raise TrainingError(
            f"{e}\n(the run stopped; {run_dir} keeps its last saved state: make room, then {again})"
        ) from e
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, run_dir: Path, resume: Resume | None, d: Dist) -> int:
    started = time.perf_counter()
    say = print if d.main else (lambda *a, **k: None)
    dtype = resolve_dtype(cfg.model.dtype, d.device)
    if cfg.data.synthetic:
        ensure_synthetic(cfg, d)
    seed_everything(cfg.run.seed, d.rank)
    model = build_model(cfg, d.device, dtype)
    from data.collate import Collator, drop_overlong

    transform = model.visual.preprocess if cfg.uses_images else None
    collator = Collator(model.tokenizer, cfg.data.max_len, image_transform=transform)
    examples = drop_overlong(load_examples(cfg, cfg.data.train_split), collator)  # warns with the count
    if not examples:
        raise TrainingError(f"no training example fits in data.max_len={cfg.data.max_len} tokens; raise it")
    collate = IndexedCollate(examples, collator)

    o = cfg.optim
    per_rank = math.ceil(len(examples) / d.world)
    steps_per_epoch = math.ceil(per_rank / (o.batch_size * o.grad_accum))
    total_steps = o.epochs * steps_per_epoch if o.max_steps is None else min(o.max_steps, o.epochs * steps_per_epoch)
    effective_batch = o.batch_size * o.grad_accum * d.world
    peak_lr = o.lr if o.lr is not None else o.blr * effective_batch / 256
    # Warmup keeps its share of the schedule when optim.max_steps shortens it.
    schedule = Schedule(peak_lr, o.min_lr, round(total_steps * o.warmup_epochs / o.epochs), total_steps)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=peak_lr, betas=o.betas, eps=o.eps)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)

    pos = Position(examples=len(examples))
    change: dict[str, Any] = {}
    if resume is not None and (run_dir / STATE_FILE).is_file():
        pos = load_state(run_dir, model, optimizer, scaler, d, o.batch_size * o.grad_accum)
        if not data_position_fits(pos, len(examples), per_rank, cfg, resume):  # accepted: the next epoch boundary
            change["train_examples"] = [pos.examples, len(examples)]
            pos = Position(pos.step, pos.epoch + (pos.sample > 0), 0)
        pos.examples = len(examples)
        say(f"resuming {run_dir} at step {pos.step}/{total_steps} (epoch {pos.epoch + 1}, sample {pos.sample})")
        if d.main:  # the adapter of the state continued from (an adapter write may have failed after state.pt's)
            save_adapter_files(cfg, run_dir, model, pos.step)
    if resume is not None and resume.changes:
        change["settings"] = {path: list(values) for path, values in resume.changes.items()}
        say(f"from step {pos.step} on: {describe_changes(resume.changes)} (--allow-changes)")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, cfg, {"step": pos.step, **change} if change else None)
        truncate_metrics(run_dir / METRICS_FILE, pos.step)

    net: nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Only the trainable tensors are synchronised: every process loaded the same frozen base from disk, so
        # broadcasting billions of frozen values at start-up would be wasted.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        net = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    model.train()

    images = "on" if cfg.uses_images else "off"
    say(
        f"run {run_dir}\n"
        f"{cfg.data.task}: {len(examples):,} {cfg.data.train_split} examples, images {images}"
        f" | {describe_trainable(model)} | base {dtype} on {d.device} x {d.world}\n"
        f"effective batch {effective_batch} | peak lr {peak_lr:.3g} | {steps_per_epoch} steps/epoch x {o.epochs} "
        f"epochs -> {total_steps} steps ({schedule.warmup_steps} warmup)"
    )
    trainer = Trainer(cfg, model, net, optimizer, scaler, schedule, dtype, d, collate)
    start_step = pos.step
    from data import DataError

    try:
        outcome = train_loop(cfg, trainer, run_dir, pos, total_steps, steps_per_epoch, d)
    except DataError as e:  # an unreadable image or record met while loading a batch; the message names it
        hint = f"fix the data, then --resume {run_dir} (with --allow-changes if records were removed)"
        raise TrainingError(f"{e}\n(the last saved state is intact: {hint})") from e
    if d.main:
        plot_loss_curve(run_dir)
    leave_together(d)
    minutes = (time.perf_counter() - started) / 60
    if outcome != "done":
        what = {"stopped": "run.stop_after reached", "SIGINT": "interrupted", "SIGTERM": "terminated"}[outcome]
        say(f"{what} at step {pos.step}/{total_steps} after {minutes:.1f} min; state saved in {run_dir}")
        say(f"continue with: python train.py --resume {run_dir}")
        return 0 if outcome == "stopped" else 128 + getattr(signal, outcome).value
    say(f"trained {total_steps} steps in {minutes:.1f} min; adapter: {run_dir / 'adapter.safetensors'}")
    if cfg.run.eval and cfg.data.task == "scienceqa" and d.main:
        from eval.common import GENERATIONS_FILE

        # Rank 0 alone: no collective is left, so the other processes can finish instead of waiting (a long
        # evaluation would outlast the NCCL timeout).
        if pos.step > start_step:  # a new adapter: answers an earlier evaluation logged are stale
            (run_dir / GENERATIONS_FILE).unlink(missing_ok=True)
        try:
            evaluate_scienceqa(cfg, model, run_dir)
        except ValueError as e:  # EvalError / DataError: a problem with the evaluation split, named in the message
            raise TrainingError(f"evaluation failed: {e}") from e
    return 0


def train_loop(
    cfg: TrainConfig, trainer: Trainer, run_dir: Path, pos: Position, total_steps: int, steps_per_epoch: int, d: Dist
) -> str:
    """Steps until done, run.stop_after or a signal; saves on the way. Returns done | stopped | SIGINT | SIGTERM."""
    from tqdm.auto import tqdm

    log = MetricsLog(run_dir, d.main, cfg.run.tensorboard, pos.step)
    bar = tqdm(total=total_steps, initial=pos.step, unit="step", disable=not (d.main and cfg.run.progress))
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    saved_step = pos.step
    outcome = "done"
    o = cfg.optim
    with StopRequest() as stop:
        while pos.step < total_steps and outcome == "done":
            indices = epoch_indices(len(trainer.examples), d, cfg.run.seed, pos.epoch)
            batches = step_batches(
                indices, pos.sample, o.batch_size, o.grad_accum, trainer.collate, cfg.data.num_workers
            )
            for micro in batches:
                try:
                    result = trainer.step(micro, pos, stop)
                except OutOfMemory:
                    if d.world == 1 and pos.step > saved_step:  # parameters are those of the last completed step
                        save_checkpoint(cfg, run_dir, trainer.model, trainer.optimizer, trainer.scaler, pos, d)
                    raise
                lr = trainer.schedule.lr(pos.step)
                pos.step += 1
                pos.sample += sum(len(indices_) for indices_, _ in micro)
                if pos.sample >= len(indices):
                    pos.epoch, pos.sample = pos.epoch + 1, 0
                window_loss, window_steps, window_tokens = (
                    window_loss + result.loss,
                    window_steps + 1,
                    window_tokens + result.tokens,
                )
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
                if pos.step % cfg.run.log_every == 0 or pos.step == total_steps or result.stop:
                    elapsed = time.perf_counter() - window_start
                    log.write(
                        {
                            "step": pos.step,
                            "epoch": round(pos.step / steps_per_epoch, 4),
                            "loss": window_loss / window_steps,
                            "lr": lr,
                            "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1),
                            "max_memory_mib": round(memory_mib(d.device), 1),
                        }
                    )
                    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
                if result.stop:
                    outcome = stop.signal or "SIGTERM"  # another process received the signal
                elif cfg.run.stop_after is not None and pos.step >= cfg.run.stop_after:
                    outcome = "stopped"
                if outcome != "done" or pos.step == total_steps or pos.step % cfg.run.save_every == 0:
                    save_checkpoint(cfg, run_dir, trainer.model, trainer.optimizer, trainer.scaler, pos, d)
                    saved_step = pos.step
                if outcome != "done" or pos.step >= total_steps:
                    break
    bar.close()
    log.close()
    return outcome


def evaluate_scienceqa(cfg: TrainConfig, model: nn.Module, run_dir: Path) -> dict[str, Any]:
    """Greedy answers on data.eval_split (eval.scienceqa: predictions.json, generations.jsonl), scored like the
    official script into metrics.json, all in the run directory; prints the category table."""
    from data.scienceqa import load_problems
    from eval.common import file_sha256, write_json
    from eval.scienceqa import format_table, predict, score_scienceqa

    problems = load_problems(cfg.data.path, cfg.data.eval_split)[: cfg.run.eval_limit]
    header = {
        "checkpoint": str(run_dir.resolve()),
        "adapter_sha256": file_sha256(run_dir / "adapter.safetensors"),
        "data": str(Path(cfg.data.path).resolve()),
        "split": cfg.data.eval_split,
        "max_new_tokens": cfg.run.eval_max_new_tokens,
    }
    model.eval()
    # A text-only adapter answers the image questions without their image (eval.common drops it).
    predictions = predict(
        model,
        problems,
        run_dir,
        prompt_format=cfg.data.prompt_format,
        header=header,
        batch_size=cfg.run.eval_batch_size,
        max_new_tokens=cfg.run.eval_max_new_tokens,
    )
    metrics = score_scienceqa(problems, predictions["results"], predictions["outputs"])
    metrics = {"split": cfg.data.eval_split, **metrics}
    write_json(run_dir / "metrics.json", metrics)
    label = f"{run_dir.name} ({cfg.data.eval_split}{', no images' if not cfg.uses_images else ''})"
    print(format_table(metrics, label=label))
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (usage errors exit 2 from argparse)."""
    invocation = parse_args(argv)
    if invocation.print_only:
        print(json.dumps(config_to_dict(invocation.config), indent=2))
        return 0
    try:
        return run(invocation.config, invocation.resume)
    except TrainingError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"\n{prefix}error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C: stop now; the last saved state.pt is still whole
        print("\naborted; the run directory keeps its last saved state (continue with --resume)", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())

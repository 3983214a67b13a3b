"""Run-directory state: the files of a run, the RNG states and data position, saving / loading them, and what a
--resume request may change (``RESUME_FREE``, ``Resume``).

A run directory holds config.json (the resolved settings), adapter.safetensors + adapter.json (model.checkpoint),
metrics.jsonl, loss_curve.png and TensorBoard events (tb/; training.metrics), state.pt (everything needed to resume:
adapter tensors, optimizer, step, data position, RNG states) and, after ScienceQA training, predictions.json,
generations.jsonl and metrics.json from the evaluation split. Every file is replaced atomically; a write that fails
(a full disk) stops the run with one error naming the file, and --resume continues from the last saved state. A run
directory that takes no new file (a read-only mount) is refused before any work (``check_run_dir``), and a resume
first removes the temporary files of writes a killed process never finished.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.checkpoint import (
    CheckpointError,
    WriteError,
    atomic_write,
    check_keys,
    check_writable,
    remove_stale_temps,
    write_text_atomic,
)
from training import TrainingError
from training.config import (
    REPO_ROOT,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from training.dist import Dist
from training.migration import migrate_recorded_settings
from training.tasks import TASKS

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


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
        migrate_recorded_settings(values)
    try:
        return config_from_dict(TrainConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


RESUME_FREE = frozenset(
    {
        "data.num_workers",
        "data.eval_split",
        "dist.strategy",  # the same updates under ddp and fsdp; only where the frozen base lives changes
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
        # how the step spends memory and time, not what it computes (gradients equal, or to rounding): a run that
        # ran out of memory resumes with checkpointing on
        "train.activation_checkpointing",
        "train.loss_chunk",
        "train.compile",
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


def resume_changes(recorded: TrainConfig, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Setting path -> (recorded value, new value) of every setting outside RESUME_FREE that ``cfg`` changes."""
    old, new = dict(_flat(config_to_dict(recorded))), dict(_flat(config_to_dict(cfg)))
    return {path: (old[path], new[path]) for path in new if path not in RESUME_FREE and old[path] != new[path]}


def _flat(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """'--optim.lr 0.01 -> 0.02, --run.seed 0 -> 1'."""
    return ", ".join(f"--{path} {_show(old)} -> {_show(new)}" for path, (old, new) in changes.items())


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or '""'
    return str(value).lower() if isinstance(value, bool) else str(value)


def default_run_dir(recipe: str) -> Path:
    """runs/<recipe>-<date>-<time> in the repository."""
    return REPO_ROOT / "runs" / f"{recipe}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(cfg: TrainConfig, resume: Resume | None) -> Path:
    """The run directory: a fresh one must not hold another run; a resumed one must hold config.json."""
    run_dir = Path(cfg.run.out) if cfg.run.out else default_run_dir(cfg.recipe)
    if resume is None and (run_dir / CONFIG_FILE).exists():
        raise TrainingError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick --out")
    return run_dir


def check_run_dir(run_dir: Path, resume: Resume | None) -> None:
    """Before any work (rank 0): the run directory must take new files (TrainingError naming it, e.g. a read-only
    mount); on resume, the temporary files of writes a killed process never finished are removed."""
    if resume is None:
        purpose = "the run writes its files there: pick another --out"
    else:
        purpose = (
            "--resume writes the run's state, adapter and logs there: make it writable, or copy the run folder "
            "elsewhere and resume the copy"
        )
    try:
        check_writable(run_dir, purpose)
    except WriteError as e:
        raise TrainingError(str(e)) from None
    if resume is not None:
        removed = remove_stale_temps(run_dir)
        if removed:
            print(f"removed {len(removed)} unfinished temporary file(s) of a killed run: {', '.join(removed)}")


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
    """Restore the RNGs from a rng_state() record."""
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
    """Seed every RNG: Python and NumPy per rank, torch alike on every rank."""
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


def tokenizer_source(cfg: TrainConfig) -> Path | None:
    """The tokenizer file the run uses (recorded in the adapter sidecar)."""
    from model import find_tokenizer
    from model.hub import resolve_base

    if cfg.model.tokenizer is not None:
        return Path(cfg.model.tokenizer)
    base = Path(resolve_base(cfg.model.base))  # a hub id: its snapshot
    return find_tokenizer(base) if base.is_dir() else None


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
        prompt_format=TASKS[cfg.data.task].format_of(cfg.data.prompt_format),
        extra={"recipe": cfg.recipe, "task": cfg.data.task, "step": step, "seed": cfg.run.seed},
    )

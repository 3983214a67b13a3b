"""One run: settings -> model and data -> (resumed) state -> training loop -> saved adapter -> evaluation.

Data parallelism is torch DDP over the trainable tensors (NCCL on GPU, gloo on CPU) with a DistributedSampler, or with
--dist.strategy fsdp the frozen base sharded by torch FSDP2 (training.dist.shard_frozen_base); rank 0 logs and saves.
Signal handlers (SIGINT / SIGTERM: save and stop) are installed only when asked (``handle_signals``: train.py run as
a program), never by a library call.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.prompts import load_prompt_template
from model.devices import resolve_dtype
from model.methods import MethodConfig
from training import TrainingError
from training.batching import ensure_synthetic, training_set
from training.config import REPO_ROOT, TrainConfig
from training.dist import (
    Dist,
    close_distributed,
    data_parallel,
    is_sharded,
    leave_together,
    setup_distributed,
    sharding_error,
)
from training.metrics import METRICS_FILE, plot_loss_curve, truncate_metrics
from training.optim import StepPlan, build_optimizer, plan_steps
from training.state import (
    CONFIG_FILE,
    STATE_FILE,
    Position,
    Resume,
    check_run_dir,
    data_position_fits,
    describe_changes,
    load_state,
    prepare_run_dir,
    save_adapter_files,
    seed_everything,
    tokenizer_source,
    write_run_config,
)
from training.tasks import TASKS
from training.trainer import Trainer, train_loop


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The frozen base in ``dtype`` with a fresh zero-init adapter (fp32), the tokenizer, and the visual path.

    Every process builds the same model from the same seed; nothing is broadcast.
    """
    from model import attach_tokenizer, load_model

    try:
        model = load_model(
            cfg.model.base,
            adapter_config=method_config(cfg),
            clip=cfg.model.visual if cfg.uses_images else None,
            clip_weights=cfg.model.clip_weights if cfg.uses_images else None,
            random_clip=cfg.model.random_clip,
            dtype=dtype,  # the frozen base and CLIP tower; adapter tensors and the visual projection stay fp32
            device=device,
            seed=cfg.run.seed,
            quantize=None if cfg.model.quantize == "none" else cfg.model.quantize,
        )
        if cfg.model.tokenizer is not None:
            attach_tokenizer(model, Path(cfg.model.tokenizer))
        if cfg.model.init_from is not None:
            start_from(model, Path(cfg.model.init_from))
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(with_flag_names(str(e))) from e
    if model.tokenizer is None:
        raise TrainingError(f"no tokenizer found for base {cfg.model.base}; pass --tokenizer PATH")
    try:  # the examples are rendered with it, and the final evaluation's generation prompts with it
        model.chat_template = load_prompt_template(cfg.data.prompt_template, tokenizer_source(cfg)).chat_template
    except ValueError as e:
        raise TrainingError(f"--data.prompt_template: {e}") from e
    hold_still(model, cfg.optim.trainable)
    return model


def start_from(model: nn.Module, source: Path) -> None:
    """--model.init_from: the trainable tensors an adapter file or run holds (any format load_model reads)."""
    from model.checkpoint import init_trainable, open_adapter

    if not source.exists():
        raise TrainingError(f"--model.init_from {source}: no such adapter file or run directory")
    fresh = init_trainable(model, open_adapter(source, model.config.llama))
    if fresh:
        print(f"started from {source}; {len(fresh)} tensors it does not hold keep their fresh init ({fresh[0]} ...)")


def hold_still(model: nn.Module, parts: tuple[str, ...]) -> None:
    """--optim.trainable: only the trainable tensors whose names contain one of ``parts`` get gradients (all when
    empty); the others keep their values and are still saved."""
    if not parts:
        return
    updated = 0
    for name, p in model.trainable_parameters():
        p.requires_grad_(any(part in name for part in parts))
        updated += p.requires_grad
    if not updated:
        raise TrainingError(f"--optim.trainable {list(parts)}: no trainable tensor's name contains any of them")


def method_config(cfg: TrainConfig) -> MethodConfig:
    """The settings of the PEFT method ``--model.method`` names (its ``--model.<method>.*``; a method registered
    outside model/methods/ has no section and starts from its config's defaults)."""
    from model.methods import method_class

    section = getattr(cfg.model, cfg.model.method, None)
    if section is not None:
        return section
    try:
        return method_class(cfg.model.method).config_class()
    except ValueError as e:
        raise TrainingError(f"--model.method: {e}") from None


def with_flag_names(message: str) -> str:
    """The model package names config fields (``LlamaAdapterConfig.n_layers``); add the flag that sets each one."""
    from model.methods import method_class, method_names

    sections = {"VisualConfig": "model.visual"}
    sections |= {method_class(n).config_class.__name__: f"model.{n}" for n in method_names()}
    fields = re.finditer(r"\b(\w+Config)\.(\w+)", message)
    flags = dict.fromkeys(f"--{sections[m[1]]}.{m[2]}" for m in fields if m[1] in sections)
    return f"{message} (set with {', '.join(flags)})" if flags else message


def run(cfg: TrainConfig, resume: Resume | None = None, *, handle_signals: bool = False) -> int:
    """Train (or continue) one run; returns the exit status. Raises TrainingError for anything a user must fix.

    handle_signals: SIGINT / SIGTERM save the state and stop the run at the next step (train.py as a program);
    otherwise the process's signal handlers are left alone.
    """
    return train_run(cfg, resume, handle_signals=handle_signals)[0]


def train_run(cfg: TrainConfig, resume: Resume | None = None, *, handle_signals: bool = False) -> tuple[int, str]:
    """``run``, also returning how training ended: done, stopped (run.stop_after), SIGINT or SIGTERM."""
    from model.checkpoint import WriteError

    run_dir = prepare_run_dir(cfg, resume)
    d = setup_distributed(cfg.run.device)
    try:
        if d.main:
            check_run_dir(run_dir, resume)
        return _run(cfg, run_dir, resume, d, handle_signals)
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
        close_distributed(d)


def _run(cfg: TrainConfig, run_dir: Path, resume: Resume | None, d: Dist, handle_signals: bool) -> tuple[int, str]:
    started = time.perf_counter()
    dtype = resolve_dtype(cfg.model.dtype, d.device)
    if cfg.data.synthetic:
        ensure_synthetic(cfg, d)
    seed_everything(cfg.run.seed, d.rank)
    sharded = cfg.dist.strategy == "fsdp" and d.world > 1
    if cfg.dist.strategy == "fsdp" and not sharded:
        d.say("--dist.strategy fsdp on one process: nothing to shard, the model runs whole")
    # fsdp builds on the CPU: no GPU ever holds the whole base; fully_shard moves each process's shards to its device.
    model = build_model(cfg, torch.device("cpu") if sharded else d.device, dtype)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    model.compile_blocks = cfg.train.compile  # before data_parallel: fsdp refuses it (shard_frozen_base)
    collate = training_set(cfg, model)
    net = data_parallel(model, d, cfg.dist.strategy)  # before the optimizer and its state: fsdp moves the tensors

    o = cfg.optim
    plan = plan_steps(o, len(collate.examples), d.world)
    schedule = plan.schedule
    optimizer = build_optimizer(model, o, schedule.peak_lr)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    pos = resume_position(cfg, run_dir, resume, model, optimizer, scaler, d, plan)
    model.train()

    images = "on" if cfg.uses_images else "off"
    quantized = "" if cfg.model.quantize == "none" else f", block linears {cfg.model.quantize}"
    strategy = " (fsdp)" if sharded else ""
    updated = sum(p.numel() for _, p in model.trainable_parameters() if p.requires_grad)
    held = f", {updated:,} updated (optim.trainable)" if cfg.optim.trainable else ""
    d.say(
        f"run {run_dir}\n"
        f"{cfg.data.task}: {plan.examples:,} {cfg.data.train_split} examples, images {images}"
        f" | {model.describe_trainable()}{held} | base {dtype}{quantized} on {d.device} x {d.world}{strategy}\n"
        f"effective batch {plan.effective_batch} | peak lr {schedule.peak_lr:.3g} | {plan.steps_per_epoch} "
        f"steps/epoch x {o.epochs} epochs -> {schedule.total_steps} steps ({schedule.warmup_steps} warmup)"
    )
    trainer = Trainer(cfg, model, net, optimizer, scaler, schedule, dtype, d, collate)
    start_step = pos.step
    from data import DataError

    try:
        outcome = train_loop(cfg, trainer, run_dir, pos, plan, handle_signals)
    except DataError as e:  # an unreadable image or record met while loading a batch; the message names it
        hint = f"fix the data, then --resume {run_dir} (with --allow-changes if records were removed)"
        raise TrainingError(f"{e}\n(the last saved state is intact: {hint})") from e
    except RuntimeError as e:
        error = sharding_error(e, cfg.model.method) if is_sharded(net) else None
        if error is None:
            raise
        raise error from e
    if d.main:
        plot_loss_curve(run_dir)
    leave_together(d)
    minutes = (time.perf_counter() - started) / 60
    total_steps = schedule.total_steps
    if outcome != "done":
        what = {"stopped": "run.stop_after reached", "SIGINT": "interrupted", "SIGTERM": "terminated"}[outcome]
        d.say(f"{what} at step {pos.step}/{total_steps} after {minutes:.1f} min; state saved in {run_dir}")
        d.say(f"continue with: python train.py --resume {run_dir}")
        return (0 if outcome == "stopped" else 128 + getattr(signal, outcome).value), outcome
    d.say(f"trained {total_steps} steps in {minutes:.1f} min; adapter: {run_dir / 'adapter.safetensors'}")
    task = TASKS[cfg.data.task]
    if cfg.run.eval and task.evaluator is None:
        d.say(f"{task.name} is scored outside train.py: {task.scoring}")
    elif cfg.run.eval and d.main:
        # Rank 0 alone: no collective is left, so the other processes can finish instead of waiting (a long
        # evaluation would outlast the NCCL timeout).
        evaluate(cfg, unsharded_copy(cfg, model, d, dtype) if sharded else model, run_dir, fresh=pos.step > start_step)
    d.say(next_steps(cfg, run_dir))
    return 0, outcome


def unsharded_copy(cfg: TrainConfig, model: nn.Module, d: Dist, dtype: torch.dtype) -> nn.Module:
    """The trained model whole on this process (rank 0's evaluation after an fsdp run): the frozen base built again
    from its files (the same weights: they never changed) with the trained tensors copied in. Simpler than
    gathering every shard, and what ``python -m eval.* --checkpoint RUN_DIR`` would load; the base must fit one
    device (otherwise train with --run.eval false and evaluate where it fits)."""
    whole = build_model(cfg, d.device, dtype)
    trained = dict(model.trainable_parameters())  # replicated, not sharded: whole on every process
    with torch.no_grad():
        for name, p in whole.trainable_parameters():
            p.copy_(trained[name])
    return whole


def next_steps(cfg: TrainConfig, run_dir: Path) -> str:
    """What to do with a finished run: the demo, and the evaluation command for its task."""
    python = python_command()
    lines = ["next:", f"  try it in the demo:   {python} -m app --checkpoint {run_dir}"]
    if cfg.data.task == "scienceqa":
        lines.append(
            f"  evaluate another split: {python} -m eval.scienceqa --checkpoint {run_dir} --data {cfg.data.path} "
            f"--split val --output {run_dir / 'eval-val'}"
        )
    return "\n".join(lines)


def python_command() -> str:
    """How a user runs this interpreter: ``.venv/bin/python`` for the repository's environment, else ``python``."""
    venv = REPO_ROOT / ".venv"
    return ".venv/bin/python" if Path(sys.prefix).resolve() == venv.resolve() else "python"


def resume_position(
    cfg: TrainConfig,
    run_dir: Path,
    resume: Resume | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    d: Dist,
    plan: StepPlan,
) -> Position:
    """Where training starts: step 0, or the state of a resumed run (continued from the next epoch boundary on a
    changed training set, when allowed). Rank 0 then writes config.json (recording any change accepted on resume)
    and drops metrics logged after the saved step."""
    o, n_examples = cfg.optim, plan.examples
    pos = Position(examples=n_examples)
    change: dict[str, Any] = {}
    if resume is not None and (run_dir / STATE_FILE).is_file():
        pos = load_state(run_dir, model, optimizer, scaler, d, o.batch_size * o.grad_accum)
        if not data_position_fits(pos, n_examples, plan.per_rank, cfg, resume):  # accepted: the next epoch boundary
            change["train_examples"] = [pos.examples, n_examples]
            pos = Position(pos.step, pos.epoch + (pos.sample > 0), 0)
        pos.examples = n_examples
        d.say(
            f"resuming {run_dir} at step {pos.step}/{plan.schedule.total_steps} (epoch {pos.epoch + 1}, "
            f"sample {pos.sample})"
        )
        if d.main:  # the adapter of the state continued from (an adapter write may have failed after state.pt's)
            save_adapter_files(cfg, run_dir, model, pos.step)
    if resume is not None and resume.changes:
        change["settings"] = {path: list(values) for path, values in resume.changes.items()}
        d.say(f"from step {pos.step} on: {describe_changes(resume.changes)} (--allow-changes)")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, cfg, {"step": pos.step, **change} if change else None)
        truncate_metrics(run_dir / METRICS_FILE, pos.step)
    return pos


def evaluate(cfg: TrainConfig, model: nn.Module, run_dir: Path, fresh: bool) -> dict[str, Any]:
    """The task's evaluator (training.tasks) on data.eval_split, written into the run directory; ``fresh``: the adapter
    changed in this invocation, so answers an earlier evaluation logged are stale and generated again."""
    from eval.common import GENERATIONS_FILE

    task = TASKS[cfg.data.task]
    if fresh:
        for folder in task.eval_dirs:
            (run_dir / folder / GENERATIONS_FILE).unlink(missing_ok=True)
    model.eval()
    # A text-only adapter answers the image questions without their image (eval.common drops it).
    label = f"{run_dir.name} ({cfg.data.eval_split}{', no images' if not cfg.uses_images else ''})"
    try:
        return task.evaluator(
            model,
            run_dir,
            Path(cfg.data.path),
            cfg.data.eval_split,
            prompt_format=task.format_of(cfg.data.prompt_format),
            batch_size=cfg.run.eval_batch_size,
            max_new_tokens=cfg.run.eval_max_new_tokens,
            limit=cfg.run.eval_limit,
            label=label,
        )
    except ValueError as e:  # EvalError / DataError: a problem with the evaluation split, named in the message
        raise TrainingError(f"evaluation failed: {e}") from e

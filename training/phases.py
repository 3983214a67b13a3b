"""Recipes of several phases, each a run of its own: ``--recipe v2`` is the LLaMA-Adapter V2 multimodal release's
two-stage training as one command.

The release (llama_adapter_v2_multimodal7b, ``phase`` of its LLaMA_adapter) first pretrains on image-caption pairs
the tensors whose names hold gate, clip_proj, visual_query, visual_blocks, visual_proj or adapter_query (here: the
gates, the prompts and the whole visual path), then fine-tunes the norms and biases (and LoRA, which its released
training code never trains) on instruction data, everything else held. Here:

    <out>/config.json          the settings of the whole recipe (what --resume <out> reads)
    <out>/pretrain/            a run on the captions (data.task coco, <data>/coco of a mix folder)
    <out>/finetune/            a run on the instructions (data.task mix: captions, conversations, ScienceQA, Alpaca),
                               started from pretrain's adapter (model.init_from); its adapter is the result
    <out>/phases.json          the phases that finished

``python train.py --resume <out>`` continues the first phase that has not finished (resuming its own state.pt when
it has one). A single phase stays available as any recipe with ``--optim.trainable`` and ``--model.init_from``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import write_text_atomic
from training import TrainingError
from training.config import TrainConfig
from training.state import CONFIG_FILE, Resume, check_run_dir, default_run_dir, write_run_config

PHASES_FILE = "phases.json"


@dataclass(frozen=True)
class Phase:
    """One stage: its name (its folder), the task it trains on and the tensors it updates."""

    name: str
    task: str
    trainable: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    """Other settings of this phase, as ``section.field`` -> value."""


PHASED_RECIPES: dict[str, tuple[Phase, ...]] = {
    "v2": (
        Phase("pretrain", "coco", ("adapter_gate", "adapter_new_gate", "adapter_prompt", "visual.")),
        Phase("finetune", "mix", ("adapter_bias", "adapter_norm", "adapter_lora")),
    ),
}
"""Recipe name -> its phases, in order."""


def is_phased(cfg: TrainConfig) -> bool:
    return cfg.recipe in PHASED_RECIPES


def phase_config(cfg: TrainConfig, phase: Phase, out: Path, previous: Path | None) -> TrainConfig:
    """The settings of one phase: the recipe's, with the phase's task, data, trainable tensors and start."""
    phase_cfg = copy.deepcopy(cfg)
    phase_cfg.run.out = str(out / phase.name)
    phase_cfg.data.task = phase.task
    if phase.task == "coco" and cfg.data.task == "mix" and cfg.data.path and (Path(cfg.data.path) / "coco").is_dir():
        phase_cfg.data.path = str(Path(cfg.data.path) / "coco")  # the captions of a mix folder
    phase_cfg.optim.trainable = phase.trainable
    if previous is not None:
        phase_cfg.model.init_from = str(previous)
    for path, value in phase.settings.items():
        section, name = path.split(".")
        setattr(getattr(phase_cfg, section), name, value)
    return phase_cfg


def finished(out: Path) -> list[str]:
    """The phases recorded as finished in <out>/phases.json."""
    path = out / PHASES_FILE
    if not path.is_file():
        return []
    try:
        done = json.loads(path.read_text()).get("finished", [])
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise TrainingError(f"{path}: cannot read ({e}); delete it to redo every phase") from e
    return [name for name in done if isinstance(name, str)]


def run_phases(cfg: TrainConfig, resume: Resume | None, *, handle_signals: bool = False) -> int:
    """Every phase of ``cfg.recipe`` in order, each a resumable run under <out>/<phase>; returns the exit status."""
    from training.run import train_run

    out = Path(cfg.run.out) if cfg.run.out else default_run_dir(cfg.recipe)
    if resume is None and (out / CONFIG_FILE).exists():
        raise TrainingError(f"{out} already holds a run; continue it with --resume {out} or pick --out")
    check_run_dir(out, resume)
    cfg.run.out = str(out)
    write_run_config(out, cfg, None)
    done = finished(out)
    previous: Path | None = None
    for phase in PHASED_RECIPES[cfg.recipe]:
        phase_dir = out / phase.name
        if phase.name in done:
            print(f"phase {phase.name}: finished earlier ({phase_dir})")
            previous = phase_dir
            continue
        phase_cfg = phase_config(cfg, phase, out, previous)
        phase_cfg.check_inputs()
        again = Resume(phase_dir) if (phase_dir / CONFIG_FILE).is_file() else None
        print(f"phase {phase.name}: {phase.task}, updating {', '.join(phase.trainable)} -> {phase_dir}")
        status, outcome = train_run(phase_cfg, again, handle_signals=handle_signals)
        if outcome != "done":
            print(f"phase {phase.name} {outcome}; continue the recipe with: python train.py --resume {out}")
            return status
        done.append(phase.name)
        write_text_atomic(out / PHASES_FILE, json.dumps({"finished": done}, indent=2) + "\n")
        previous = phase_dir
    print(f"recipe {cfg.recipe}: every phase finished; the adapter is {previous}")
    return 0

"""Settings of a run: six typed dataclasses (model, data, optim, train, dist, run) in one TrainConfig, and the
named recipes.

Every field's docstring (the string literal under it) is its ``--help`` text. ``config_to_dict`` /
``config_from_dict`` convert to and from the plain values of ``<run>/config.json``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import ConfigError, VisualConfig
from training.tasks import TASKS

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_BASE = REPO_ROOT / "assets" / "tiny-base"
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
"""The shipped recipes: one YAML file each (training/recipes/<name>.yaml), read by ``load_recipe``."""
DEFAULT_RECIPE = "tiny"

TaskName = Literal["scienceqa", "coco", "alpaca", "mix"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Quantize = Literal["none", "nf4", "int8"]
Strategy = Literal["ddp", "fsdp"]


# ==== configuration ================================================================================================
@dataclass
class BaseModelArgs:
    """The frozen base model, the PEFT method and the visual path."""

    base: str | None = None
    """Frozen base: a Meta directory (params.json + consolidated.NN.pth), a Hugging Face directory (config.json +
    *.safetensors) or a preset name (tiny, 7B, 13B: random weights, for smoke tests and benchmarks)."""
    tokenizer: str | None = None
    """tokenizer.model / tokenizer.json, or a directory holding one; None: the one in the base directory."""
    clip_weights: str | None = None
    """Local weights file of the CLIP tower (never downloaded); None for the seeded 'tiny' tower."""
    random_clip: bool = False
    """Build a randomly initialised CLIP tower when no clip_weights are given (tests and benchmarks only: the
    adapter would learn from noise). Without it, a CLIP model other than 'tiny' needs --clip-weights."""
    quantize: Quantize = "none"
    """Store the frozen base's linear weights quantized through torchao: nf4 (4-bit NormalFloat with block scales,
    QLoRA's format) or int8 (weight-only, per-channel scales). Trainable tensors stay float32. none: as dtype."""
    dtype: DType = "auto"
    """dtype of the frozen base and CLIP tower; trainable tensors always stay float32. auto: float32 on CPU,
    bfloat16 on GPUs that support it, else float16 (with loss scaling)."""
    method: str = "llama_adapter"
    """The PEFT method trained on the frozen base, a name registered in model.methods (one module each in
    model/methods/, every one listed below with its settings). Its settings are the section of the same name below
    (--model.<method>.*)."""
    visual: VisualConfig = field(default_factory=VisualConfig)
    """The visual path: CLIP tower and the trainable projection to the LLaMA width."""
    init_from: str | None = None
    """Start the trainable tensors from an adapter instead of their fresh init: a run directory, our
    .safetensors, or an official LLaMA-Adapter V1 / V2 release .pth (e.g. BIAS-7B.pth). Every tensor it holds must
    exist in this run's model with the same shape; the model's others keep their fresh init (e.g. biases 0 after a
    caption-phase file). None: all fresh."""


def _method_sections() -> list[tuple[str, type, Any]]:
    """One settings section per method shipped in model/methods/, named after the method (methods registered
    elsewhere, e.g. in a test, train with their config's defaults)."""
    from model.methods import method_class, method_names

    shipped = [n for n in method_names() if method_class(n).__module__.startswith("model.methods.")]
    return [
        (n, method_class(n).config_class, field(default_factory=method_class(n).config_class))
        for n in sorted(shipped, key=lambda n: n != "llama_adapter")
    ]


ModelArgs = dataclasses.make_dataclass("ModelArgs", _method_sections(), bases=(BaseModelArgs,))
ModelArgs.__module__, ModelArgs.__doc__ = __name__, BaseModelArgs.__doc__


@dataclass
class DataArgs:
    """What to train on and how examples become token sequences."""

    task: TaskName = "scienceqa"
    """scienceqa (multiple choice, answer 'The answer is (X)'), coco (image captioning), alpaca (instructions) or
    mix (a folder of any of those plus LLaVA-format image conversations, trained together)."""
    path: str | None = None
    """scienceqa: the folder holding problems.json, pid_splits.json and images/; coco: the folder holding the
    Karpathy split dataset_coco.json and the train2014/ val2014/ images; alpaca: the alpaca_data.json file; mix: the
    folder holding scienceqa/, coco/, llava/llava_instruct.json (images in llava/images/) and alpaca_data.json, or
    some of them."""
    synthetic: bool = False
    """Generate the task's synthetic dataset (scienceqa: data.synthetic; mix: data.synthetic_mix) at data.path if it
    is absent."""
    synthetic_kind: str | None = None
    """Which synthetic dataset data.synthetic generates: scienceqa: shapes (one shape, its colour or size; the
    default) or scenes (several shapes: counting, the colour of a named shape, positions; harder, for comparing
    methods); mix: demo. None: the task's default."""
    images: bool = True
    """Feed images through the CLIP tower (scienceqa, coco). false (--no-images): a text-only adapter, the
    LLaMA-Adapter_T variant for ScienceQA."""
    train_split: str = "train"
    """Split to train on (scienceqa: train / trainval / minitrain; coco: train = Karpathy train + restval)."""
    eval_split: str = "test"
    """Split evaluated after training (scienceqa, and mix's ScienceQA and COCO parts)."""
    prompt_format: str = "llama_adapter"
    """ScienceQA prompt layout (data.scienceqa.build_prompt); recorded in the adapter sidecar."""
    prompt_template: Literal["alpaca", "chat-template"] = "alpaca"
    """The text around every prompt (data.prompts): alpaca, the official LLaMA-Adapter prompts (the Alpaca
    templates; ScienceQA's own layout); chat-template, the base's chat template from its tokenizer_config.json or
    chat_template.jinja (Llama-2-chat, Llama-3-instruct), rendered as transformers does. Recorded in the run;
    evaluation and the demo prompt the way the run was trained."""
    max_len: int = 512
    """Longest training sequence in tokens (prompt + answer + EOS); longer examples are truncated."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    group_by_length: bool = True
    """Batch examples of similar length together (shuffled groups, the same on every rank), so little of each batch
    is padding; false: random batches padded to their longest."""

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
    trainable: tuple[str, ...] = ()
    """Update only the trainable tensors whose names contain one of these strings (e.g. adapter_bias, visual.); the
    others keep their values and are saved as they are. (): all of them. The v2 recipe's phases set it."""

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
        self.trainable = tuple(self.trainable)
        if not all(isinstance(s, str) and s for s in self.trainable):
            raise ValueError(f"optim.trainable must be non-empty name parts, got {list(self.trainable)}")


@dataclass
class TrainArgs:
    """How the training step spends memory and time: recomputed activations, the loss in chunks, compiled blocks."""

    activation_checkpointing: bool = False
    """Keep only each block's input during the forward pass and recompute the block in the backward pass: much
    less activation memory for about a third more compute; identical gradients."""
    loss_chunk: int = 1024
    """Tokens per chunk of the output projection and cross-entropy, so no full-vocabulary fp32 logits of the whole
    batch are ever held; 0: one piece (the whole batch's logits at once)."""
    compile: bool = False
    """Run each transformer block of a training step through torch.compile: the same loss and gradients, fused
    kernels; the first step compiles every block. AdaMix's blocks stay eager; not with --dist.strategy fsdp."""

    def __post_init__(self) -> None:
        if self.loss_chunk < 0:
            raise ValueError(f"train.loss_chunk must be >= 0, got {self.loss_chunk}")


@dataclass
class DistArgs:
    """How the processes of a torchrun job share the work."""

    strategy: Strategy = "ddp"
    """ddp: every process holds the whole frozen base and the trainable tensors are all-reduced; fsdp: the frozen
    base is sharded over the processes with torch's fully_shard (bases that do not fit one GPU, 33B-70B), the
    trainable tensors kept in float32."""


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
    train: TrainArgs = field(default_factory=TrainArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self) -> None:
        if self.recipe not in recipe_names():
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(recipe_names())}")
        if self.data.synthetic and TASKS[self.data.task].synthetic is None:
            with_data = ", ".join(name for name, task in TASKS.items() if task.synthetic is not None)
            raise ValueError(
                f"data.synthetic generates data for {with_data} only; set it false for data.task={self.data.task}"
            )
        kinds, kind = TASKS[self.data.task].synthetic_kinds, self.data.synthetic_kind
        if kind is not None and kind not in kinds:
            raise ValueError(
                f"data.synthetic_kind={kind!r}: data.task={self.data.task} generates "
                + (", ".join(kinds) if kinds else "no synthetic data")
            )

    def check_inputs(self) -> None:
        """What a run needs before anything is written: base and data (the recipes for real data leave them
        unset), CLIP weights for a real tower, and synthetic data generated only where the recipe puts it."""
        if self.model.base is None:
            raise ValueError(f"recipe {self.recipe!r} needs --base: a Meta or Hugging Face LLaMA directory")
        if self.data.path is None:
            raise ValueError(f"recipe {self.recipe!r} needs --data: {TASKS[self.data.task].data_hint}")
        clip = self.model.visual.clip_model
        if self.uses_images and clip != "tiny" and self.model.clip_weights is None and not self.model.random_clip:
            raise ValueError(
                f"CLIP model {clip!r} needs --clip-weights FILE (a local weights file; nothing is downloaded). "
                "--model.random_clip true trains on a random tower instead (tests and benchmarks only), "
                "--no-images trains without images"
            )
        default = load_recipe(self.recipe).data.path
        if self.data.synthetic and not Path(self.data.path).exists() and Path(self.data.path) != Path(default):
            raise ValueError(
                f"--data {self.data.path}: no such dataset. The {self.recipe} recipe generates its synthetic data "
                f"only at {default} (leave out --data), or pass an existing dataset: {TASKS[self.data.task].data_hint}"
            )

    @property
    def uses_images(self) -> bool:
        """Alpaca has no images; ScienceQA and COCO use them unless --no-images."""
        return self.data.images and TASKS[self.data.task].has_images


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as plain values (nested dicts, tuples), as written to config.json."""
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
        elif typing.get_origin(tp) is Literal and value not in typing.get_args(tp):  # e.g. a hand-edited config.json
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"setting {where}{name} = {value!r}; choose one of {choices}")
        elif isinstance(value, list):
            value = tuple(value)  # JSON has no tuples; every list-valued setting is a tuple
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


# ---- recipes ----------------------------------------------------------------------------------------------------
def recipe_names() -> list[str]:
    """The recipes shipped in training/recipes/, the default first."""
    names = sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))
    return sorted(names, key=lambda name: name != DEFAULT_RECIPE)


def load_recipe(name: str) -> TrainConfig:
    """training/recipes/<name>.yaml as settings; a relative model.base or data.path in it is relative to the
    repository root (the committed tiny base, the generated synthetic data)."""
    path = RECIPE_DIR / f"{name}.yaml"
    values = yaml.safe_load(path.read_text())
    for section, key in (("model", "base"), ("data", "path")):
        if values.get(section, {}).get(key) is not None:
            values[section][key] = str(REPO_ROOT / values[section][key])
    try:
        return config_from_dict(TrainConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e

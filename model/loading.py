"""Loading a model: a frozen base (Meta, Hugging Face or a preset) with a PEFT method's trainable tensors, fresh or
from an adapter file, and the visual path; ``load_run`` for a train.py run directory, ``load_checkpoint`` for
either. Re-exported by the ``model`` package."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.checkpoint import (
    AdapterWeights,
    CheckpointError,
    adapter_paths,
    check_base_weights,
    check_fingerprint,
    check_keys,
    check_materialized,
    init_fresh_adapter,
    init_random_base,
    load_trainable,
    open_adapter,
    open_base,
    read_json,
)
from model.checkpoint.base import BaseCheckpoint
from model.config import PRESETS, LlamaConfig, ModelConfig, VisualConfig, preset
from model.hub import resolve_base, resolve_clip_weights
from model.llama import Transformer
from model.methods import MethodConfig
from model.methods.llama_adapter import default_config_for
from model.quantize import check_kind, quantize_base
from model.tokenizer import TOKENIZER_FILES, load_tokenizer

if TYPE_CHECKING:
    from model.visual import VisualPrompt


def find_tokenizer(base_dir: Path) -> Path | None:
    """tokenizer.model / tokenizer.json in a base directory, or in its parent (Meta's layout: root/tokenizer.model
    beside root/7B/)."""
    for folder in (base_dir, base_dir.parent):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def attach_tokenizer(model: Transformer, path: Path) -> None:
    """Load the tokenizer at ``path`` onto ``model.tokenizer``; its vocabulary must be the model's."""
    tokenizer = load_tokenizer(path)
    vocab = model.config.llama.vocab_size
    if tokenizer.vocab_size != vocab:
        raise CheckpointError(
            f"{path}: tokenizer has a vocabulary of {tokenizer.vocab_size} tokens but the model has {vocab}; "
            "use the tokenizer that belongs to these weights"
        )
    model.tokenizer = tokenizer


def load_model(
    base: str | Path,
    adapter: str | Path | None = None,
    *,
    clip: str | VisualConfig | None = None,
    clip_weights: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    adapter_config: MethodConfig | None = None,
    seed: int = 0,
    strict_base: bool = False,
    random_clip: bool = False,
    quantize: str | None = None,
    verify_checksums: bool = True,
) -> Transformer:
    """Build the frozen LLaMA with a PEFT method, load the weights, and return it in eval mode.

    base: a Meta directory (params.json + consolidated.NN.pth), a Hugging Face directory (config.json +
        safetensors / pytorch_model.bin, sharded or not) or a preset name (``tiny``, ``7B``, ``13B``: random
        weights drawn from ``seed``). The format is detected from the files present.
    adapter: our adapter (``.safetensors`` file or a run directory), an official LLaMA-Adapter V1 ``.pth`` (tanh
        gates, the semantics it was trained under: see ``checkpoint.read_official_v1``), an official V2 release
        ``.pth`` or a PEFT directory; the file brings its method and config. None: a fresh adapter of the method
        whose config is ``adapter_config`` (any registered method's; default: the preset's adaption prompts, or
        ``default_config_for`` the base), initialised by the method's one rule (adaption prompts: logits equal to
        the base model's exactly).
    clip: the visual path of a fresh adapter: an open_clip model name (``tiny`` for tests) or a full
        ``VisualConfig`` (feature layers, projector width); its projector is drawn from ``seed``. An adapter
        sidecar's visual config takes this role when it has one. clip_weights: local CLIP weights file (else
        the sidecar's); required for any tower but ``tiny`` unless ``random_clip`` asks for random weights.
    dtype: of the frozen weights (CLIP tower included); None keeps the stored dtype (presets: float32). Adapter
        tensors (the method's, the visual projection) stay fp32.
    device: where the weights go (default CPU); ``"meta"`` builds and checks shapes without reading weights.

    strict_base: refuse (CheckpointError) instead of warning (BaseWeightsWarning) when our adapter was trained on
        a base with the same shapes but other weights (``model.base_weights_fingerprint``, recorded by
        ``save_adapter``; adapters saved before it was recorded load silently).

    quantize: ``nf4`` or ``int8`` stores the frozen block linears quantized (``model.quantize.quantize_base``), after
        the base weights are loaded and the method attached (its wrapped linears keep the quantized weight), before
        the fresh adapter's init (DoRA's magnitudes: the quantized weights' row norms, so it starts as that base);
        every method trains and runs on it; merges that fold into it (LoRA, DoRA, (IA)^3, V2's scales) are refused.
        None: the weights as ``dtype``. Ignored on the meta device (shapes only).

    verify_checksums: a Meta base directory holding Meta's ``checklist.chk`` has the md5 of every file it lists
        checked first (about 1.5 s per GB on a 2-core CPU VM); a file that differs is refused by name. False skips
        it (files verified already, e.g. with ``md5sum -c checklist.chk``). Directories without one: no check.

    ``model.tokenizer`` is set from a tokenizer.model / tokenizer.json in the base directory (or its parent),
    else from the tokenizer recorded in our adapter's sidecar; its vocabulary must match the model's.
    Raises CheckpointError (a ValueError) naming the file and field for anything unreadable, out of range or
    mismatched.
    """
    device = torch.device(device or "cpu")
    quantize_kind = check_kind(quantize) if quantize is not None else None  # before any weight is read
    if adapter is not None and adapter_config is not None:
        raise ValueError("adapter_config shapes a fresh adapter only; the adapter file brings its own config")
    source = _open_base_source(base, verify_checksums)
    weights = open_adapter(adapter, source.llama) if adapter is not None else None
    if weights is not None:
        check_fingerprint(weights, source.llama, str(source.base))
    visual_cfg = _visual_config(clip, weights)
    if visual_cfg is not None:
        clip_weights = _clip_weights_file(clip_weights, visual_cfg, weights)
    method = weights.method if weights is not None else (adapter_config or source.fresh_method)
    config = ModelConfig(llama=source.llama, method=method, visual=visual_cfg)
    if weights is not None:
        _check_shapes_first(config, weights, clip_weights)
    visual = None
    if visual_cfg is not None:
        visual = _build_visual_path(visual_cfg, source.llama, clip_weights, weights, seed, device, random_clip, dtype)
    with torch.device("meta"):  # no memory for weights that are about to be replaced
        model = Transformer(config, visual=visual)
    fingerprint = source.load_into(model, seed=seed, dtype=dtype, device=device)
    model.base_weights_fingerprint = fingerprint  # recorded by save_adapter
    tokenizer_path = _tokenizer_source(source.base_dir, weights.sidecar if weights is not None else None)
    if tokenizer_path is not None:  # before the adapter's init: prompt tuning may start from a text's tokens
        attach_tokenizer(model, tokenizer_path)
    if quantize_kind is not None and device.type != "meta":  # before the adapter's init: DoRA's reads the weights
        quantize_base(model, quantize_kind)
    init_fresh_adapter(model, seed=seed, device=device)
    if device.type != "meta":
        check_materialized(model)
    if weights is not None:
        check_base_weights(weights, fingerprint, str(source.base), strict=strict_base)
        load_trainable(model, weights)
    return model.eval()


@dataclass
class _BaseSource:
    """What ``load_model``'s ``base`` names: its architecture, its weights opened lazily (None: a preset, whose
    weights are drawn), and the config of the fresh adaption prompts a base of that kind gets."""

    base: str | Path
    """The preset name or the base directory (a hub id resolved to its snapshot)."""
    llama: LlamaConfig
    checkpoint: BaseCheckpoint | None
    fresh_method: MethodConfig

    @property
    def base_dir(self) -> Path | None:
        """The base directory (None for a preset), where a tokenizer may be."""
        return None if self.checkpoint is None else Path(self.base)

    def load_into(
        self, model: Transformer, *, seed: int, dtype: torch.dtype | None, device: torch.device
    ) -> str | None:
        """The frozen weights into ``model`` (a preset's drawn from ``seed``, float32 unless ``dtype``); returns
        their fingerprint."""
        if self.checkpoint is None:
            return init_random_base(model, seed=seed, dtype=dtype or torch.float32, device=device)
        return self.checkpoint.load_into(model, dtype=dtype, device=device)


def _open_base_source(base: str | Path, verify_checksums: bool) -> _BaseSource:
    """A preset by name (when no such path exists), else a base directory or a Hugging Face Hub id."""
    if str(base) in PRESETS and not Path(base).exists():
        cfg = preset(str(base))
        return _BaseSource(str(base), cfg.llama, None, cfg.method)
    base = resolve_base(base)  # a hub id: its snapshot in the Hugging Face cache
    if not Path(base).exists():
        raise CheckpointError(
            f"{base}: no such base directory, not a Hugging Face Hub id (owner/name[@revision]) and not a preset "
            f"name ({', '.join(PRESETS)})"
        )
    checkpoint = open_base(base, verify_checksums=verify_checksums)
    return _BaseSource(base, checkpoint.llama, checkpoint, default_config_for(checkpoint.llama))


def _clip_weights_file(
    clip_weights: str | Path | None, visual_cfg: VisualConfig, weights: AdapterWeights | None
) -> str | Path | None:
    """The CLIP weights to read: the caller's, else the sidecar's; an open_clip pretrained tag or a hub file as
    its copy in the Hugging Face cache."""
    if clip_weights is None and weights is not None and weights.sidecar:
        clip_weights = weights.sidecar.get("clip_weights")
    return resolve_clip_weights(clip_weights, visual_cfg.clip_model)


def _build_visual_path(
    visual_cfg: VisualConfig,
    llama: LlamaConfig,
    clip_weights: str | Path | None,
    weights: AdapterWeights | None,
    seed: int,
    device: torch.device,
    random_clip: bool,
    dtype: torch.dtype | None,
) -> VisualPrompt:
    """The CLIP tower and the projector, the projector's init from ``seed`` (the caller's RNG untouched); a meta
    model gets a meta tower. A tower an adapter file describes but that cannot be built names the file."""
    from model.visual import build_visual  # imported on use: open_clip is only needed for the visual path

    shapes_only = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), shapes_only:
        torch.manual_seed(seed)
        try:
            visual = build_visual(visual_cfg, llama.dim, clip_weights, random_clip=random_clip).to(device)
        except (ValueError, FileNotFoundError) as e:
            if weights is None or weights.visual is None:
                raise
            where = adapter_paths(weights.source)[1] if weights.sidecar is not None else weights.source
            raise CheckpointError(f"{where}: visual path: {e}") from e
    if dtype is not None:
        visual.clip.to(dtype)  # the frozen tower in the base dtype, as train.py runs it; adapter_proj stays fp32
    return visual


def _check_shapes_first(config: ModelConfig, weights: AdapterWeights, clip_weights: str | Path | None) -> None:
    """The file's tensors against the model its settings describe, built on the meta device (nothing allocated):
    sizes from a config file (a rank or a prompt count of 10**9) are refused, naming the keys, before any memory
    is taken for them."""
    from model.visual import build_visual

    with torch.device("meta"):
        visual = None
        if config.visual is not None:
            name = config.visual.clip_model
            if name not in ("tiny", "openai") and clip_weights is None:
                return  # load_model's own build refuses it, naming the adapter (no tower is built for nothing)
            weights_file = clip_weights if name == "openai" else None  # the openai tower's shape is in the file
            try:
                visual = build_visual(config.visual, config.llama.dim, weights_file, random_clip=True)
            except (ValueError, FileNotFoundError):
                return  # load_model's own build reports it, naming the adapter
        model = Transformer(config, visual=visual)
    expected = {n: tuple(p.shape) for n, p in model.trainable_parameters()}
    check_keys(expected, {n: tuple(t.shape) for n, t in weights.tensors.items()}, weights.source, "adapter tensors")


def _visual_config(clip: str | VisualConfig | None, weights: AdapterWeights | None) -> VisualConfig | None:
    """The adapter's recorded visual config wins; ``clip`` alone starts a fresh visual path."""
    fresh = VisualConfig(clip_model=clip) if isinstance(clip, str) else clip
    recorded = weights.visual if weights is not None else None
    if recorded is not None:
        if isinstance(clip, str) and clip != recorded.clip_model:
            raise CheckpointError(
                f"{weights.source}: adapter was trained with clip_model={recorded.clip_model!r}, not clip={clip!r}"
            )
        if isinstance(clip, VisualConfig) and clip != recorded:
            raise CheckpointError(f"{weights.source}: adapter was trained with {recorded}, not {clip}")
        return recorded
    if fresh is not None and weights is not None and weights.sidecar is not None:
        raise CheckpointError(f"{weights.source}: text-only adapter (no visual config); drop clip={clip!r}")
    return fresh


def _tokenizer_source(base_dir: Path | None, sidecar: dict[str, Any] | None) -> Path | None:
    """The base directory's tokenizer, else the one recorded by training (when it still exists)."""
    found = find_tokenizer(base_dir) if base_dir is not None else None
    recorded = sidecar.get("tokenizer") if sidecar else None
    if found is None and recorded and Path(recorded).exists():
        return Path(recorded)
    return found


def load_run(
    run_dir: str | Path,
    *,
    base: str | Path | None = None,
    clip_weights: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    strict_base: bool = False,
) -> Transformer:
    """The model of a train.py run directory (adapter.safetensors + adapter.json), with ``.tokenizer`` attached.

    base / clip_weights default to what the sidecar recorded (override them when the run moved machines);
    ``seed`` (for a random preset base) defaults to the one the run recorded in ``extra.seed``; ``strict_base``
    as in ``load_model``.
    """
    run_dir = Path(run_dir)
    sidecar = read_json(run_dir / "adapter.json") if (run_dir / "adapter.json").is_file() else None
    if sidecar is None:
        raise CheckpointError(f"{run_dir}: no adapter.json; not a run directory written by train.py")
    base = base if base is not None else sidecar.get("base")
    if not base:
        raise CheckpointError(f"{run_dir / 'adapter.json'}: no base recorded; pass base=")
    if seed is None:
        seed = int((sidecar.get("extra") or {}).get("seed", 0))
    model = load_model(
        base, run_dir, clip_weights=clip_weights, dtype=dtype, device=device, seed=seed, strict_base=strict_base
    )
    if model.tokenizer is None:
        raise CheckpointError(
            f"{run_dir}: no tokenizer: the sidecar records {sidecar.get('tokenizer')!r} and base {base} holds none"
        )
    return model


def load_checkpoint(
    checkpoint: str | Path,
    *,
    base: str | Path | None = None,
    clip_weights: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[Transformer, dict[str, Any] | None]:
    """What the demo, the evaluations and training's continuation take: a train.py run directory (``load_run``; base
    and CLIP weights default to what it recorded) or any adapter ``load_model`` reads (our ``.safetensors``, an
    official V1 or V2 release ``.pth``, a PEFT directory), which needs ``base``. Returns the model and the run's
    sidecar (None for a file from elsewhere)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter.json").is_file():
        model = load_run(checkpoint, base=base, clip_weights=clip_weights, dtype=dtype, device=device)
        return model, read_json(checkpoint / "adapter.json")
    if not checkpoint.exists():
        raise CheckpointError(f"{checkpoint}: no such run directory or adapter file")
    if base is None:
        raise CheckpointError(
            f"{checkpoint} is an adapter file, not a train.py run directory: give the base model it belongs to "
            "(--base DIR; for the official V2 release LLaMA-1 7B in Meta's layout, <llama_dir>/7B)"
        )
    model = load_model(base, adapter=checkpoint, clip_weights=clip_weights, dtype=dtype, device=device)
    if model.tokenizer is None:
        raise CheckpointError(f"{base}: no tokenizer.model or tokenizer.json in the base directory or its parent")
    sidecar = adapter_paths(checkpoint)[1]
    return model, read_json(sidecar) if checkpoint.suffix == ".safetensors" and sidecar.is_file() else None

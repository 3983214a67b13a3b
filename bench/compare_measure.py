"""What ``python -m bench methods`` (bench/compare.py) measures of one run, and how each task is scored.

- Training (``train_run``): train.py's run in this process; its steps, final loss, wall time, training tokens/s
  (the median of the metrics.jsonl windows after the first: the first holds the warm-up) and peak memory of the call
  (bench.measure: CUDA max allocated; CPU the peak resident size of this process, Python and torch included).
- Scoring (``Scorer``): ScienceQA's official categories (eval.scienceqa; the learning rate is chosen on Avg) or
  COCO's BLEU-4 and CIDEr (eval.coco; chosen on CIDEr), of the first ``limit`` items of a split.
- Decode tokens/s: greedy, batch 1, the first test item with its image, ``DECODE_TOKENS`` new tokens with EOS
  ignored, after a warm-up; the tokens after the first over the time after the first (prefill excluded).
- The fresh adapter (``fresh_figures``): what it trains (trainable values, the visual projection included, and split
  into the method's own, the projection's and the shared visual entry's: ``trainable_split``) and its
  loss at step 0: the token mean (eval mode) on the first global batch of the training split in file order, beside
  the base model's (no method, no image) on the same token batch. The two are equal exactly for the methods that
  start as the base model.
- Sizes: values the adapter file holds (a method may save less than it trains: prefix tuning keeps its prefixes,
  not their MLP), its bytes, and the trainable values at 7B on the meta device with the method's default settings
  (text-only, as the README's table; plus the ViT-L/14 projection for the multimodal figure).
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model import Transformer
    from training.config import TrainConfig

DECODE_TOKENS = 64
"""New tokens of the timed greedy decode."""
SEVEN_B_CLIP = "ViT-L-14-quickgelu"
"""The CLIP tower whose projection the multimodal 7B count adds (the paper's ViT-L/14)."""


# ==== scoring =======================================================================================================
@dataclass(frozen=True)
class Scorer:
    """How the task's adapter is scored on a split, which figure picks the learning rate, and the table columns."""

    key: str
    columns: tuple[str, ...]
    score: Callable[[TrainConfig, Transformer, Path, Path, str, int | None], dict[str, Any]]
    """(cfg, model, run_dir, out_dir, split, limit) -> {column: value, ...}."""
    sample: Callable[[TrainConfig], tuple[str, Any]]
    """cfg -> (prompt, image) of the first test item, for the timed decode."""
    has_control: bool


def _score_scienceqa(
    cfg: TrainConfig, model: Transformer, run_dir: Path, out: Path, split: str, limit: int | None
) -> dict[str, Any]:
    from data.scienceqa import load_problems
    from eval.common import PREDICTIONS_FILE, file_sha256
    from eval.scienceqa import CATEGORIES, evaluate, read_predictions
    from training.tasks import TASKS

    problems = load_problems(cfg.data.path, split)[:limit]
    metrics = evaluate(
        model,
        problems,
        out,
        checkpoint=run_dir,
        adapter_sha256=file_sha256(run_dir / "adapter.safetensors"),
        data=cfg.data.path,
        split=split,
        prompt_format=TASKS["scienceqa"].format_of(cfg.data.prompt_format),
        batch_size=cfg.run.eval_batch_size,
        max_new_tokens=cfg.run.eval_max_new_tokens,
    )
    results, _ = read_predictions(out / PREDICTIONS_FILE)
    return {c: metrics[c] for c in CATEGORIES} | {
        "n": metrics["counts"]["Avg"]["total"],
        "parse_failures": metrics["parse_failures"]["count"],
        "items": {p.pid: int(results.get(p.pid) == p.answer) for p in problems},  # the bootstrap's per-item scores
    }


def _sample_scienceqa(cfg: TrainConfig) -> tuple[str, Any]:
    from data.scienceqa import build_prompt, load_problems

    problem = load_problems(cfg.data.path, "test")[0]
    return build_prompt(problem, cfg.data.prompt_format), problem.image_path


def _score_coco(
    cfg: TrainConfig, model: Transformer, run_dir: Path, out: Path, split: str, limit: int | None
) -> dict[str, Any]:
    from eval.coco import check_results, load_split, predict, score_captions
    from eval.common import file_sha256

    images = load_split(Path(cfg.data.path) / "dataset_coco.json", split)[:limit]
    header = {"checkpoint": str(run_dir.resolve()), "adapter_sha256": file_sha256(run_dir / "adapter.safetensors"),
              "split": split, "max_new_tokens": cfg.run.eval_max_new_tokens}  # fmt: skip
    results = predict(model, images, out, header=header, batch_size=cfg.run.eval_batch_size,
                      max_new_tokens=cfg.run.eval_max_new_tokens)  # fmt: skip
    references = {im.image_id: im.references for im in images}
    metrics = score_captions(references, check_results(results, references))
    return {"BLEU-4": metrics["Bleu_4"], "CIDEr": metrics["CIDEr"], "n": len(images), "notes": metrics["notes"]}


def _sample_coco(cfg: TrainConfig) -> tuple[str, Any]:
    from data.coco import caption_prompt
    from eval.coco import load_split

    return caption_prompt(), load_split(Path(cfg.data.path) / "dataset_coco.json", "test")[0].path


def _scienceqa_scorer() -> Scorer:
    from eval.scienceqa import CATEGORIES

    return Scorer("Avg", tuple(CATEGORIES), _score_scienceqa, _sample_scienceqa, has_control=True)


SCORERS: dict[str, Scorer] = {
    "scienceqa": _scienceqa_scorer(),
    "coco": Scorer("CIDEr", ("BLEU-4", "CIDEr"), _score_coco, _sample_coco, has_control=False),
}


# ==== measurements ==================================================================================================
def train_run(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train one run in this process; its steps, losses, speed and peak memory, or its error."""
    from bench.measure import current_memory_bytes, peak_memory_bytes, reset_peak_memory
    from model.checkpoint import WriteError
    from model.devices import resolve_device
    from training import TrainingError
    from training.metrics import METRICS_FILE, read_metrics
    from training.run import run

    device = resolve_device(cfg.run.device)
    release_memory(device)
    start_mib = current_memory_bytes(device) / 2**20
    how = reset_peak_memory(device)
    started = time.perf_counter()
    try:
        status = run(cfg)
    except TrainingError as e:
        if isinstance(e.__cause__, WriteError):  # a full disk is no result of the run: the unit stops, unrecorded
            raise e.__cause__ from None
        return {"error": str(e)}
    if status != 0:
        return {"error": f"the run stopped early (status {status})"}
    wall_s = time.perf_counter() - started
    records = read_metrics(run_dir / METRICS_FILE)
    windows = [r["tokens_per_s"] for r in records[1:] or records]
    return {
        "error": None,
        "steps": records[-1]["step"],
        "final_loss": records[-1]["loss"],
        "train_wall_s": round(wall_s, 2),
        "tokens_per_s": statistics.median(windows),
        "peak_memory_mib": round(peak_memory_bytes(device) / 2**20, 1),
        "memory_at_start_mib": round(start_mib, 1),
        "peak_memory_how": how,
    }


def release_memory(device: torch.device) -> None:
    """Free what earlier runs of this process left (models are dropped by reference count; cycles need the collector),
    so that a measurement or the next model starts from the memory in use."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_trained(cfg: TrainConfig, run_dir: Path) -> Transformer:
    """The run's adapter on its base, for scoring, on the run's device and dtype."""
    from eval.common import load_run_for_eval

    return load_run_for_eval(run_dir, device=cfg.run.device, dtype=cfg.model.dtype).model


def decode_tokens_per_s(model: Transformer, prompt: str, image: Any) -> float:
    """Greedy decode speed, batch 1: tokens after the first over the time after the first (prefill excluded)."""
    from bench.measure import now
    from model.decode import generate_tokens

    device = model.tok_embeddings.weight.device
    ids = model.tokenizer.encode(prompt, bos=True)
    pixels = mask = None
    if image is not None and model.visual is not None:
        pixels, mask = model.visual.preprocess(image)[None], torch.ones(1, dtype=torch.bool)  # (1, 3, S, S)

    def stamps(n: int) -> list[float]:
        return [now(device) for _ in generate_tokens(model, [ids], pixels, mask, max_new_tokens=n, temperature=0.0)]

    stamps(2)  # warm-up
    times = stamps(DECODE_TOKENS)
    return (len(times) - 1) / (times[-1] - times[0])


def fresh_figures(cfg: TrainConfig) -> dict[str, float]:
    """What the fresh adapter trains (trainable values, the visual projection included) and its loss on the first
    global batch of the training split (file order), with the base model's (no method, no image) on the same token
    batch; eval mode, the trainer's token mean."""
    from model import ModelConfig, Transformer
    from model.checkpoint import check_materialized, init_random_base, open_base
    from model.config import PRESETS
    from model.devices import resolve_device, resolve_dtype
    from model.hub import resolve_base
    from model.llama import count_trainable
    from model.quantize import quantize_base
    from training.batching import training_set
    from training.run import build_model

    device = resolve_device(cfg.run.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = build_model(cfg, device, dtype).eval()
    collate = training_set(cfg, model)
    o = cfg.optim
    n = min(o.batch_size * o.grad_accum, len(collate.examples))
    batches = [collate(list(range(i, min(n, i + o.batch_size))))[1] for i in range(0, n, o.batch_size)]
    fresh = {"trainable_values": count_trainable(model), "step0_loss": _token_mean_loss(model, batches, True, dtype)}
    fresh |= trainable_split(model)
    llama = model.config.llama
    del model, collate  # one model on the device at a time (7B)
    release_memory(device)
    with torch.device("meta"):
        base = Transformer(ModelConfig(llama=llama, method=None))
    if cfg.model.base in PRESETS and not Path(cfg.model.base).exists():
        init_random_base(base, seed=cfg.run.seed, dtype=dtype, device=device)
    else:
        open_base(resolve_base(cfg.model.base)).load_into(base, dtype=dtype, device=device)
    if cfg.model.quantize != "none":  # as build_model stores the frozen base
        quantize_base(base, cfg.model.quantize)
    check_materialized(base)
    return fresh | {"base_step0_loss": _token_mean_loss(base.eval(), batches, False, dtype)}


def trainable_split(model: Transformer) -> dict[str, int]:
    """The trainable values of ``model`` by owner: ``own_values`` the method's (its own image entry included),
    ``projection_values`` the visual projection (visual.*), ``entry_values`` the shared visual entry's gates
    (``VisualConfig.entry = "shared"``; 0 otherwise)."""
    from model.methods.visual_prompt import SharedVisualEntry

    shared = isinstance(model.method, SharedVisualEntry)
    split = {"own_values": 0, "projection_values": 0, "entry_values": 0}
    for name, p in model.trainable_parameters():
        if name.startswith("visual."):
            split["projection_values"] += p.numel()
        elif shared and name.endswith(".adapter_visual_gate"):
            split["entry_values"] += p.numel()
        else:
            split["own_values"] += p.numel()
    return split


def _token_mean_loss(model: Transformer, batches: list[dict[str, Any]], images: bool, dtype: torch.dtype) -> float:
    from data.collate import IGNORE_INDEX

    device = model.tok_embeddings.weight.device
    total, count = 0.0, 0
    for batch in batches:
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        pixels, mask = (batch.get("images"), batch.get("image_mask")) if images else (None, None)
        if pixels is not None:
            pixels, mask = pixels.to(device), mask.to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens, pixels, image_mask=mask)  # (B, T, V)
        targets = labels[:, 1:].flatten()
        total += F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


def saved_and_7b_counts(method: str, trained: Transformer) -> dict[str, int]:
    """Values the adapter file holds (what the trained run loads with: a method may save less than it trains, e.g.
    prefix tuning's prefixes without their MLP), and the trainable values at 7B on the meta device with the method's
    default settings (text-only, as the README's table; ``_clip``: plus the ViT-L/14 visual projection)."""
    from model.llama import count_trainable

    text_only = seven_b_count(method)
    return {"saved_values": count_trainable(trained), "trainable_values_7b": text_only,
            "trainable_values_7b_clip": text_only + seven_b_projection()}  # fmt: skip


@functools.cache
def seven_b_count(method: str) -> int:
    """Trainable values of ``method`` with its default settings on the 7B shape (meta device: no memory)."""
    from model import load_model
    from model.llama import count_trainable
    from model.methods import method_class

    return count_trainable(load_model("7B", adapter_config=method_class(method).config_class(), device="meta"))


@functools.cache
def seven_b_projection() -> int:
    """Values of the trainable projection from CLIP ViT-L/14 features to the 7B width (meta device)."""
    from model.config import VisualConfig, preset
    from model.visual import build_visual

    with torch.device("meta"):
        visual = build_visual(VisualConfig(clip_model=SEVEN_B_CLIP), preset("7B").llama.dim, None, random_clip=True)
    return sum(p.numel() for p in visual.adapter_proj.parameters())

"""Batching: the training examples of a task, each rank's share of an epoch, and the micro-batches of each step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from data.collate import Example
from data.tasks import TASKS
from training import TrainingError
from training.config import TrainConfig
from training.dist import Dist, barrier

MicroBatch = tuple[list[int], dict[str, Any]]
"""(dataset indices, collated batch): the indices name the examples in error messages."""


def ensure_synthetic(cfg: TrainConfig, d: Dist) -> None:
    """Generate the synthetic ScienceQA-format dataset (data.synthetic, its fixed default seed) at data.path once:
    rank 0 writes it, the others wait."""
    from data.synthetic import ensure_scienceqa

    root = Path(cfg.data.path)
    if d.main and not (root / "problems.json").is_file():
        print(f"generating the synthetic ScienceQA-format dataset in {root}", flush=True)
        ensure_scienceqa(root)
    barrier(d)


def load_examples(cfg: TrainConfig, split: str) -> list[Example]:
    """Training examples of a split, read by the task's reader; images dropped when the run is text-only."""
    task, root = TASKS[cfg.data.task], Path(cfg.data.path)
    try:
        examples = task.reader(root, split, cfg.data.prompt_format)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from e
    if not examples:
        raise TrainingError(f"{root}: no {task.name} examples in split {split!r}")
    if not cfg.uses_images:
        examples = [dataclasses.replace(ex, image=None) for ex in examples]
    return examples


class IndexedCollate:
    """Collates a list of dataset indices into (indices, batch): the indices name the examples in error messages."""

    def __init__(self, examples: list[Example], collator: Callable[[list[Example]], dict[str, Any]]) -> None:
        self.examples, self.collator = examples, collator

    def __call__(self, indices: list[int]) -> MicroBatch:
        return indices, self.collator([self.examples[i] for i in indices])


def training_set(cfg: TrainConfig, model: nn.Module) -> IndexedCollate:
    """The examples of data.train_split that fit in data.max_len (a warning counts the others), with their collator
    (the model's tokenizer, and its CLIP preprocessing when the run uses images)."""
    from data.collate import Collator, drop_overlong

    transform = model.visual.preprocess if cfg.uses_images else None
    max_len = min(cfg.data.max_len, model.max_tokens)  # the method's soft tokens take room in max_seq_len too
    collator = Collator(model.tokenizer, max_len, image_transform=transform)
    examples = drop_overlong(load_examples(cfg, cfg.data.train_split), collator)  # warns with the count
    if not examples:
        raise TrainingError(f"no training example fits in {max_len} tokens (data.max_len={cfg.data.max_len}); raise it")
    return IndexedCollate(examples, collator)


def epoch_indices(n_examples: int, d: Dist, seed: int, epoch: int) -> list[int]:
    """This rank's shuffled share of one epoch (DistributedSampler: the same permutation on every rank, dealt out
    round-robin, padded by repetition to a multiple of the world size)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n_examples), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def step_batches(
    indices: list[int], start: int, batch_size: int, grad_accum: int, collate: IndexedCollate, num_workers: int
) -> Iterator[list[MicroBatch]]:
    """The micro-batches of each remaining optimizer step of an epoch, from sample ``start`` (a step boundary).

    A step takes the next batch_size * grad_accum samples of this rank, so the schedule and the data position
    depend only on that product: resuming with half the micro-batch and twice the accumulation is the same run.
    """
    from torch.utils.data import DataLoader

    chunks = [indices[i : i + batch_size] for i in range(start, len(indices), batch_size)]
    loader = DataLoader(chunks, batch_size=None, collate_fn=collate, num_workers=num_workers)
    micro: list[MicroBatch] = []
    for item in loader:
        micro.append(item)
        if len(micro) == grad_accum:
            yield micro
            micro = []
    if micro:
        yield micro

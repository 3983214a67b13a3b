"""The training tasks, each described once: its reader, prompt format, use of images, evaluator and data path.

train.py and the recipes look a task up here by name (``TASKS[cfg.data.task]``) instead of branching on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.collate import Example


@dataclass(frozen=True)
class Task:
    """One task train.py can train on."""

    name: str
    data_hint: str
    """What ``--data`` names for this task (in the error when it is missing)."""
    reader: Callable[[Path, str, str], list[Example]]
    """(data path, split, prompt format) -> the training examples of the split."""
    prompt_format: str | None
    """The prompt format recorded in the adapter sidecar; None: the configurable ``data.prompt_format``."""
    has_images: bool
    """Whether the examples carry images (fed through the CLIP tower unless ``--no-images``)."""
    scoring: str
    """How a trained adapter is scored, with the command that does it when train.py does not (printed after
    training)."""
    evaluator: Callable[..., dict[str, Any]] | None
    """Scores a trained model after training: (model, run directory, data path, split, *, prompt_format, batch_size,
    max_new_tokens, limit, label) -> metrics, written into the run directory with the table printed; None: the task
    is not evaluated by train.py."""

    def format_of(self, configured: str) -> str:
        """The prompt format of this task's examples, given ``data.prompt_format``."""
        return self.prompt_format or configured


def _read_scienceqa(root: Path, split: str, prompt_format: str) -> list[Example]:
    from data.scienceqa import load_problems, to_example

    return [to_example(p, prompt_format) for p in load_problems(root, split)]


def _read_coco(root: Path, split: str, prompt_format: str) -> list[Example]:
    from data.coco import load_examples

    return load_examples(root, split)


def _read_alpaca(root: Path, split: str, prompt_format: str) -> list[Example]:
    from data.alpaca import load_examples

    return load_examples(root)  # one file, no splits


def _evaluate_scienceqa(
    model: Any,
    run_dir: Path,
    root: Path,
    split: str,
    *,
    prompt_format: str,
    batch_size: int,
    max_new_tokens: int,
    limit: int | None,
    label: str,
) -> dict[str, Any]:
    """eval.scienceqa.evaluate on the first ``limit`` problems of ``split``, written into the run directory (which
    holds the adapter); prints the category table."""
    from data.scienceqa import load_problems
    from eval.common import file_sha256
    from eval.scienceqa import evaluate, format_table

    metrics = evaluate(
        model,
        load_problems(root, split)[:limit],
        run_dir,
        checkpoint=run_dir,
        adapter_sha256=file_sha256(run_dir / "adapter.safetensors"),
        data=root,
        split=split,
        prompt_format=prompt_format,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    print(format_table(metrics, label=label))
    return metrics


TASKS: dict[str, Task] = {
    "scienceqa": Task(
        name="scienceqa",
        data_hint="the ScienceQA folder holding problems.json, pid_splits.json and images/",
        reader=_read_scienceqa,
        prompt_format=None,
        has_images=True,
        scoring="the answer letter parsed from the greedy output, accuracy by the official categories "
        "(eval.scienceqa, run after training)",
        evaluator=_evaluate_scienceqa,
    ),
    "coco": Task(
        name="coco",
        data_hint="the COCO folder holding dataset_coco.json and the images",
        reader=_read_coco,
        prompt_format="coco_caption",
        has_images=True,
        scoring="BLEU, METEOR, ROUGE-L and CIDEr of greedy captions on the Karpathy test split: python -m eval.coco "
        "--checkpoint RUN_DIR --annotations dataset_coco.json --images DATA_DIR --output DIR",
        evaluator=None,
    ),
    "alpaca": Task(
        name="alpaca",
        data_hint="the alpaca_data.json file",
        reader=_read_alpaca,
        prompt_format="alpaca",
        has_images=False,
        scoring="no automatic score (open-ended instructions): try the adapter with python -m app --checkpoint RUN_DIR",
        evaluator=None,
    ),
}

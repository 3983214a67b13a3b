"""The training tasks, each described once: its reader, prompt format, use of images, evaluator and data path.

train.py and the recipes look a task up here by name (``TASKS[cfg.data.task]``) instead of branching on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import DataError, alpaca, coco, llava, scienceqa
from data.collate import Example
from data.prompts import ALPACA, PromptTemplate
from data.synthetic import ensure_scienceqa
from data.synthetic_mix import ensure_mix
from eval import coco as eval_coco
from eval import scienceqa as eval_scienceqa
from eval.common import METRICS_FILE, file_sha256, write_json


@dataclass(frozen=True)
class Task:
    """One task train.py can train on."""

    name: str
    data_hint: str
    """What ``--data`` names for this task (in the error when it is missing)."""
    reader: Callable[[Path, str, str, PromptTemplate], list[Example]]
    """(data path, split, ScienceQA prompt format, prompt template) -> the training examples of the split."""
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
    eval_dirs: tuple[str, ...] = ("",)
    """Folders of the run directory (relative to it) where the evaluator keeps its generation logs."""
    synthetic: Callable[[Path, str], Path] | None = None
    """(path, kind) -> generates the task's synthetic dataset of that kind (``data.synthetic_kind``) at the path when
    it is absent (``data.synthetic``); None: it has none."""
    synthetic_kinds: tuple[str, ...] = ()
    """The kinds ``synthetic`` can generate, the default first."""

    def format_of(self, configured: str) -> str:
        """The prompt format of this task's examples, given ``data.prompt_format``."""
        return self.prompt_format or configured


def _read_scienceqa(root: Path, split: str, prompt_format: str, template: PromptTemplate = ALPACA) -> list[Example]:
    return [scienceqa.to_example(p, prompt_format, template=template) for p in scienceqa.load_problems(root, split)]


def _read_coco(root: Path, split: str, prompt_format: str, template: PromptTemplate = ALPACA) -> list[Example]:
    return coco.load_examples(root, split, template=template)


def _read_alpaca(root: Path, split: str, prompt_format: str, template: PromptTemplate = ALPACA) -> list[Example]:
    return alpaca.load_examples(root, template=template)  # one file, no splits


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
    metrics = eval_scienceqa.evaluate(
        model,
        scienceqa.load_problems(root, split)[:limit],
        run_dir,
        checkpoint=run_dir,
        adapter_sha256=file_sha256(run_dir / "adapter.safetensors"),
        data=root,
        split=split,
        prompt_format=prompt_format,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    print(eval_scienceqa.format_table(metrics, label=label))
    return metrics


# ---- the demo mix: every format the demo serves, in one folder -----------------------------------------------------
MIX_PARTS = {
    "scienceqa": "scienceqa",
    "coco": "coco",
    "llava": "llava/llava_instruct.json",
    "alpaca": "alpaca_data.json",
}
"""Part -> its place in a mix folder. ScienceQA and COCO have splits; the LLaVA conversations (images in
``llava/images/``) and the Alpaca instructions have none and join the ``train`` split."""
COCO_EVAL_DIR = "coco"
"""Where the mix's evaluation keeps the caption outputs, beside the ScienceQA ones in the run directory."""


def mix_parts(root: Path) -> dict[str, Path]:
    """The parts present in the mix folder ``root``; DataError when it holds none."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such mix folder")
    parts = {name: root / place for name, place in MIX_PARTS.items() if (root / place).exists()}
    if not parts:
        raise DataError(f"{root}: holds none of the mix's parts ({', '.join(MIX_PARTS.values())})")
    return parts


def _read_mix(root: Path, split: str, prompt_format: str, template: PromptTemplate = ALPACA) -> list[Example]:
    parts = mix_parts(root)
    examples = []
    if "scienceqa" in parts:
        examples += _read_scienceqa(parts["scienceqa"], split, prompt_format, template)
    if "coco" in parts:
        examples += _read_coco(parts["coco"], split, prompt_format, template)
    if split == "train":
        if "llava" in parts:
            examples += llava.load_examples(parts["llava"], template=template)
        if "alpaca" in parts:
            examples += _read_alpaca(parts["alpaca"], split, prompt_format, template)
    return examples


def _evaluate_mix(
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
    """The ScienceQA table (into the run directory) and the COCO caption scores (into its coco/ folder) of the
    parts present; the metrics are ScienceQA's with the caption scores under "coco"."""
    parts = mix_parts(root)
    metrics: dict[str, Any] = {}
    if "scienceqa" in parts:
        settings = dict(prompt_format=prompt_format, batch_size=batch_size, max_new_tokens=max_new_tokens)
        metrics = _evaluate_scienceqa(model, run_dir, parts["scienceqa"], split, limit=limit, label=label, **settings)
    if "coco" in parts and getattr(model, "visual", None) is not None:
        images = coco.load_images(parts["coco"], split)[:limit]
        header = {
            "checkpoint": str(run_dir.resolve()),
            "adapter_sha256": file_sha256(run_dir / "adapter.safetensors"),
            "annotations": str(parts["coco"].resolve()),
            "split": split,
            "max_new_tokens": max_new_tokens,
        }
        out = run_dir / COCO_EVAL_DIR
        results = eval_coco.predict(
            model, images, out, header=header, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
        references = {im.image_id: im.references for im in images}
        scores = eval_coco.score_captions(references, {r["image_id"]: r["caption"] for r in results})
        write_json(out / METRICS_FILE, {"annotations": str(parts["coco"]), "split": split, **scores})
        print(eval_coco.format_table(scores, label=label))
        metrics["coco"] = scores
    return metrics


def _ensure_scienceqa(root: Path, kind: str) -> Path:
    return ensure_scienceqa(root, kind=kind)


def _ensure_mix(root: Path, kind: str) -> Path:
    return ensure_mix(root)


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
        synthetic=_ensure_scienceqa,
        synthetic_kinds=("shapes", "scenes"),
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
    "mix": Task(
        name="mix",
        data_hint="a folder holding any of " + ", ".join(MIX_PARTS.values()) + " (LLaVA's images in llava/images/)",
        reader=_read_mix,
        prompt_format=None,
        has_images=True,
        scoring="ScienceQA accuracy by category and COCO caption scores on the split's problems and images (run "
        "after training); the conversations and instructions: try the adapter with python -m app --checkpoint RUN_DIR",
        evaluator=_evaluate_mix,
        eval_dirs=("", COCO_EVAL_DIR),
        synthetic=_ensure_mix,
        synthetic_kinds=("demo",),
    ),
}

"""The synthetic ScienceQA in the official layout, and its Hugging Face copy.

- ``make_scienceqa``: problems.json, pid_splits.json with train / val / test / trainval / mini*,
  images/{split}/{pid}/image.png, captions.json, of task ``kind``: shapes (data.synthetic.shapes) or scenes
  (data.synthetic_scenes). ``ensure_scienceqa`` generates only when the dataset is absent.
- ``export_scienceqa_hf``: the same problems as the Hugging Face copy (save_to_disk or parquet, no pid / split
  columns, images as encoded PNG), as derek-thomas/ScienceQA ships it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from data import DataError
from data.synthetic.folders import png_bytes, write_folder_atomic, write_json
from data.synthetic.shapes import Draft, shape_draft

SCIENCEQA_KINDS = ("shapes", "scenes")
"""The synthetic ScienceQA tasks: shapes (one shape: its colour or size; the embedded default) and scenes (several
shapes: counting, colour of a named shape, positions; data.synthetic_scenes)."""


def scienceqa_drafts(seed: int, n: int, image_fraction: float = 0.5, kind: str = "shapes") -> list[Draft]:
    """``n`` synthetic problems (records + drawings) of task ``kind``, deterministic from ``seed``."""
    from data.synthetic_scenes import scene_draft

    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"image_fraction must be in [0, 1], got {image_fraction}")
    if kind not in SCIENCEQA_KINDS:
        raise ValueError(f"unknown synthetic ScienceQA kind {kind!r}; choose from {', '.join(SCIENCEQA_KINDS)}")
    draft = shape_draft if kind == "shapes" else scene_draft
    rng = random.Random(seed)
    return [draft(rng, image_fraction) for _ in range(n)]


def make_scienceqa(
    root: str | Path,
    *,
    seed: int = 0,
    n_train: int = 1600,
    n_val: int = 300,
    n_test: int = 300,
    image_size: int = 64,
    image_fraction: float = 0.5,
    kind: str = "shapes",
) -> Path:
    """Write a synthetic ScienceQA of task ``kind`` (``SCIENCEQA_KINDS``) in the official layout at ``root`` (must be
    absent or empty), with ``synthetic.json`` recording the kind and seed; returns ``root``.

    The default size is the embedded training run's; tests pass a few dozen problems.
    """
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"every split needs at least one problem, got {n_train}, {n_val}, {n_test}")
    total = n_train + n_val + n_test
    drafts = scienceqa_drafts(seed, total, image_fraction, kind)
    rng = random.Random(seed + 1)
    order = list(range(1, total + 1))
    rng.shuffle(order)  # official splits interleave pids
    cut = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    split_of = {pid: split for split, pids in cut.items() for pid in pids}
    pid_splits = {split: [str(p) for p in sorted(pids)] for split, pids in cut.items()}
    pid_splits["trainval"] = [str(p) for p in sorted(cut["train"] + cut["val"])]
    for split in ("train", "val", "test"):
        pids = cut[split]
        pid_splits[f"mini{split}"] = [str(p) for p in sorted(rng.sample(pids, max(1, len(pids) // 10)))]

    def write(tmp: Path) -> None:
        problems, captions = {}, {}
        for pid, draft in enumerate(drafts, start=1):
            key, split = str(pid), split_of[pid]
            problems[key] = {**draft.record, "split": split}
            if draft.drawing is not None:
                image_file = tmp / "images" / split / key / "image.png"
                image_file.parent.mkdir(parents=True)
                image_file.write_bytes(png_bytes(draft.drawing.render(image_size)))
                captions[key] = draft.drawing.caption()
        write_json(tmp / "problems.json", problems)
        write_json(tmp / "pid_splits.json", pid_splits)
        meta = {"model": "synthetic", "feature_extractor": "synthetic", "tokenizer": "synthetic"}
        write_json(tmp / "captions.json", {**meta, "max_length": 64, "num_beams": 1, "captions": captions})
        write_json(tmp / SYNTHETIC_RECORD, {"kind": kind, "seed": seed})

    return write_folder_atomic(Path(root), write)


SYNTHETIC_RECORD = "synthetic.json"
"""The file of a synthetic ScienceQA folder that records its kind and seed (absent in folders written before it:
kind shapes)."""
KIND_SIZES: dict[str, dict[str, Any]] = {
    "shapes": {},
    "scenes": {"n_train": 3200, "n_val": 400, "n_test": 1000, "image_fraction": 0.75},
}
"""``make_scienceqa`` sizes of each kind's generated dataset (``ensure_scienceqa``): the scenes task has more image
problems and a test split of 1,000, so that a comparison of methods has a smaller standard error."""


def ensure_scienceqa(root: str | Path, seed: int = 0, kind: str = "shapes", **sizes: Any) -> Path:
    """The synthetic ScienceQA of ``kind`` at ``root``, generated (``make_scienceqa``, ``KIND_SIZES[kind]`` unless
    ``sizes`` say otherwise) only if absent; DataError when the folder holds another kind."""
    root = Path(root)
    if not (root / "problems.json").is_file():
        try:
            make_scienceqa(root, seed=seed, kind=kind, **(KIND_SIZES.get(kind, {}) | sizes))
        except (DataError, OSError):
            if not (root / "problems.json").is_file():  # not another process finishing first: a real failure
                raise
    record = root / SYNTHETIC_RECORD
    held = json.loads(record.read_text(encoding="utf-8")).get("kind") if record.is_file() else "shapes"
    if held != kind:
        raise DataError(f"{root}: holds the synthetic ScienceQA of kind {held!r}, not {kind!r}; use another data.path")
    return root


def export_scienceqa_hf(src: str | Path, out: str | Path, *, fmt: str = "disk") -> Path:
    """Write the official-layout ScienceQA at ``src`` as the Hugging Face copy (derek-thomas/ScienceQA columns).

    fmt "disk": ``datasets`` save_to_disk folder with splits train / validation / test; "parquet":
    ``out/data/{split}-00000-of-00001.parquet``. Rows follow pid_splits order; no pid / split columns.
    """
    import datasets

    from data.scienceqa import HF_SPLIT_NAMES, load_problems

    if fmt not in ("disk", "parquet"):
        raise ValueError(f"fmt must be 'disk' or 'parquet', got {fmt!r}")
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": text,
            "choices": datasets.Sequence(text),
            "answer": datasets.Value("int8"),
            **{k: text for k in ("hint", "task", "grade", "subject", "topic", "category", "skill")},
            "lecture": text,
            "solution": text,
        }
    )
    splits = {}
    for split, name in HF_SPLIT_NAMES.items():
        rows = [
            {
                "image": None if p.image_path is None else {"bytes": p.image_path.read_bytes(), "path": None},
                **{k: getattr(p, k) for k in features if k != "image"},
            }
            for p in load_problems(src, split)
        ]
        splits[name] = datasets.Dataset.from_list(rows, features=features)

    def write(tmp: Path) -> None:
        if fmt == "disk":
            datasets.DatasetDict(splits).save_to_disk(str(tmp))
            return
        (tmp / "data").mkdir()
        for name, ds in splits.items():
            ds.to_parquet(str(tmp / "data" / f"{name}-00000-of-00001.parquet"))

    return write_folder_atomic(Path(out), write)

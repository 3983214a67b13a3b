"""ScienceQA's Hugging Face copy (e.g. derek-thomas/ScienceQA): ``save_to_disk`` folders and parquet files.

Read through ``data.scienceqa.load_problems``, which recognizes the layout. Row i of a split is
``pid_splits[split][i]`` of the official file, so pids are rebuilt from a pid_splits.json when one is given;
without one they are ``"{split}-{row}"``. Images stay encoded (PNG bytes) until used; an ``image.path`` without
bytes is relative to the dataset folder and must stay inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data import DataError, ImageFolder, InvalidRecords, read_json
from data.scienceqa import (
    BASE_SPLITS,
    HF_COLUMNS,
    HF_SPLIT_NAMES,
    Problem,
    check_record,
    load_captions,
    make_problem,
    pids_once,
    read_pid_splits,
    split_pids,
)


def _hf_source(root: Path) -> tuple[str, Path]:
    """("disk", folder) for save_to_disk output, ("parquet", folder with the parquet files)."""
    if (root / "dataset_dict.json").is_file():
        return "disk", root
    for folder in (root / "data", root):
        if folder.is_dir() and any(folder.glob("*.parquet")):
            return "parquet", folder
    raise DataError(
        f"{root}: not a ScienceQA folder: no problems.json (official layout), no dataset_dict.json "
        "(datasets save_to_disk) and no *.parquet files (Hugging Face copy)"
    )


def _hf_split(kind: str, folder: Path, split: str) -> tuple[Any, Path]:
    """The ``datasets.Dataset`` of one base split (images left encoded) and the file(s) it came from."""
    import datasets

    name = HF_SPLIT_NAMES[split]
    if kind == "disk":
        index = read_json(folder / "dataset_dict.json")
        names = index.get("splits", []) if isinstance(index, dict) else []
        found = next((n for n in (name, split) if n in names), None)
        if found is None:
            raise DataError(f"{folder / 'dataset_dict.json'}: no split {name!r}; it has {', '.join(names)}")
        ds, source = datasets.load_from_disk(str(folder / found)), folder / found
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = sorted({f for n in (name, split) for f in folder.glob(f"{n}-*.parquet")})
        if not files:
            raise DataError(f"{folder}: no {name}-*.parquet file for split {split!r}")
        # Read straight into memory (no cache files); the schema's metadata carries the datasets features (Image).
        ds, source = datasets.Dataset(pa.concat_tables([pq.read_table(f) for f in files])), files[0]
    missing = [c for c in HF_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}")
    return ds.cast_column("image", datasets.Image(decode=False)), source


def load_hf(
    root: Path, split: str, skip_invalid: bool, splits_file: Path | None, require_images: bool
) -> list[Problem]:
    kind, folder = _hf_source(root)
    pid_splits = read_pid_splits(splits_file) if splits_file is not None else None
    if split in BASE_SPLITS:
        parts = [(split, None)]
    elif pid_splits is None:
        raise DataError(
            f"{root}: split {split!r} is not train / val / test; derived splits need a pid_splits.json "
            "(put it in the folder or pass pid_splits=)"
        )
    else:
        wanted = pids_once(split_pids(pid_splits, split, splits_file), split, splits_file)
        parts = [(base, set(wanted)) for base in BASE_SPLITS]
    captions = load_captions(root) if pid_splits is not None else {}
    out: list[Problem] = []
    for base, keep in parts:
        ds, source = _hf_split(kind, folder, base)
        pids = [f"{base}-{i}" for i in range(len(ds))]
        if pid_splits is not None:
            pids = split_pids(pid_splits, base, splits_file)  # row i is pids[i], repeats included
            if len(pids) != len(ds):
                raise DataError(
                    f"{splits_file}: lists {len(pids)} {base!r} pids but {source} has {len(ds)} rows; "
                    "not the pid_splits.json this copy was built from"
                )
            pids_once(pids, base, splits_file)  # the warning; _hf_rows keeps the first row of a repeated pid
        invalid = InvalidRecords(source, skip_invalid)
        out += _hf_rows(ds, pids, base, keep, captions, invalid, root=root, require_images=require_images)
    if pid_splits is not None and split not in BASE_SPLITS:  # keep pid_splits' order for derived splits
        order = {pid: i for i, pid in enumerate(wanted)}
        out.sort(key=lambda p: order[p.pid])
    return out


def _hf_rows(
    ds: Any,
    pids: list[str],
    split: str,
    keep: set[str] | None,
    captions: dict[str, str],
    invalid: InvalidRecords,
    *,
    root: Path,
    require_images: bool,
) -> list[Problem]:
    """The problems of one split's rows; a row whose pid came before is left out (``pids_once`` warned)."""
    out, n_rows, seen, folder = [], 0, set(), ImageFolder(root)
    for i, (row, pid) in enumerate(zip(_utf8_rows(ds, invalid.file), pids)):
        if (keep is not None and pid not in keep) or pid in seen:
            continue
        seen.add(pid)
        n_rows += 1
        rec = dict(row, split=split)
        image = rec.pop("image")
        rec["image"] = None if image is None else "image.png"  # as problems.json has it; the bytes are used below
        try:
            check_record(rec)
        except ValueError as e:
            invalid(f"row {i} (pid {pid}): {e}")
            continue
        image_bytes, image_path = None, None
        if image is not None and image.get("bytes"):
            image_bytes = image["bytes"]
        elif image is not None:  # no bytes: the file at image.path, relative to the dataset folder
            if not isinstance(image.get("path"), str) or not image["path"]:
                invalid(f"row {i} (pid {pid}): image has neither bytes nor a path")
                continue
            try:
                image_path = folder.path(image["path"])
            except ValueError as e:
                invalid(f"row {i} (pid {pid}): image {e}")
                continue
            if require_images and not image_path.is_file():
                invalid(f"row {i} (pid {pid}): image file {image_path} is missing")
                continue
        caption = captions.get(pid, "")
        out.append(make_problem(pid, rec, image_path=image_path, image_bytes=image_bytes, caption=caption))
    invalid.warn(n_rows)
    return out


def _utf8_rows(ds: Any, file: Path) -> Iterator[dict[str, Any]]:
    """The rows of ``ds``; a parquet string that is not UTF-8 (pyarrow does not check) is a DataError naming the
    file, not a raw UnicodeDecodeError (``datasets`` decodes a few rows at a time, hence "or a row near it")."""
    n_read = 0
    try:
        for row in ds:
            yield row
            n_read += 1
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: row {n_read} or a row near it holds text that is not UTF-8 ({e.reason})") from None

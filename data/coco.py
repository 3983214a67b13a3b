"""COCO Captions: the Karpathy split file and the official captions_*.json annotations.

- Karpathy (``dataset_coco.json`` from caption_datasets.zip): {"images": [{filepath, filename, cocoid, split,
  sentences: [{raw, tokens, ...}], ...}], "dataset": "coco"}; split is train / restval / val / test, and the
  training split used by captioning work (and here, ``split="train"``) is train + restval. Images live at
  ``{image_root}/{filepath}/{filename}`` (image_root: the folder of the json unless given).
- Official (``annotations/captions_{train,val}{2014,2017}.json``): {"images": [{id, file_name, ...}],
  "annotations": [{id, image_id, caption}]}; images in ``{image_dir}/{file_name}`` (default: the ``train2014`` /
  ``val2014`` / ... folder beside ``annotations/``, named after the file).

Both give ``CocoImage(image_id (the COCO id), path, references)``; captions are the raw strings, stripped. Training
uses one ``Example`` per (image, caption) with the Alpaca no-input prompt and the instruction "Generate caption of
this image" (LLaMA-Adapter V2); evaluation uses the images with all their references.

Checks: an image id (Karpathy ``cocoid``, official ``images[].id``) that appears twice in a file is an invalid
record (DataError, or skipped and counted with ``skip_invalid``): its captions would be ambiguous, and the same
image in two Karpathy splits leaks between training and evaluation. Image paths named by the file must stay inside
the image folder (``..``, absolute paths and links leaving it are refused). Scoring needs no image file
(``require_images=False``): pycocoevalcap reads the annotations and the results only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import DataError, ImageFolder, InvalidRecords, read_json
from data.collate import Example
from data.prompts import ALPACA, PromptTemplate, Query

KARPATHY_FILE = "dataset_coco.json"
KARPATHY_SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",), "test": ("test",)}
"""Requested split -> the Karpathy ``split`` values it takes."""
CAPTION_INSTRUCTION = "Generate caption of this image"


@dataclass
class CocoImage:
    """One image with all its reference captions."""

    image_id: int
    path: Path
    references: list[str]


def caption_prompt(template: PromptTemplate = ALPACA) -> str:
    """The captioning prompt: the instruction "Generate caption of this image" in ``template`` (by default the
    Alpaca no-input template)."""
    return template.prompt(Query(CAPTION_INSTRUCTION))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_karpathy(
    file: str | Path,
    split: str,
    *,
    image_root: str | Path | None = None,
    skip_invalid: bool = False,
    require_images: bool = True,
) -> list[CocoImage]:
    """Images of a Karpathy split (train = train + restval, restval, val, test), in file order.

    A malformed entry (missing field, unknown split, no captions, a cocoid seen before in the file, an image path
    leaving ``image_root``, a missing image file) raises DataError naming the file and the entry; with
    ``skip_invalid=True`` it is skipped and one warning gives the count. ``require_images=False`` does not look
    for the image files (scoring).
    """
    file = Path(file)
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{file}: unknown split {split!r}; choose one of {', '.join(KARPATHY_SPLITS)}")
    data = read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{file}: expected an object with an 'images' list (Karpathy split format)")
    folder = ImageFolder(Path(image_root) if image_root is not None else file.parent)
    invalid, wanted, out, n_seen = InvalidRecords(file, skip_invalid), KARPATHY_SPLITS[split], [], 0
    first_entry: dict[int, int] = {}  # cocoid -> the entry that has it
    for i, entry in enumerate(data["images"]):
        name = f"image entry {i}" + (f" (cocoid {entry.get('cocoid')})" if isinstance(entry, dict) else "")
        problem = _check_karpathy(entry)
        if problem:
            invalid(f"{name}: {problem}")
            continue
        n_seen += entry["split"] in wanted
        if first_entry.setdefault(entry["cocoid"], i) != i:  # checked in every split: a repeat may be a leak
            j = first_entry[entry["cocoid"]]
            invalid(
                f"{name}: cocoid {entry['cocoid']} is also image entry {j} (splits {data['images'][j]['split']!r}"
                f" and {entry['split']!r}); one entry per image"
            )
            continue
        if entry["split"] not in wanted:
            continue
        try:
            path = folder.path(entry["filepath"], entry["filename"])
        except ValueError as e:
            invalid(f"{name}: image {e}")
            continue
        if require_images and not path.is_file():
            invalid(f"{name}: image file {path} is missing")
            continue
        out.append(CocoImage(entry["cocoid"], path, [s["raw"].strip() for s in entry["sentences"]]))
    invalid.warn(n_seen)
    return out


def _check_karpathy(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    for key in ("filepath", "filename", "cocoid", "split", "sentences"):
        if key not in entry:
            return f"missing field {key!r}"
    if not _is_int(entry["cocoid"]):
        return f"cocoid must be an integer, got {entry['cocoid']!r}"
    if entry["split"] not in ("train", "restval", "val", "test"):
        return f"unknown split {entry['split']!r} (expected train, restval, val or test)"
    if not isinstance(entry["filepath"], str) or not isinstance(entry["filename"], str):
        return "filepath and filename must be strings"
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        return "no captions ('sentences' is empty or not a list)"
    if not all(isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip() for s in sentences):
        return "every sentence needs a non-empty 'raw' caption"
    return None


def load_annotations(
    file: str | Path,
    *,
    image_dir: str | Path | None = None,
    skip_invalid: bool = False,
    require_images: bool = True,
) -> list[CocoImage]:
    """Images of an official captions_*.json (or any COCO-format ground truth), in the file's image order.

    image_dir: where ``file_name`` lives; default ``{file's grandparent}/{set}`` for ``annotations/captions_{set}.json``
    (COCO's layout), else the file's folder. A malformed image or annotation (an image id seen before, a
    ``file_name`` leaving image_dir, a missing image file) raises DataError naming the file and the id; with
    ``skip_invalid=True`` it is skipped and one warning gives the count. ``require_images=False`` does not look for
    the image files (scoring).
    """
    file = Path(file)
    data = read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{file}: expected an object with 'images' and 'annotations' lists (COCO format)")
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{file}: expected an object with 'images' and 'annotations' lists (COCO format)")
    folder = ImageFolder(Path(image_dir) if image_dir is not None else _default_image_dir(file))
    invalid = InvalidRecords(file, skip_invalid)
    images: dict[int, CocoImage] = {}
    first_index: dict[int, int] = {}  # image id -> its first position in 'images'
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
            invalid(f"images[{i}]: needs an integer 'id' and a string 'file_name', got {img!r}")
            continue
        if first_index.setdefault(img["id"], i) != i:
            invalid(f"images[{i}]: id {img['id']} is also images[{first_index[img['id']]}]")
            continue
        images[img["id"]] = CocoImage(img["id"], folder.base / img["file_name"], [])
    for i, ann in enumerate(data["annotations"]):
        ok = isinstance(ann, dict) and _is_int(ann.get("image_id")) and isinstance(ann.get("caption"), str)
        if not ok:
            invalid(f"annotations[{i}]: needs an integer 'image_id' and a string 'caption', got {ann!r}")
        elif ann["image_id"] not in images:
            invalid(f"annotations[{i}]: image_id {ann['image_id']} is not in 'images'")
        else:
            images[ann["image_id"]].references.append(ann["caption"].strip())
    out = []
    for image in images.values():
        if not image.references:
            invalid(f"image id {image.image_id}: no captions")
            continue
        try:
            folder.path(data["images"][first_index[image.image_id]]["file_name"])
        except ValueError as e:
            invalid(f"image id {image.image_id}: image {e}")
            continue
        if require_images and not image.path.is_file():
            invalid(f"image id {image.image_id}: image file {image.path} is missing")
        else:
            out.append(image)
    invalid.warn(len(data["images"]) + len(data["annotations"]))
    return out


def _default_image_dir(file: Path) -> Path:
    match = re.fullmatch(r"captions_(\w+)\.json", file.name)
    if match and file.parent.name == "annotations":
        return file.parent.parent / match.group(1)
    return file.parent


def load_images(root: str | Path, split: str = "test", *, skip_invalid: bool = False) -> list[CocoImage]:
    """Images with references from either format.

    root: a folder holding dataset_coco.json (``split``: a Karpathy split) and / or COCO's
    ``annotations/captions_{split}.json`` (``split`` like val2014), the Karpathy file itself, or a captions_*.json
    file (``split`` is ignored: the file is the split).
    """
    root = Path(root)
    if root.is_dir():
        official = root / "annotations" / f"captions_{split}.json"
        if split not in KARPATHY_SPLITS and official.is_file():
            return load_annotations(official, skip_invalid=skip_invalid)
        if (root / KARPATHY_FILE).is_file():
            return load_karpathy(root / KARPATHY_FILE, split, skip_invalid=skip_invalid)
        raise DataError(f"{root}: holds neither {KARPATHY_FILE} nor annotations/captions_{split}.json")
    if not root.is_file():
        raise FileNotFoundError(f"{root}: no such COCO file or folder")
    if root.name.startswith("captions_"):
        return load_annotations(root, skip_invalid=skip_invalid)
    return load_karpathy(root, split, skip_invalid=skip_invalid)


def load_examples(
    root: str | Path, split: str = "train", *, skip_invalid: bool = False, template: PromptTemplate = ALPACA
) -> list[Example]:
    """Training examples: one per (image, caption), prompt ``caption_prompt(template)``, target the caption."""
    examples = []
    for image in load_images(root, split, skip_invalid=skip_invalid):
        for caption in image.references:
            prompt, target = template.example(Query(CAPTION_INSTRUCTION), caption)
            examples.append(Example(prompt=prompt, target=target, image=image.path, meta={"image_id": image.image_id}))
    return examples


def ground_truth(images: list[CocoImage]) -> dict[str, Any]:
    """A COCO-format caption ground truth ({images, annotations, ...}) for pycocoevalcap, e.g. of Karpathy test."""
    pairs = [(image, caption) for image in images for caption in image.references]
    annotations = [{"id": n, "image_id": im.image_id, "caption": cap} for n, (im, cap) in enumerate(pairs, start=1)]
    return {
        "info": {"description": "COCO captions ground truth"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": im.image_id, "file_name": im.path.name} for im in images],
        "annotations": annotations,
    }

"""A synthetic COCO: Karpathy ``dataset_coco.json`` with JPEGs at {root}/{filepath}/{filename}, and the same
captions as official ``annotations/captions_{train,val}2014.json``."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from pathlib import Path

from data.synthetic.folders import write_folder_atomic, write_json
from data.synthetic.shapes import COLORS, Drawing, big_shape


def caption_variants(rng: random.Random, drawing: Drawing, n: int) -> list[str]:
    """``n`` different human-like captions; raw strings keep COCO's quirks (trailing space, missing period)."""
    thing = f"{drawing.color} {drawing.shape}"
    pool = [
        f"A {thing} on the {drawing.side} side.",
        f"A {thing} on a white background.",
        f"There is a {thing} in the picture.",
        f"A picture of a {thing}.",
        f"A single {thing} near the {drawing.side}.",
        f"The {drawing.shape} is {drawing.color}.",
        f"One {thing} on a plain background",
    ]
    captions = rng.sample(pool, n)
    return [c + " " if rng.random() < 0.2 else c for c in captions]


def _tokens(caption: str) -> list[str]:
    return caption.lower().translate(str.maketrans("", "", string.punctuation)).split()


def make_coco(
    root: str | Path,
    *,
    seed: int = 0,
    n_train: int = 20,
    n_restval: int = 5,
    n_val: int = 5,
    n_test: int = 5,
    captions_per_image: int = 5,
    image_size: int = 64,
    draw: Callable[[random.Random], Drawing] | None = None,
    describe: Callable[[random.Random, Drawing, int], list[str]] | None = None,
) -> Path:
    """Write a synthetic COCO at ``root`` (absent or empty): dataset_coco.json (Karpathy split) with JPEGs under
    train2014/ and val2014/, and annotations/captions_{train,val}2014.json with the same captions.

    draw: rng -> the drawing of an image (default: one big shape of a random colour); describe: (rng, drawing, n) ->
    its n captions (default: ``caption_variants``)."""
    if not 1 <= captions_per_image <= 7:
        raise ValueError(f"captions_per_image must be in 1..7, got {captions_per_image}")
    rng = random.Random(seed)
    plan = ["train"] * n_train + ["restval"] * n_restval + ["val"] * n_val + ["test"] * n_test
    cocoids = rng.sample(range(1, 600_000), len(plan))

    def write(tmp: Path) -> None:
        entries, official = [], {"train2014": ([], []), "val2014": ([], [])}
        sentid = 0
        for imgid, (split, cocoid) in enumerate(zip(plan, cocoids)):
            drawing = draw(rng) if draw is not None else big_shape(rng, rng.choice(list(COLORS)))
            folder = "train2014" if split == "train" else "val2014"  # restval / val / test all come from val2014
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            (tmp / folder).mkdir(exist_ok=True)
            drawing.render(image_size).save(tmp / folder / filename, format="JPEG", quality=90)
            captions = (describe or caption_variants)(rng, drawing, captions_per_image)
            sentences = [
                {"tokens": _tokens(c), "raw": c, "imgid": imgid, "sentid": sentid + j} for j, c in enumerate(captions)
            ]
            entries.append(
                {
                    "filepath": folder,
                    "sentids": [s["sentid"] for s in sentences],
                    "filename": filename,
                    "imgid": imgid,
                    "split": split,
                    "sentences": sentences,
                    "cocoid": cocoid,
                }
            )
            images, annotations = official[folder]
            images.append(
                {
                    "license": 1,
                    "file_name": filename,
                    "height": image_size,
                    "width": image_size,
                    "id": cocoid,
                    "date_captured": "2013-11-14 00:00:00",
                }
            )
            annotations += [{"image_id": cocoid, "id": sentid + j, "caption": c} for j, c in enumerate(captions)]
            sentid += len(captions)
        write_json(tmp / "dataset_coco.json", {"images": entries, "dataset": "coco"})
        for folder, (images, annotations) in official.items():
            info = {"description": "synthetic COCO captions", "version": "1.0", "year": 2014}
            data = {
                "info": info,
                "images": images,
                "licenses": [{"id": 1, "name": "synthetic"}],
                "annotations": annotations,
            }
            write_json(tmp / "annotations" / f"captions_{folder}.json", data)

    return write_folder_atomic(Path(root), write)

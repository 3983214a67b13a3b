"""Small datasets written in exactly the real formats, and a tiny sentencepiece tokenizer for them.

Everything is drawn from ``random.Random(seed)``: the same seed gives byte-identical files, in seconds.

- ``make_scienceqa``: the official ScienceQA layout (problems.json, pid_splits.json with train / val / test /
  trainval / mini*, images/{split}/{pid}/image.png, captions.json). About half of the problems have an image: one
  shape on a light background. Their questions ask for a *global* property of it, its colour (red / green / blue /
  yellow; the shape covers most of the image) or its size (big / small), which even the tiny random CLIP tower
  separates (a linear probe on its features: 100%; left / right position only ~90%, so it is not asked). The text
  never gives the answer away: the options are always the same, in a fixed order (the four colours; big / small),
  so the letter is uniform and only the image decides it. (Colour questions showing a varying subset of the colours
  learned markedly slower in the embedded run: the adapter must then also read which options are shown.) Text
  questions are answered by the hint (TXT) or the question itself (NO context), with 2 to 4 options in random
  order. Every subject (NAT / SOC / LAN), context group (TXT / IMG / NO) and grade band (G1-6 / G7-12) is
  populated, with lectures and solutions. Prompts stay short (about 40-80 tokens with the 512-piece tokenizer).
- ``export_scienceqa_hf``: the same problems as the Hugging Face copy (save_to_disk or parquet, no pid / split
  columns, images as encoded PNG), as derek-thomas/ScienceQA ships it.
- ``make_coco``: Karpathy ``dataset_coco.json`` with JPEGs at {root}/{filepath}/{filename}, and the same captions
  as official ``annotations/captions_{train,val}2014.json``.
- ``make_alpaca``: an alpaca_data.json list of {instruction, input, output}, ~40% with an input.
- ``train_tokenizer``: a sentencepiece BPE model like Meta's (unk 0, bos 1, eos 2, no pad, byte fallback,
  identity normalization so newlines and runs of spaces survive) with exactly ``vocab_size`` pieces;
  ``synthetic_corpus`` gives text covering everything the generators write.

Folders are written atomically: into a temporary sibling, then renamed into place (``ensure_scienceqa`` generates
only when the dataset is absent).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import string
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from data import DataError
from data.coco import CAPTION_INSTRUCTION, caption_prompt
from data.prompts import format_prompt

COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("big", "small")
NAMES = ("Mia", "Sam", "Ava", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Lily", "Noah")
ANIMALS = ("cat", "dog", "fish", "bird", "horse", "rabbit", "frog", "duck")
OBJECTS = ("ball", "kite", "block", "hat", "cup", "balloon")
DIRECTIONS = ("north", "south", "east", "west")
NON_COLORS = ("chair", "seven", "jump", "spoon", "river", "happy", "table", "sing")
WORDS = tuple(
    "apple banana cherry dragon eagle forest garden honey island jacket kitten lemon monkey "
    "nest orange pencil queen rocket sun tiger umbrella violin window yellow zebra".split()
)

LECTURES = {
    "color": "Colors help us tell things apart. Red, green, blue and yellow are colors.\nLook closely to see them.",
    "size": "Big things take up much of a picture. Small things take up only a little of it.",
    "hint": "Read the text closely. It often tells you the answer.",
    "word": "Some words name colors, some name things and some name actions.",
    "number": "Numbers tell how many. A larger number means more.",
    "letter": "Every word starts with a letter. Say the word and listen to its first sound.",
    "math": "To add two numbers, count on from the first number.",
}


# ---- ScienceQA ------------------------------------------------------------------------------------------------------
def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, color: str) -> None:
    """A filled circle, square or triangle of half-side ``half`` pixels centred at (cx, cy)."""
    box, fill = (cx - half, cy - half, cx + half, cy + half), COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)


@dataclass(frozen=True)
class Drawing:
    """One large shape on a light background; positions and size are fractions of the image side."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float
    background: tuple[int, int, int]

    def render(self, image_size: int) -> Image.Image:
        img = Image.new("RGB", (image_size, image_size), self.background)
        half = self.size * image_size / 2
        draw_shape(ImageDraw.Draw(img), self.shape, self.cx * image_size, self.cy * image_size, half, self.color)
        return img

    @property
    def side(self) -> str:
        return "left" if self.cx < 0.5 else "right"

    @property
    def size_word(self) -> str:
        return "big" if self.size >= 0.5 else "small"

    def caption(self) -> str:
        return f"A {self.size_word} {self.color} {self.shape} on a white background."


@dataclass
class Draft:
    """A problems.json record (without split) and its drawing (anything with ``render(image_size)`` and
    ``caption()``), before pids and splits are assigned."""

    record: dict[str, Any]
    drawing: Any

    @classmethod
    def of(cls, rng: random.Random, rec: dict[str, Any], hint: str, subject: str, drawing: Any) -> Draft:
        """The problems.json record of question fields ``rec`` (``_fields``) with its hint, grade and subject."""
        if rng.random() < 0.1:  # as in ScienceQA, some problems come without a lecture
            rec["lecture"] = ""
        record = {  # problems.json key order
            "question": rec["question"],
            "choices": rec["choices"],
            "answer": rec["answer"],
            "hint": hint,
            "image": "image.png" if drawing is not None else None,
            "task": rec["task"],
            "grade": f"grade{rng.randint(1, 12)}",
            "subject": subject,
            "topic": rec["topic"],
            "category": rec["category"],
            "skill": rec["skill"],
            "lecture": rec["lecture"],
            "solution": rec["solution"],
        }
        return cls(record, drawing)


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(225, 255) for _ in range(3))  # type: ignore[return-value]


def _big_shape(rng: random.Random, color: str) -> Drawing:
    """Colour questions: the shape covers most of the image, so its colour dominates the pixels."""
    size = rng.uniform(0.7, 0.95)
    return Drawing(color, rng.choice(SHAPES), rng.uniform(0.45, 0.55), rng.uniform(0.45, 0.55), size, _background(rng))


def _sized_shape(rng: random.Random, size_word: str) -> Drawing:
    """Size questions: a big shape covers most of the image, a small one a few percent of it (a global property,
    like colour, that even a random CLIP tower separates; the left / right half is not: ~90% for a linear probe)."""
    size = rng.uniform(0.8, 0.98) if size_word == "big" else rng.uniform(0.15, 0.28)
    center = (rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6))
    return Drawing(rng.choice(list(COLORS)), rng.choice(SHAPES), *center, size, _background(rng))


def _shuffled_choices(rng: random.Random, correct: str, others: list[str], k: int) -> tuple[list[str], int]:
    choices = [correct, *rng.sample(others, k - 1)]
    rng.shuffle(choices)
    return choices, choices.index(correct)


def _color_question(rng: random.Random, subject: str) -> tuple[dict[str, Any], Drawing]:
    color = rng.choice(list(COLORS))
    drawing = _big_shape(rng, color)
    obj = rng.choice(OBJECTS)
    question, topic, category, skill = {
        "natural science": (f"What color is the {obj} in the picture?", "physics", "Colors", "Identify colors"),
        "social science": ("What color is the flag in the picture?", "geography", "Flags", "Identify flag colors"),
        "language science": (
            f"Which word names the color of the {obj} in the picture?",
            "vocabulary",
            "Color words",
            "Use color words",
        ),
    }[subject]
    choices, answer = list(COLORS), list(COLORS).index(color)  # all four, fixed order: see the module doc
    solution = f"Look at the picture. The shape is {color}. So the answer is {color}."
    about = dict(topic=topic, category=category, skill=skill, lecture="color")
    return _fields(question, choices, answer, solution, **about), drawing


def _size_question(rng: random.Random, subject: str) -> tuple[dict[str, Any], Drawing]:
    size_word = rng.choice(SIZES)
    drawing = _sized_shape(rng, size_word)
    obj = rng.choice(OBJECTS)
    if subject == "social science":
        question, choices = "Is the lake on this map large or small?", ["large", "small"]
        topic, category, skill = "geography", "Maps", "Read a map: sizes"
    elif subject == "natural science":
        question, choices = f"Is the {obj} in the picture big or small?", list(SIZES)
        topic, category, skill = "physics", "Size", "Compare sizes"
    else:
        question, choices = f"Which word describes the size of the {obj} in the picture?", list(SIZES)
        topic, category, skill = "vocabulary", "Size words", "Use size words"
    answer = SIZES.index(size_word)
    solution = (
        f"The shape fills {'most' if size_word == 'big' else 'little'} of the picture. So it is {choices[answer]}."
    )
    about = dict(topic=topic, category=category, skill=skill, lecture="size")
    return _fields(question, choices, answer, solution, **about), drawing


def _hint_question(rng: random.Random, subject: str) -> tuple[dict[str, Any], str]:
    """Answered by the hint."""
    name = rng.choice(NAMES)
    if subject == "natural science":
        color, obj = rng.choice(list(COLORS)), rng.choice(OBJECTS)
        hint = f"{name} has a {color} {obj}."
        about = dict(topic="physics", category="Colors", skill="Read about colors", lecture="hint")
        solution = f"The text says the {obj} is {color}."
        if rng.random() < 0.3:
            asked = rng.choice(list(COLORS))
            choices, answer = ["yes", "no"], 0 if asked == color else 1
            return _fields(f"Is {name}'s {obj} {asked}?", choices, answer, solution, task="yes or no", **about), hint
        choices, answer = _shuffled_choices(rng, color, [c for c in COLORS if c != color], rng.randint(2, 4))
        return _fields(f"What color is {name}'s {obj}?", choices, answer, solution, **about), hint
    if subject == "social science":
        direction = rng.choice(DIRECTIONS)
        hint = f"{name} lives in a town {direction} of the lake."
        others = [d for d in DIRECTIONS if d != direction]
        choices, answer = _shuffled_choices(rng, direction, others, rng.randint(2, 4))
        solution = f"The text says {name} lives {direction} of the lake."
        about = dict(topic="geography", category="Directions", skill="Read about directions", lecture="hint")
        return _fields(f"Which way from the lake does {name} live?", choices, answer, solution, **about), hint
    animal = rng.choice(ANIMALS)
    hint = f"{name} has a pet {animal}."
    choices, answer = _shuffled_choices(rng, animal, [a for a in ANIMALS if a != animal], rng.randint(2, 4))
    solution = f"The text says {name} has a pet {animal}."
    about = dict(topic="reading-comprehension", category="Reading for details", skill="Find details", lecture="hint")
    return _fields(f"Which animal is {name}'s pet?", choices, answer, solution, **about), hint


def _no_context_question(rng: random.Random, subject: str) -> dict[str, Any]:
    """Answered by the question alone."""
    if subject == "natural science":
        color = rng.choice(list(COLORS))
        choices, answer = _shuffled_choices(rng, color, list(NON_COLORS), rng.randint(2, 4))
        about = dict(topic="physics", category="Colors", skill="Identify color words", lecture="word")
        return _fields("Which word is a color?", choices, answer, f"{color.capitalize()} is a color.", **about)
    if subject == "social science":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        truth = rng.random() < 0.5
        total = a + b if truth else a + b + rng.choice((-2, -1, 1, 2))
        about = dict(topic="economics", category="Counting money", skill="Add small numbers", lecture="math")
        question = f"True or false: {a} plus {b} is {total}."
        return _fields(
            question, ["true", "false"], 0 if truth else 1, f"{a} plus {b} is {a + b}.", task="true-or false", **about
        )
    word = rng.choice(WORDS)
    letter = word[0].upper()
    choices, answer = _shuffled_choices(rng, word, [w for w in WORDS if w[0] != word[0]], rng.randint(2, 4))
    about = dict(topic="phonological-awareness", category="Letters", skill="Find the first letter", lecture="letter")
    question = f"Which word starts with the letter {letter}?"
    return _fields(question, choices, answer, f"{word.capitalize()} starts with {letter}.", **about)


def _fields(
    question: str,
    choices: list[str],
    answer: int,
    solution: str,
    *,
    topic: str,
    category: str,
    skill: str,
    lecture: str,
    task: str = "closed choice",
) -> dict[str, Any]:
    return {
        "question": question,
        "choices": choices,
        "answer": answer,
        "task": task,
        "topic": topic,
        "category": category,
        "skill": skill,
        "lecture": LECTURES[lecture],
        "solution": solution,
    }


def _draft(rng: random.Random, image_fraction: float) -> Draft:
    subject = rng.choice(("natural science", "social science", "language science"))
    hint, drawing = "", None
    if rng.random() < image_fraction:
        ask = _color_question if rng.random() < 0.6 else _size_question
        rec, drawing = ask(rng, subject)
        if rng.random() < 0.25:  # image + text context (counts in IMG and TXT); tells nothing about the answer
            hint = f"The picture shows one {drawing.shape}."
    elif rng.random() < 0.5:
        rec, hint = _hint_question(rng, subject)
    else:
        rec = _no_context_question(rng, subject)
    return Draft.of(rng, rec, hint, subject, drawing)


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
    draft = _draft if kind == "shapes" else scene_draft
    rng = random.Random(seed)
    return [draft(rng, image_fraction) for _ in range(n)]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _atomic_dir(root: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary sibling of ``root``, then rename it to ``root`` (absent or empty)."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: already exists and is not an empty folder; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        write(tmp)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


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
                image_file.write_bytes(_png(draft.drawing.render(image_size)))
                captions[key] = draft.drawing.caption()
        _write_json(tmp / "problems.json", problems)
        _write_json(tmp / "pid_splits.json", pid_splits)
        meta = {"model": "synthetic", "feature_extractor": "synthetic", "tokenizer": "synthetic"}
        _write_json(tmp / "captions.json", {**meta, "max_length": 64, "num_beams": 1, "captions": captions})
        _write_json(tmp / SYNTHETIC_RECORD, {"kind": kind, "seed": seed})

    return _atomic_dir(Path(root), write)


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

    return _atomic_dir(Path(out), write)


# ---- COCO -----------------------------------------------------------------------------------------------------------
def _caption_variants(rng: random.Random, drawing: Drawing, n: int) -> list[str]:
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
    its n captions (default: ``_caption_variants``)."""
    if not 1 <= captions_per_image <= 7:
        raise ValueError(f"captions_per_image must be in 1..7, got {captions_per_image}")
    rng = random.Random(seed)
    plan = ["train"] * n_train + ["restval"] * n_restval + ["val"] * n_val + ["test"] * n_test
    cocoids = rng.sample(range(1, 600_000), len(plan))

    def write(tmp: Path) -> None:
        entries, official = [], {"train2014": ([], []), "val2014": ([], [])}
        sentid = 0
        for imgid, (split, cocoid) in enumerate(zip(plan, cocoids)):
            drawing = draw(rng) if draw is not None else _big_shape(rng, rng.choice(list(COLORS)))
            folder = "train2014" if split == "train" else "val2014"  # restval / val / test all come from val2014
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            (tmp / folder).mkdir(exist_ok=True)
            drawing.render(image_size).save(tmp / folder / filename, format="JPEG", quality=90)
            captions = (describe or _caption_variants)(rng, drawing, captions_per_image)
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
        _write_json(tmp / "dataset_coco.json", {"images": entries, "dataset": "coco"})
        for folder, (images, annotations) in official.items():
            info = {"description": "synthetic COCO captions", "version": "1.0", "year": 2014}
            data = {
                "info": info,
                "images": images,
                "licenses": [{"id": 1, "name": "synthetic"}],
                "annotations": annotations,
            }
            _write_json(tmp / "annotations" / f"captions_{folder}.json", data)

    return _atomic_dir(Path(root), write)


# ---- Alpaca ---------------------------------------------------------------------------------------------------------
def _alpaca_record(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        color = rng.choice(list(COLORS))
        obj = rng.choice(OBJECTS)
        return {
            "instruction": f"Describe a {color} {obj} in one sentence.",
            "input": "",
            "output": f"The {obj} is bright {color} and easy to see.",
        }
    if kind == 2:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return {
            "instruction": "Sort these words in alphabetical order.",
            "input": ", ".join(words),
            "output": ", ".join(sorted(words)),
        }
    if kind == 3:
        name, animal = rng.choice(NAMES), rng.choice(ANIMALS)
        return {
            "instruction": f"Write a short sentence about {name} and a {animal}.",
            "input": "",
            "output": f"{name} played with a friendly {animal} in the garden.",
        }
    word = rng.choice(WORDS)
    return {
        "instruction": f"Give a word that rhymes with or starts like {word}.",
        "input": "",
        "output": f"{word.capitalize()} starts with the letter {word[0].upper()}.",
    }


def alpaca_records(seed: int, n: int) -> list[dict[str, str]]:
    """``n`` Alpaca records with unique (instruction, input) pairs, deterministic from ``seed``."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(n * 50):
        rec = _alpaca_record(rng)
        key = (rec["instruction"], rec["input"])
        if key not in seen:
            seen.add(key)
            out.append(rec)
            if len(out) == n:
                return out
    raise ValueError(f"cannot draw {n} distinct synthetic Alpaca records; ask for fewer")


def make_alpaca(path: str | Path, *, seed: int = 0, n: int = 200) -> Path:
    """Write a synthetic alpaca_data.json (a JSON list of {instruction, input, output}) atomically; returns it."""
    path = Path(path)
    from model.checkpoint import write_text_atomic

    write_text_atomic(path, json.dumps(alpaca_records(seed, n), ensure_ascii=False, indent=4) + "\n")
    return path


# ---- tokenizer ------------------------------------------------------------------------------------------------------
def synthetic_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Text covering everything the generators write: ScienceQA prompts and targets in every format, lectures,
    solutions, captions, the COCO caption prompt and Alpaca prompts / outputs."""
    from data.scienceqa import FORMATS, Problem, build_prompt, build_target

    texts: list[str] = []
    for i, draft in enumerate(scienceqa_drafts(seed, n)):
        fields = {k: v for k, v in draft.record.items() if k != "image"}
        problem = Problem(pid=str(i), image_path=None, split="train", **fields)
        # the default format for every problem, and each other format in turn
        for fmt in ("llama_adapter", FORMATS[1 + i % (len(FORMATS) - 1)]):
            texts += [build_prompt(problem, fmt), build_target(problem, fmt)]
        if draft.drawing is not None:
            texts += _caption_variants(random.Random(i), draft.drawing, 3)
    texts.append(caption_prompt())
    texts.append(format_prompt(CAPTION_INSTRUCTION, "input"))
    for rec in alpaca_records(seed, min(n, 500)):
        texts += [format_prompt(rec["instruction"], rec["input"]), rec["output"]]
    return texts


def _explain_trainer_error(message: str) -> str:
    """sentencepiece's two size errors, in terms a caller can act on."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        return f"the text supports at most {too_high.group(2)} pieces; give more (or more varied) text"
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (
            f"vocab_size must be at least {too_small.group(2)} for this text (256 byte-fallback pieces, one per "
            "character and 3 special pieces)"
        )
    return message


def train_tokenizer(texts: Iterable[str] | str | Path, out_path: str | Path, vocab_size: int = 512) -> Path:
    """Train a sentencepiece BPE tokenizer like Meta's (unk 0, bos 1, eos 2, no pad, byte fallback) with exactly
    ``vocab_size`` pieces and write it atomically to ``out_path`` (a .model file, or a folder -> tokenizer.model).

    texts: the sentences, or a text file with one per line. Deterministic: the same text gives the same bytes.
    Raises DataError when the text is too small to support ``vocab_size`` pieces.
    """
    import sentencepiece as spm

    if isinstance(texts, (str, Path)):
        corpus = Path(texts)
        if not corpus.is_file():
            raise FileNotFoundError(f"{corpus}: no such corpus file")
        sentences = corpus.read_text(encoding="utf-8").splitlines()
        source = str(corpus)
    else:
        sentences, source = list(texts), "the given texts"
    sentences = [s for s in sentences if s.strip()]
    if not sentences:
        raise DataError(f"{source}: no text to train a tokenizer on")
    out = Path(out_path)
    if out.is_dir():
        out = out / "tokenizer.model"
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",  # as Meta's: keep newlines, spaces and case
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"cannot train a {vocab_size}-piece tokenizer on {source} ({len(sentences)} sentences): "
            f"{_explain_trainer_error(str(e))}"
        ) from None
    from model.checkpoint import atomic_write

    atomic_write(out, lambda tmp: tmp.write_bytes(model.getvalue()))
    return out

"""A synthetic ``mix`` folder: every format the demo serves, each in its real format, generated in seconds.

``make_mix(root)`` writes the folder the ``mix`` task reads (training/tasks.py):

- ``scienceqa/``: the synthetic ScienceQA of data.synthetic (questions with choices; the Image tab's Answer).
- ``coco/``: Karpathy-split COCO captions (the Caption button): one caption per image naming its size, colour and
  shape.
- ``llava/llava_instruct.json`` + ``llava/images/``: LLaVA-format conversations about an image (the Chat tab with
  an image): one to three questions on its colour, size, shape or the whole picture.
- ``alpaca_data.json``: text instructions in Alpaca format (the Chat tab without an image): short facts about a few
  animals, a sentence about a named child and a pet, a sentence describing a coloured object.

The demo recipe (``make train``, training/recipes/demo.yaml) trains the embedded default on it. What was measured
on the way (2026-12-02, 2-core CPU): on the plain tiny base, which never read these answer formats, the adapter
learns neither the formats nor the pictures (the loss with the images shuffled within a batch is the loss with
them in place). On assets/tiny-demo-base, which read the conversations, captions and instructions as text with
random colours, it learns every format and the sizes; with length-grouped batches (one format per batch) it reads
the colour of only 12 of 24 new pictures, with random batches 23 of 24, in Chat and Caption alike (on the base
built before the chat prompt put the new message last; the current one reads 21 and 23 of 24). One phrasing
per kind of question matters: five caption phrasings per image left the model hedging between them without
reading the colour (4 of 16 against 14 of 16).

The pictures are those the tiny random CLIP tower can tell apart (a linear probe on its features): one centred
shape, big (70-95% of the side) or small (30-45%), of one of four colours. Colour and size are recognised (99% for
the probe), the shape less well (79% for big shapes); the position is never asked (78%). Everything is drawn from
``random.Random(seed)``: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from data.synthetic.coco import make_coco
from data.synthetic.folders import write_folder_atomic
from data.synthetic.scienceqa import make_scienceqa
from data.synthetic.shapes import COLORS, NAMES, OBJECTS, SHAPES, Drawing, background

ANIMAL_FACTS = {
    "cats": "Cats are small pets. They purr and like to sleep in the sun.",
    "dogs": "Dogs are friendly pets. They bark and like to play with a ball.",
    "fish": "Fish live in water. They swim with their fins.",
    "birds": "Birds have feathers and wings. Most birds can fly.",
    "horses": "Horses are big and strong. People ride them.",
    "rabbits": "Rabbits have long ears. They hop and like to eat carrots.",
    "frogs": "Frogs live near ponds. They jump and catch flies.",
    "alpacas": "Alpacas are gentle animals from South America. They have soft wool.",
}
FACT_INSTRUCTIONS = ("Tell me about {}.", "What do you know about {}?", "Write two sentences about {}.")
PETS = ("cat", "dog", "bird", "rabbit", "duck", "horse")

COLOR_QUESTIONS = ("What color is the shape in the picture?", "What color is it?", "Which color do you see?")
SIZE_QUESTIONS = ("Is the shape big or small?", "How big is the shape?")
SHAPE_QUESTIONS = ("What shape is it?", "Which shape is in the picture?")
DESCRIBE_QUESTIONS = ("Describe the picture.", "What is in the picture?", "What do you see?")

LLAVA_FILE = "llava_instruct.json"
ALPACA_FILE = "alpaca_data.json"


def demo_drawing(rng: random.Random) -> Drawing:
    """One centred shape, big or small, of a random colour and shape, on a light background."""
    big = rng.random() < 0.5
    size = rng.uniform(0.7, 0.95) if big else rng.uniform(0.3, 0.45)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    return Drawing(color, shape, rng.uniform(0.42, 0.58), rng.uniform(0.42, 0.58), size, background(rng))


def conversation(rng: random.Random, drawing: Drawing) -> list[tuple[str, str]]:
    """One to three (question, answer) turns about ``drawing``, each on a different property. Each kind of question
    has one answer template: a tiny model learns a template per question, and a question answered in several
    phrasings teaches it to hedge between them instead of reading the picture."""
    asks = {
        "color": (COLOR_QUESTIONS, f"The shape is {drawing.color}."),
        "size": (SIZE_QUESTIONS, f"The shape is {drawing.size_word}."),
        "shape": (SHAPE_QUESTIONS, f"It is a {drawing.shape}."),
        "describe": (DESCRIBE_QUESTIONS, drawing.caption()),
    }
    topics = rng.sample(list(asks), rng.randint(1, 3))
    return [(rng.choice(asks[t][0]), asks[t][1]) for t in topics]


def make_llava(root: Path, rng: random.Random, n: int, image_size: int) -> None:
    """``root/llava_instruct.json`` (LLaVA format, "<image>" tag in the first human turn) and ``root/images/``."""
    (root / "images").mkdir(parents=True)
    ids = rng.sample(range(1, 600_000), n)
    records = []
    for cocoid in ids:
        drawing = demo_drawing(rng)
        name = f"{cocoid:012d}.jpg"  # LLaVA's images are COCO train2017 files
        drawing.render(image_size).save(root / "images" / name, format="JPEG", quality=90)
        turns = conversation(rng, drawing)
        messages: list[dict[str, str]] = []
        for k, (question, answer) in enumerate(turns):
            tagged = (f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>") if k == 0 else question
            messages += [{"from": "human", "value": tagged}, {"from": "gpt", "value": answer}]
        records.append({"id": f"{cocoid:012d}", "image": name, "conversations": messages})
    (root / LLAVA_FILE).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")


def text_instruction(rng: random.Random) -> dict[str, str]:
    """One Alpaca record of the kinds the tiny model can learn: a fact, a sentence about a child and a pet, or an
    object's colour."""
    kind = rng.randrange(3)
    if kind == 0:
        topic = rng.choice(list(ANIMAL_FACTS))
        return {"instruction": rng.choice(FACT_INSTRUCTIONS).format(topic), "input": "", "output": ANIMAL_FACTS[topic]}
    if kind == 1:
        name, pet = rng.choice(NAMES), rng.choice(PETS)
        return {
            "instruction": f"Write a short sentence about {name} and a {pet}.",
            "input": "",
            "output": f"{name} played with a friendly {pet} in the garden.",
        }
    color, obj = rng.choice(list(COLORS)), rng.choice(OBJECTS)
    return {
        "instruction": f"Describe a {color} {obj} in one sentence.",
        "input": "",
        "output": f"The {obj} is bright {color} and easy to see.",
    }


def make_mix(
    root: str | Path,
    *,
    seed: int = 0,
    n_scienceqa: tuple[int, int, int] = (800, 300, 300),
    n_coco: tuple[int, int, int] = (600, 50, 100),
    n_llava: int = 800,
    n_alpaca: int = 400,
    image_size: int = 64,
) -> Path:
    """Write the demo mix at ``root`` (absent or empty) atomically; returns ``root``.

    n_scienceqa: train / val / test problems; n_coco: train / val / test images (one caption each); n_llava:
    conversations; n_alpaca: text instructions. Tests pass small sizes.
    """
    rng = random.Random(seed)

    def write(tmp: Path) -> None:
        n_train, n_val, n_test = n_scienceqa
        make_scienceqa(tmp / "scienceqa", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size)
        c_train, c_val, c_test = n_coco
        make_coco(
            tmp / "coco",
            seed=seed + 1,
            n_train=c_train,
            n_restval=0,
            n_val=c_val,
            n_test=c_test,
            captions_per_image=1,
            image_size=image_size,
            draw=demo_drawing,
            describe=lambda rng, drawing, n: [drawing.caption()],
        )
        make_llava(tmp / "llava", rng, n_llava, image_size)
        records: list[dict[str, Any]] = [text_instruction(rng) for _ in range(n_alpaca)]
        (tmp / ALPACA_FILE).write_text(json.dumps(records, indent=4) + "\n", encoding="utf-8")

    return write_folder_atomic(Path(root), write)


def ensure_mix(root: str | Path, seed: int = 0, **sizes: Any) -> Path:
    """The demo mix at ``root``, generated (``make_mix``) only if absent."""
    from data import DataError

    root = Path(root)
    if not (root / ALPACA_FILE).is_file():
        try:
            make_mix(root, seed=seed, **sizes)
        except (DataError, OSError):
            if not (root / ALPACA_FILE).is_file():  # not another process finishing first: a real failure
                raise
    return root

"""A harder synthetic ScienceQA: scenes of several shapes, for comparing methods (``python -m bench methods
--recipe scenes``) where the one-shape task saturates (every method answers 94-100% of its image questions).

The files are the official layout, written by ``data.synthetic.make_scienceqa(kind="scenes")``; only the image
problems differ. Each scene puts 1 to 4 shapes (distinct kinds and colours) in distinct cells of a 2 x 2 grid, with
jitter, on a light background. The image questions need more than one global property of the picture:

- counting: "How many shapes are in the picture?" (one / two / three / four);
- the colour of a named shape, among 2 or 3 shapes: binds a kind to a colour;
- which side a coloured shape is on, among 2 shapes side by side: binds a colour to a place;
- which shape is on the top row, among 2 shapes one above the other: binds a place to a kind.

As in the one-shape task the options of each question type are always the same, in a fixed order, so the letter is
uniform and the text never gives the answer away; text questions (TXT / NO context) are the one-shape task's, and
every ScienceQA category stays populated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from data.synthetic.shapes import (
    COLORS,
    SHAPES,
    Draft,
    background,
    color_question,
    draw_shape,
    hint_question,
    no_context_question,
    question_fields,
    size_question,
)

COUNT_WORDS = ("one", "two", "three", "four")
SIDES = ("left", "right")
QUESTION_KINDS = ("count", "color", "side", "top")
"""The scene questions, drawn uniformly."""
ONE_SHAPE_FRACTION = 0.25
"""Image problems that are the one-shape task's (the colour or size of one big shape): a zero-init gate opens on
what the image shows plainly before the scene questions can pay, as ScienceQA mixes easy and hard image questions
(without them no method left chance on the scenes within the recipe's steps)."""


@dataclass(frozen=True)
class Item:
    """One shape of a scene; centre and size are fractions of the image side."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """Several shapes on a light background (``Draft.drawing`` for the scenes task)."""

    items: tuple[Item, ...]
    background: tuple[int, int, int]

    def render(self, image_size: int) -> Image.Image:
        img = Image.new("RGB", (image_size, image_size), self.background)
        draw = ImageDraw.Draw(img)
        for it in self.items:
            draw_shape(draw, it.shape, it.cx * image_size, it.cy * image_size, it.size * image_size / 2, it.color)
        return img

    def caption(self) -> str:
        words = ", ".join(f"a {it.color} {it.shape}" for it in self.items)
        n = len(self.items)
        return f"{COUNT_WORDS[n - 1].capitalize()} shape{'s' * (n > 1)} on a white background: {words}."


CELLS = ((0, 0), (1, 0), (0, 1), (1, 1))
"""(column, row) of the 2 x 2 grid, left to right then top to bottom."""


def _scene(rng: random.Random, cells: list[tuple[int, int]]) -> Scene:
    """Shapes of distinct kinds where possible and distinct colours in ``cells``, each filling most of its cell."""
    colors = rng.sample(list(COLORS), len(cells))
    kinds = rng.sample(SHAPES, len(cells)) if len(cells) <= len(SHAPES) else [rng.choice(SHAPES) for _ in cells]
    items = tuple(
        Item(
            color,
            kind,
            (col + 0.5 + rng.uniform(-0.06, 0.06)) / 2,
            (row + 0.5 + rng.uniform(-0.06, 0.06)) / 2,
            rng.uniform(0.34, 0.44),
        )  # fmt: skip
        for (col, row), color, kind in zip(cells, colors, kinds)
    )
    return Scene(items, background(rng))


def _image_question(rng: random.Random, subject: str) -> tuple[dict[str, Any], Any]:
    if rng.random() < ONE_SHAPE_FRACTION:
        return (color_question if rng.random() < 0.6 else size_question)(rng, subject)
    kind = rng.choice(QUESTION_KINDS)
    about = dict(topic="physics", category="Scenes", skill="Read a picture of shapes", lecture="color")
    if kind == "count":
        n = rng.randint(1, 4)
        scene = _scene(rng, rng.sample(CELLS, n))
        question = "How many shapes are in the picture?"
        solution = f"Count the shapes in the picture. There {'is' if n == 1 else 'are'} {COUNT_WORDS[n - 1]}."
        about |= dict(category="Counting", skill="Count shapes", lecture="number")
        return question_fields(question, list(COUNT_WORDS), n - 1, solution, **about), scene
    if kind == "color":
        scene = _scene(rng, rng.sample(CELLS, rng.randint(2, 3)))
        asked = rng.choice(scene.items)
        question = f"What color is the {asked.shape} in the picture?"
        solution = f"Find the {asked.shape}. It is {asked.color}."
        return question_fields(question, list(COLORS), list(COLORS).index(asked.color), solution, **about), scene
    if kind == "side":
        row = rng.randint(0, 1)
        scene = _scene(rng, [(0, row), (1, row)])
        asked = rng.choice(scene.items)
        side = SIDES[int(asked.cx >= 0.5)]
        question = f"Is the {asked.color} shape on the left or on the right?"
        solution = f"Find the {asked.color} shape. It is on the {side}."
        about |= dict(category="Position", skill="Tell left from right")
        return question_fields(question, list(SIDES), SIDES.index(side), solution, **about), scene
    col = rng.randint(0, 1)
    scene = _scene(rng, [(col, 0), (col, 1)])
    top = min(scene.items, key=lambda it: it.cy)
    question = "Which shape is at the top of the picture?"
    solution = f"Look at the top of the picture. The {top.shape} is there."
    about |= dict(category="Position", skill="Tell top from bottom")
    return question_fields(question, list(SHAPES), SHAPES.index(top.shape), solution, **about), scene


def scene_draft(rng: random.Random, image_fraction: float) -> Draft:
    """One problem of the scenes task (``data.synthetic.scienceqa_drafts(kind="scenes")``)."""
    subject = rng.choice(("natural science", "social science", "language science"))
    hint, scene = "", None
    if rng.random() < image_fraction:
        rec, scene = _image_question(rng, subject)
        if rng.random() < 0.25:  # image + text context (counts in IMG and TXT); tells nothing about the answer
            hint = "The picture shows some shapes."
    elif rng.random() < 0.5:
        rec, hint = hint_question(rng, subject)
    else:
        rec = no_context_question(rng, subject)
    return Draft.of(rng, rec, hint, subject, scene)

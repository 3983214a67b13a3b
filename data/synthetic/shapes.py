"""The one-shape synthetic ScienceQA task (kind "shapes", the embedded default): its drawings and its problems.

About half of the problems have an image: one shape on a light background. Their questions ask for a *global*
property of it, its colour (red / green / blue / yellow; the shape covers most of the image) or its size (big /
small), which even the tiny random CLIP tower separates (a linear probe on its features: 100%; left / right position
only ~90%, so it is not asked). The text never gives the answer away: the options are always the same, in a fixed
order (the four colours; big / small), so the letter is uniform and only the image decides it. (Colour questions
showing a varying subset of the colours learned markedly slower in the embedded run: the adapter must then also read
which options are shown.) Text questions are answered by the hint (TXT) or the question itself (NO context), with 2
to 4 options in random order. Every subject (NAT / SOC / LAN), context group (TXT / IMG / NO) and grade band (G1-6 /
G7-12) is populated, with lectures and solutions. Prompts stay short (about 40-80 tokens with the 512-piece
tokenizer).

The word tables, drawings and question makers here are shared by the other synthetic sets (data.synthetic_scenes,
data.synthetic_mix, data.synthetic.coco, data.synthetic.alpaca).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

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
        """The problems.json record of question fields ``rec`` (``question_fields``) with its hint, grade and
        subject."""
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


def background(rng: random.Random) -> tuple[int, int, int]:
    """A random light background colour."""
    return tuple(rng.randint(225, 255) for _ in range(3))  # type: ignore[return-value]


def big_shape(rng: random.Random, color: str) -> Drawing:
    """Colour questions: the shape covers most of the image, so its colour dominates the pixels."""
    size = rng.uniform(0.7, 0.95)
    return Drawing(color, rng.choice(SHAPES), rng.uniform(0.45, 0.55), rng.uniform(0.45, 0.55), size, background(rng))


def _sized_shape(rng: random.Random, size_word: str) -> Drawing:
    """Size questions: a big shape covers most of the image, a small one a few percent of it (a global property,
    like colour, that even a random CLIP tower separates; the left / right half is not: ~90% for a linear probe)."""
    size = rng.uniform(0.8, 0.98) if size_word == "big" else rng.uniform(0.15, 0.28)
    center = (rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6))
    return Drawing(rng.choice(list(COLORS)), rng.choice(SHAPES), *center, size, background(rng))


def _shuffled_choices(rng: random.Random, correct: str, others: list[str], k: int) -> tuple[list[str], int]:
    choices = [correct, *rng.sample(others, k - 1)]
    rng.shuffle(choices)
    return choices, choices.index(correct)


def color_question(rng: random.Random, subject: str) -> tuple[dict[str, Any], Drawing]:
    """The colour of one big shape, among the four colours in a fixed order."""
    color = rng.choice(list(COLORS))
    drawing = big_shape(rng, color)
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
    return question_fields(question, choices, answer, solution, **about), drawing


def size_question(rng: random.Random, subject: str) -> tuple[dict[str, Any], Drawing]:
    """The size of one shape (big / small, in that order)."""
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
    return question_fields(question, choices, answer, solution, **about), drawing


def hint_question(rng: random.Random, subject: str) -> tuple[dict[str, Any], str]:
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
            question = f"Is {name}'s {obj} {asked}?"
            return question_fields(question, choices, answer, solution, task="yes or no", **about), hint
        choices, answer = _shuffled_choices(rng, color, [c for c in COLORS if c != color], rng.randint(2, 4))
        return question_fields(f"What color is {name}'s {obj}?", choices, answer, solution, **about), hint
    if subject == "social science":
        direction = rng.choice(DIRECTIONS)
        hint = f"{name} lives in a town {direction} of the lake."
        others = [d for d in DIRECTIONS if d != direction]
        choices, answer = _shuffled_choices(rng, direction, others, rng.randint(2, 4))
        solution = f"The text says {name} lives {direction} of the lake."
        about = dict(topic="geography", category="Directions", skill="Read about directions", lecture="hint")
        return question_fields(f"Which way from the lake does {name} live?", choices, answer, solution, **about), hint
    animal = rng.choice(ANIMALS)
    hint = f"{name} has a pet {animal}."
    choices, answer = _shuffled_choices(rng, animal, [a for a in ANIMALS if a != animal], rng.randint(2, 4))
    solution = f"The text says {name} has a pet {animal}."
    about = dict(topic="reading-comprehension", category="Reading for details", skill="Find details", lecture="hint")
    return question_fields(f"Which animal is {name}'s pet?", choices, answer, solution, **about), hint


def no_context_question(rng: random.Random, subject: str) -> dict[str, Any]:
    """Answered by the question alone."""
    if subject == "natural science":
        color = rng.choice(list(COLORS))
        choices, answer = _shuffled_choices(rng, color, list(NON_COLORS), rng.randint(2, 4))
        about = dict(topic="physics", category="Colors", skill="Identify color words", lecture="word")
        return question_fields("Which word is a color?", choices, answer, f"{color.capitalize()} is a color.", **about)
    if subject == "social science":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        truth = rng.random() < 0.5
        total = a + b if truth else a + b + rng.choice((-2, -1, 1, 2))
        about = dict(topic="economics", category="Counting money", skill="Add small numbers", lecture="math")
        question = f"True or false: {a} plus {b} is {total}."
        return question_fields(
            question, ["true", "false"], 0 if truth else 1, f"{a} plus {b} is {a + b}.", task="true-or false", **about
        )
    word = rng.choice(WORDS)
    letter = word[0].upper()
    choices, answer = _shuffled_choices(rng, word, [w for w in WORDS if w[0] != word[0]], rng.randint(2, 4))
    about = dict(topic="phonological-awareness", category="Letters", skill="Find the first letter", lecture="letter")
    question = f"Which word starts with the letter {letter}?"
    return question_fields(question, choices, answer, f"{word.capitalize()} starts with {letter}.", **about)


def question_fields(
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
    """The question fields of a problems.json record (``Draft.of`` adds hint, grade and subject); ``lecture`` names
    one of ``LECTURES``."""
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


def shape_draft(rng: random.Random, image_fraction: float) -> Draft:
    """One problem of the shapes task: an image question with probability ``image_fraction``, else a text one."""
    subject = rng.choice(("natural science", "social science", "language science"))
    hint, drawing = "", None
    if rng.random() < image_fraction:
        ask = color_question if rng.random() < 0.6 else size_question
        rec, drawing = ask(rng, subject)
        if rng.random() < 0.25:  # image + text context (counts in IMG and TXT); tells nothing about the answer
            hint = f"The picture shows one {drawing.shape}."
    elif rng.random() < 0.5:
        rec, hint = hint_question(rng, subject)
    else:
        rec = no_context_question(rng, subject)
    return Draft.of(rng, rec, hint, subject, drawing)

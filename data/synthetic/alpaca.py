"""A synthetic Alpaca: an alpaca_data.json list of {instruction, input, output}, ~40% with an input."""

from __future__ import annotations

import json
import random
from pathlib import Path

from data.synthetic.shapes import ANIMALS, COLORS, NAMES, OBJECTS, WORDS


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

"""Checks of what a demo client sends, before any of it reaches the tokenizer or the model: text fields (no lone
surrogates, bounded length), sampling settings (finite numbers) and whether a question refers to an image.

Each failure is a ValueError whose message names the field, so the demo shows it as it is.
"""

from __future__ import annotations

import math
import re
from numbers import Real
from typing import Any

MAX_MESSAGE_CHARS = 16_000
"""Characters of one text field kept before tokenizing: bounds the work a pasted megabyte can cause."""
_SURROGATE = re.compile("[\ud800-\udfff]")
_IMAGE_REFERENCE = re.compile(
    r"\b(?:the|this|that|these|those|my|your|attached|uploaded)\s+(?:[a-z]+\s+)?"
    r"(?:image|picture|photo|photograph|pic|drawing|painting|screenshot|shape)s?\b(?!\s+of\b)",
    re.IGNORECASE,
)
"""A definite reference to a picture ("the picture", "this painting", "the red shape"), not "the shape of the earth"
or "a picture": a question that needs an image to be answered."""


class NoImageError(ValueError):
    """A question about an image sent to a model with a visual path without any image to look at."""


def refers_to_image(text: str) -> str | None:
    """The words by which ``text`` refers to an image it is about ("the picture"), or None (``_IMAGE_REFERENCE``)."""
    found = _IMAGE_REFERENCE.search(text)
    return found.group() if found else None


def has_text(text: str) -> bool:
    """Whether ``text`` holds a non-space character (read up to the first one, not copied as by ``strip``)."""
    return bool(text) and not text.isspace()


def checked_text(value: Any, what: str) -> str:
    """``value`` as text to tokenize (None is empty), or a ValueError naming ``what`` for a non-string or a lone
    surrogate (a half of a UTF-16 pair: no Unicode character, so no tokenizer can encode it)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"The {what} must be text, got {type(value).__name__} {value!r:.40}.")
    bad = _SURROGATE.search(value)
    if bad:
        raise ValueError(
            f"The {what} holds an invalid character at position {bad.start()}: U+{ord(bad.group()):04X} is half of "
            "a UTF-16 surrogate pair, not a Unicode character. Remove it, or paste the text again."
        )
    return value


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool, not a numeric string) other than NaN and infinities."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def finite_number(value: Any, name: str) -> float:
    """A sampling setting as a float, or a ValueError naming it when it is not a finite number (NaN reaches the
    sampler as a probability error from torch, a string as a conversion error)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def checked_sampling(temperature: Any, top_p: Any, max_new_tokens: Any) -> tuple[float, float, int]:
    """(temperature, top_p, max_new_tokens) checked to be finite numbers, the last a whole one; their ranges are
    checked by ``model.generate.stream``."""
    tokens = finite_number(max_new_tokens, "max_new_tokens")
    if not tokens.is_integer():
        raise ValueError(f"max_new_tokens must be a whole number, got {max_new_tokens}")
    return finite_number(temperature, "temperature"), finite_number(top_p, "top_p"), int(tokens)


def cap_chars(text: str, what: str, notes: list[str]) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    notes.append(f"Your {what} was cut to its first {MAX_MESSAGE_CHARS:,} of {len(text):,} characters.")
    return text[:MAX_MESSAGE_CHARS]

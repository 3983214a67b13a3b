"""Examples -> padded token / label / image tensors, with the loss on the response and its EOS only.

Tokenization keeps the mask boundary exact: the prompt is encoded alone (with BOS), the target alone (no BOS) plus
EOS, and the id lists are concatenated. That is also what happens at inference (the prompt is encoded alone and the
model continues it), and it avoids the official LLaMA-Adapter quirk of encoding prompt and prompt+output apart,
where a sentencepiece merge across the boundary shifts the mask by a token.
With a base's chat template (data.prompts) an example is instead encoded whole with the special tokens the
template wrote, as transformers' apply_chat_template does, and cut where the prompt's own encoding ends; BOS and the
end-of-turn tokens are the template's (model.chat_template.encode_example).

An empty target is trained as EOS alone (the real Alpaca file has such records; the official code does the same).
Text holding a lone surrogate (not Unicode; the JSON readers refuse it already) is a DataError naming the example.

Truncation never drops the answer or the EOS: an over-long prompt loses tokens from its middle (default: the
question at the start and the options / "Answer:" cue at the end survive) or from its left, after BOS. An example
whose BOS + target + EOS alone exceed ``max_len`` raises ``TargetTooLongError``; ``drop_overlong`` removes (and
counts) such examples before training.

Labels use -100 as the ignore index (``torch.nn.functional.cross_entropy``'s default), never token 0, which is a
real token (``<unk>`` in LLaMA). Padding is on the right with the tokenizer's pad id, or 0 when it has none (the
padded positions are ignored by the labels and come after every real token, so causal attention never sees them).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from PIL import Image
from torch import Tensor

from data import DataError, lone_surrogate
from model.chat_template import ChatTemplate, encode_example
from model.loss import IGNORE_INDEX  # label of positions without loss (prompt and padding): one definition

ImageInput = str | Path | bytes | Image.Image
"""An example's image: a file path, an encoded image file's bytes (the Hugging Face ScienceQA copy), or a PIL image."""


class TokenizerLike(Protocol):
    """What the collator needs from model.tokenizer.Tokenizer."""

    bos_id: int | None
    eos_id: int
    pad_id: int | None

    def encode(self, text: str, bos: bool = True, eos: bool = False, *, specials: bool = False) -> list[int]: ...


@dataclass
class Example:
    """One training / evaluation item: the model sees ``prompt`` (and ``image``) and must produce ``target``."""

    prompt: str
    target: str
    image: ImageInput | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """Where the item came from (pid, image_id, index, category, ...): kept for evaluation and error messages."""


class TargetTooLongError(DataError):
    """BOS + target + EOS alone do not fit in ``max_len``."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; ``labels`` start at ``n_prompt`` (target + EOS)."""

    tokens: list[int]
    n_prompt: int
    n_cut: int
    """Prompt tokens removed by truncation."""


def describe(example: Example) -> str:
    """A short name for error messages: the example's id from its meta, else the start of its prompt."""
    for key in ("pid", "image_id", "index", "id"):
        if key in example.meta:
            return f"example {key}={example.meta[key]}"
    return f"example with prompt {example.prompt[:40]!r}"


def image_source(image: ImageInput) -> ImageInput | io.BytesIO:
    """What an image transform receives: paths and PIL images as they are, encoded bytes as a binary file object
    (``model.visual.VisualPrompt.preprocess`` takes all three)."""
    return io.BytesIO(image) if isinstance(image, bytes) else image


class Collator:
    """Turn a list of ``Example`` into a batch dict for training.

    Returns {"tokens": (B, T) long, "labels": (B, T) long with -100 outside target + EOS (aligned with tokens:
    loss = CE(logits[:, :-1], labels[:, 1:])), "images": (B, 3, H, W) float or None when no example has an image,
    "image_mask": (B,) bool (False for text-only rows, whose image slot is zeros), "lengths": (B,) long (real tokens
    per row)}.

    image_transform: maps an image (path, PIL image or binary file object, see ``image_source``) to a (3, H, W)
        tensor, e.g. ``model.visual.preprocess``; None for text-only training (an example with an image is then
        an error: drop images explicitly).
    truncation: where an over-long prompt loses tokens: "middle" (keep its start and end) or "left".
    chat_template: the base's chat template the examples were rendered with (data.prompts): each example is then
        encoded whole with its special tokens, no BOS / EOS added (model.chat_template.encode_example).
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        max_len: int,
        image_transform: Callable[[Any], Tensor] | None = None,
        *,
        truncation: Literal["middle", "left"] = "middle",
        chat_template: ChatTemplate | None = None,
    ) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (one prompt token and EOS), got {max_len}")
        if truncation not in ("middle", "left"):
            raise ValueError(f"truncation must be 'middle' or 'left', got {truncation!r}")
        self.tokenizer, self.max_len, self.image_transform, self.truncation = (
            tokenizer,
            max_len,
            image_transform,
            truncation,
        )
        self.chat_template = chat_template
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.n_truncated = 0
        """Examples whose prompt was shortened so far (by this process)."""

    def encode(self, example: Example) -> Encoded:
        """Token ids of one example, truncated to ``max_len`` without touching the target and EOS."""
        for name, text in (("prompt", example.prompt), ("target", example.target)):
            bad = lone_surrogate(text)
            if bad:  # the tokenizer would fail with a raw pybind11 / Rust error
                raise DataError(f"{describe(example)}: the {name} holds a lone surrogate {bad}, which is not text")
        # an empty target: EOS alone (a chat template's target always holds its end-of-turn tokens)
        prompt, target = encode_example(self.tokenizer, example.prompt, example.target, self.chat_template)
        budget = self.max_len - len(target)
        n_cut = max(len(prompt) - budget, 0)
        if n_cut:
            prompt = self._truncate(prompt, budget, example)
        return Encoded(tokens=prompt + target, n_prompt=len(prompt), n_cut=n_cut)

    def _truncate(self, prompt: list[int], budget: int, example: Example) -> list[int]:
        head = prompt[:1] if prompt and prompt[0] == self.tokenizer.bos_id else []
        body, keep = prompt[len(head) :], budget - len(head)
        if keep < 0:
            raise TargetTooLongError(
                f"{describe(example)}: the target and EOS alone take {self.max_len - budget} tokens"
                f"{' (+ BOS)' if head else ''}, more than max_len={self.max_len}; raise max_len or drop the "
                "example (data.collate.drop_overlong)"
            )
        if keep == 0:
            return head
        if self.truncation == "left":
            return head + body[len(body) - keep :]
        first = keep // 2
        return head + body[:first] + body[len(body) - (keep - first) :]

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor | None]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        encoded = [self.encode(ex) for ex in examples]
        self.n_truncated += sum(e.n_cut > 0 for e in encoded)
        width = max(len(e.tokens) for e in encoded)
        tokens = torch.full((len(examples), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, e in enumerate(encoded):
            tokens[row, : len(e.tokens)] = torch.tensor(e.tokens)
            labels[row, e.n_prompt : len(e.tokens)] = torch.tensor(e.tokens[e.n_prompt :])
        images, image_mask = self._images(examples)
        lengths = torch.tensor([len(e.tokens) for e in encoded], dtype=torch.long)
        return {"tokens": tokens, "labels": labels, "images": images, "image_mask": image_mask, "lengths": lengths}

    def _images(self, examples: Sequence[Example]) -> tuple[Tensor | None, Tensor]:
        image_mask = torch.tensor([ex.image is not None for ex in examples], dtype=torch.bool)
        if not image_mask.any():
            return None, image_mask
        if self.image_transform is None:
            first = next(ex for ex in examples if ex.image is not None)
            raise DataError(
                f"{describe(first)} has an image but the Collator has no image_transform; pass one "
                "(model.visual.preprocess) or drop the images for text-only training"
            )
        pixels: list[Tensor | None] = []
        for ex in examples:
            if ex.image is None:
                pixels.append(None)
                continue
            try:
                pixels.append(self.image_transform(image_source(ex.image)))
            except (OSError, ValueError) as e:  # missing / unreadable image file: name the example
                raise DataError(f"{describe(ex)}: image {_image_name(ex.image)}: {e}") from e
        shape = next(p for p in pixels if p is not None).shape
        if any(p is not None and p.shape != shape for p in pixels):
            raise DataError(f"image_transform returned tensors of different shapes in one batch (first {tuple(shape)})")
        blank = torch.zeros(shape)
        return torch.stack([blank if p is None else p.float() for p in pixels]), image_mask  # (B, 3, H, W)


def _image_name(image: ImageInput) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return "<bytes>" if isinstance(image, bytes) else "<PIL image>"


def drop_overlong(examples: Sequence[Example], collator: Collator) -> list[Example]:
    """The examples whose target + EOS fit in ``collator.max_len``; warns with the count of those dropped."""
    kept, dropped = [], []
    for ex in examples:
        try:
            collator.encode(ex)
        except TargetTooLongError:
            dropped.append(ex)
            continue
        kept.append(ex)
    if dropped:
        warnings.warn(
            f"dropped {len(dropped)} of {len(examples)} examples whose target does not fit in max_len="
            f"{collator.max_len} (first: {describe(dropped[0])})",
            stacklevel=2,
        )
    return kept

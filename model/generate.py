"""Text generation: prompts in, completions out (batched or streamed), cut at EOS, end-of-turn tokens and stop strings.

The token level (sampling, the KV-cache decode, compiled steps) is model/decode.py; this module encodes the prompts
(``model.chat_template.encode_prompt``: with BOS, or a rendered chat template as it is), prepares the images, and
turns the new tokens back into text.

Length policy: ``model.max_tokens`` is ``max_seq_len`` (the cache and RoPE table size) less the positions the PEFT
method takes (soft tokens, position offset). A prompt longer than ``max_tokens - 1`` tokens is truncated from the
LEFT (keeping BOS) with a warning, so a batch evaluation survives one oversized item; ``max_new_tokens`` is capped
so that the longest prompt plus the generation fits in ``max_tokens``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from model.chat_template import encode_prompt
from model.decode import check_sampling, generate_tokens, token_limit

ImageInput = Image.Image | str | os.PathLike | Tensor | None


def _tokenizer(model: nn.Module) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model.tokenizer is None: load the model with a tokenizer (load_model / load_run) or set it")
    return tok


def _encode(tokenizer: Any, prompt: Any, index: int, model: nn.Module) -> list[int]:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt {index} must be a str, got {type(prompt).__name__}")
    ids = encode_prompt(tokenizer, prompt, getattr(model, "chat_template", None))
    if not ids:
        raise ValueError(f"prompt {index} is empty and the tokenizer adds no BOS")
    limit = model.max_tokens - 1  # room for at least one new token
    if len(ids) > limit:
        keep_first = ids[0] == tokenizer.bos_id
        warnings.warn(
            f"prompt {index} has {len(ids)} tokens, more than {token_limit(model)}; "
            f"keeping {'BOS and ' if keep_first else ''}the last {limit - keep_first} tokens",
            stacklevel=3,
        )
        ids = ids[:1] + ids[len(ids) - limit + 1 :] if keep_first else ids[-limit:]
    return ids


def _align_images(images: Any, n: int, single: bool) -> list[ImageInput]:
    if single:
        if isinstance(images, (list, tuple)):
            if len(images) != 1:
                raise ValueError(f"one prompt but {len(images)} images")
            return list(images)
        return [images]
    if images is None:
        return [None] * n
    if not isinstance(images, (list, tuple)) or len(images) != n:
        got = f"{len(images)} images" if isinstance(images, (list, tuple)) else type(images).__name__
        raise ValueError(f"images must be a list with one entry (image or None) per prompt: {n} prompts, got {got}")
    return list(images)


def _prepare_images(model: nn.Module, images: list[ImageInput]) -> tuple[Tensor | None, Tensor | None]:
    """Preprocess once per request: (B, 3, S, S) with zeros for rows without an image, and the (B,) mask."""
    if all(img is None for img in images):
        return None, None
    visual = getattr(model, "visual", None)
    if visual is None:
        raise ValueError("images were given but this model has no visual path (load_model(..., clip=NAME))")
    rows = [
        None if img is None else img.detach().cpu() if isinstance(img, Tensor) else visual.preprocess(img)
        for img in images
    ]
    blank = torch.zeros_like(next(r for r in rows if r is not None))
    stacked = torch.stack([blank if r is None else r for r in rows])  # (B, 3, S, S)
    mask = torch.tensor([img is not None for img in images])
    return stacked, mask


def _normalize_stop(stop: str | Sequence[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    return stops


def _first_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop string starts, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string (not safe to emit yet)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def stop_ids(model: nn.Module) -> list[int]:
    """The tokens that end a reply: EOS, and the end-of-turn tokens of the model's chat template when it has one."""
    tokenizer = _tokenizer(model)
    template = getattr(model, "chat_template", None)
    return [tokenizer.eos_id] if template is None else template.stop_ids(tokenizer)


def _start(
    model: nn.Module,
    prompts: list[str],
    images: list[ImageInput],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    compile: bool,
) -> tuple[Any, Iterator[Tensor], list[int]]:
    tokenizer = _tokenizer(model)
    check_sampling(max_new_tokens, temperature, top_p)
    ids = [_encode(tokenizer, p, i, model) for i, p in enumerate(prompts)]
    pixels, mask = _prepare_images(model, images)
    stops = stop_ids(model)
    steps = generate_tokens(
        model,
        ids,
        pixels,
        mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=stops,
        seed=seed,
        compile=compile,
    )
    return tokenizer, steps, stops


def generate(
    model: nn.Module,
    prompts: str | list[str],
    images: Any = None,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> str | list[str]:
    """Complete one prompt (-> str) or a batch (-> list[str]); the output excludes the prompt, EOS and stop strings.

    images: for a batch, a list aligned with the prompts of PIL images / paths / preprocessed (3, S, S) tensors /
    None (text-only rows take the text path in the same batch); for a single prompt, one image or None.
    temperature 0 = greedy; otherwise top-p sampling, reproducible with ``seed``. Decoding of a row stops at EOS
    or at the first ``stop`` string (cut from the output). See the module docstring for the length policy.
    compile: decode with the ``torch.compile``d step (the same greedy output; see ``generate_tokens``).
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        return []
    stops = _normalize_stop(stop)
    tokenizer, steps, ends = _start(
        model, texts, _align_images(images, len(texts), single), max_new_tokens, temperature, top_p, seed, compile
    )
    out_ids: list[list[int]] = [[] for _ in texts]
    done = [False] * len(texts)
    for next_token in steps:
        for i, t in enumerate(next_token.tolist()):
            if done[i]:
                continue
            if t in ends:
                done[i] = True
                continue
            out_ids[i].append(t)
            if stops and _first_stop(tokenizer.decode(out_ids[i]), stops) >= 0:
                done[i] = True
        if all(done):
            break
    outputs = []
    for ids in out_ids:
        text = tokenizer.decode(ids)
        cut = _first_stop(text, stops)
        outputs.append(text[:cut] if cut >= 0 else text)
    return outputs[0] if single else outputs


def stream(
    model: nn.Module,
    prompt: str,
    image: ImageInput = None,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> Iterator[str]:
    """Like ``generate`` for one prompt, yielding text pieces as they decode; their concatenation is the output.

    Text that might be the start of a stop string is held back until it is known not to be one. Arguments are
    checked, the prompt encoded and the image preprocessed at the call; decoding runs as the iterator is consumed.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"stream takes one prompt (str), got {type(prompt).__name__}; use generate for a batch")
    stops = _normalize_stop(stop)
    tokenizer, steps, ends = _start(model, [prompt], [image], max_new_tokens, temperature, top_p, seed, compile)
    return _stream_pieces(tokenizer, steps, stops, ends)


def _stream_pieces(tokenizer: Any, steps: Iterator[Tensor], stops: list[str], ends: list[int]) -> Iterator[str]:
    decoder = tokenizer.decode_stream()
    ids: list[int] = []
    text, emitted = "", 0
    for next_token in steps:
        t = int(next_token[0])
        if t in ends:
            break
        ids.append(t)
        text += decoder.push(t)
        cut = _first_stop(text, stops)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) - _held_back(text, stops)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    # The stream decoder holds back an incomplete multi-byte tail forever; the full decode renders it (as U+FFFD).
    final = tokenizer.decode(ids)
    if final.startswith(text):
        text = final
    cut = _first_stop(text, stops)
    if cut >= 0:
        text = text[:cut]
    if len(text) > emitted:
        yield text[emitted:]

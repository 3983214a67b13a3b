"""Decoding on the KV cache: greedy or temperature / top-p sampling, batched prompts, streaming, stop strings.

Paper defaults (LLaMA-Adapter V1 and the official example.py): temperature 0.1, top-p 0.75; temperature 0 is
greedy. One request = one prefill over the left-padded prompts (images encoded there, once; the PEFT method's
per-sequence state, e.g. adapter K/V, computed there and kept in the cache) followed by one single-token forward
per new token.

Left padding: prompts of different lengths are right-aligned; the pad slots are marked invalid in
``cache.key_valid`` and every row's RoPE positions count from its own first real token, so each row decodes as if
it were alone. A method's soft tokens (prompt tuning, P-tuning) sit in the cache before the padding, at positions
0..P-1 of every row (PEFT's layout), so each row still sees exactly what it would see alone.

Decoding runs ``Transformer.decode_step``, a fixed-shape step over the whole preallocated cache (write at a slot
tensor, attend under a mask of the filled, valid slots): one step for every position, so ``compile=True`` can hand
it to ``torch.compile`` once (``mode="reduce-overhead"``, CUDA graphs, on a GPU; the default mode on a CPU) and
replay it for every new token. Compiled, the cache is sized in multiples of ``COMPILE_BUCKET`` tokens and kept
for the next call of the same shape (a CUDA graph holds its address); prompts of nearby lengths share a graph.

Length policy: ``model.max_tokens`` is ``max_seq_len`` (the cache and RoPE table size) less the positions the PEFT
method takes (soft tokens, position offset). A prompt longer than ``max_tokens - 1`` tokens is truncated from the
LEFT (keeping BOS) with a warning, so a batch evaluation survives one oversized item; ``max_new_tokens`` is capped
so that the longest prompt plus the generation fits in ``max_tokens``.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from model.chat_template import encode_prompt

ImageInput = Image.Image | str | os.PathLike | Tensor | None

COMPILE_BUCKET = 128
"""compile=True: cache slots (past the soft tokens) are a multiple of this, capped at ``model.max_tokens``."""


# ---- sampling -------------------------------------------------------------------------------------------------
def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Nucleus filter (B, V) -> (B, V): keep tokens whose preceding cumulative mass is <= top_p, renormalise.

    As in the official code: sort descending, zero every token whose mass *before* it already exceeds top_p
    (the most likely token is always kept), divide by the kept mass.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    preceding = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(preceding > top_p, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """Next token per row from last-position logits (B, V): argmax if temperature is 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ---- token level ----------------------------------------------------------------------------------------------
def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    images: Tensor | None = None,
    image_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Decode a batch on the KV cache; yields the next token of every row, (B,) long, one step at a time.

    prompt_ids: one token list per row (any lengths, each at most ``model.max_tokens - 1``; longer raises). images
    (B, 3, H, W) preprocessed, image_mask (B,) bool for rows that really have one. A row that produced
    ``eos_id`` keeps yielding ``eos_id`` (several ids: any of them ends a row, which then yields the first);
    iteration ends when every row has, or after ``max_new_tokens`` steps
    (capped by ``model.max_tokens``). Stop iterating early to stop decoding. ``seed`` fixes the sampling (a private
    ``torch.Generator``; the global RNG is never used). ``compile``: the decode step through ``torch.compile``
    (the first call of each batch size and cache bucket compiles; see the module docstring).
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    max_tokens = model.max_tokens
    if not prompt_ids:
        raise ValueError("no prompts given")
    for i, ids in enumerate(prompt_ids):
        if not 0 < len(ids) < max_tokens:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; need 1 to {_token_limit(model)}")
    batch, prompt_len = len(prompt_ids), max(len(ids) for ids in prompt_ids)
    max_new_tokens = min(max_new_tokens, max_tokens - prompt_len)
    device = model.tok_embeddings.weight.device

    tokens = torch.zeros(batch, prompt_len, dtype=torch.long)  # id 0 on pad slots: masked out, never attended
    positions = torch.zeros(batch, prompt_len, dtype=torch.long)
    pads = [prompt_len - len(ids) for ids in prompt_ids]
    for i, (ids, pad) in enumerate(zip(prompt_ids, pads, strict=True)):
        tokens[i, pad:] = torch.tensor(list(ids), dtype=torch.long)
        positions[i, pad:] = torch.arange(len(ids))
    tokens, positions = tokens.to(device), positions.to(device)
    next_positions = torch.tensor([len(ids) for ids in prompt_ids], device=device)  # (B,)
    if images is not None:
        images = images.to(device)
        image_mask = image_mask.to(device) if image_mask is not None else None

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_ids = (
        None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    )

    step_fn = compiled_decode_step(device) if compile else _decode_step
    cache = _cache(model, batch, prompt_len + max_new_tokens, compile)
    try:
        for i, pad in enumerate(pads):
            cache.mark_padding(i, pad)
        # inference_mode only around the computation, never across a yield (it would leak into the caller's code).
        with torch.inference_mode():
            logits = model(tokens, images, image_mask=image_mask, cache=cache, positions=positions, last_only=True)
            slot = torch.tensor([cache.length], device=device)  # (1,): the slot the next token's K / V go to
            step_positions = next_positions[:, None].clone()  # (B, 1)
        for step in range(max_new_tokens):
            with torch.inference_mode():
                next_token = sample_next(logits[:, -1], temperature, top_p, generator)
                if stop_ids is not None:
                    next_token = next_token.masked_fill(finished, stop_ids[0])
                    finished |= torch.isin(next_token, stop_ids)
            yield next_token
            if step == max_new_tokens - 1 or (stop_ids is not None and bool(finished.all())):
                return
            with torch.inference_mode():
                if compile:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: reuse them
                logits = step_fn(model, next_token[:, None], step_positions, slot, cache)
                slot += 1
                step_positions += 1
    finally:
        _release(model, cache)


# ---- the fixed-shape decode step ---------------------------------------------------------------------------------
def _decode_step(model: nn.Module, tokens: Tensor, positions: Tensor, slot: Tensor, cache: Any) -> Tensor:
    """``model.decode_step`` as a plain function of the model: one compiled function serves every model."""
    return model.decode_step(tokens, positions, slot, cache)


_compiled_steps: dict[str, Callable[..., Tensor]] = {}  # torch.compile mode -> the compiled _decode_step
_kept_caches: weakref.WeakKeyDictionary[nn.Module, tuple[Any, bool]] = weakref.WeakKeyDictionary()
"""compile=True: per model, the cache of its last compiled decode and whether a decode is using it now."""


def compiled_decode_step(device: torch.device) -> Callable[..., Tensor]:
    """``_decode_step`` through ``torch.compile``, made once per mode: "reduce-overhead" (CUDA graphs) on CUDA, the
    default mode elsewhere. fullgraph: a graph break would be a bug of the fixed-shape step, never a silent slowdown.
    Shapes: the first graph is specialised to its batch size and cache bucket; a second shape compiles one graph
    generic in the sizes that changed (torch's automatic dynamic shapes), which CUDA graphs record once per size."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(_decode_step, mode=mode, fullgraph=True)
    return _compiled_steps[mode]


def _cache(model: nn.Module, batch: int, max_len: int, compile: bool) -> Any:
    """A fresh cache for ``max_len`` tokens; compiled, one rounded up to ``COMPILE_BUCKET`` and reused from the
    model's last compiled decode when the shapes match and no other decode holds it (a CUDA graph replays on the
    addresses it was recorded with; a new cache would make it record again)."""
    if not compile:
        return model.new_cache(batch, max_len)
    max_len = min(model.max_tokens, -(-max_len // COMPILE_BUCKET) * COMPILE_BUCKET)
    kept, busy = _kept_caches.get(model, (None, False))
    w = model.tok_embeddings.weight
    fits = kept is not None and kept.key_valid.shape == (batch, max_len + kept.n_soft)
    if fits and not busy and (kept.k[0].dtype, kept.k[0].device) == (w.dtype, w.device):
        kept.reset()
        cache = kept
    else:
        cache = model.new_cache(batch, max_len)
        for buffer in (*cache.k, *cache.v, cache.key_valid):
            torch._dynamo.mark_static_address(buffer)  # CUDA graphs: keep the buffer in place, no copy per step
    if not busy:
        _kept_caches[model] = (cache, True)
    return cache


def _release(model: nn.Module, cache: Any) -> None:
    """The decode holding ``cache`` ended: the model's kept cache may serve the next one."""
    kept = _kept_caches.get(model)
    if kept is not None and kept[0] is cache:
        _kept_caches[model] = (cache, False)


# ---- text level -----------------------------------------------------------------------------------------------
def _tokenizer(model: nn.Module) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model.tokenizer is None: load the model with a tokenizer (load_model / load_run) or set it")
    return tok


def _token_limit(model: nn.Module) -> str:
    """The longest prompt, in words: 'max_seq_len - 1 = N', with the method's positions when it takes some."""
    taken = model.config.llama.max_seq_len - model.max_tokens
    method = f" - {taken} positions of the {model.method.name} method" if taken else ""
    return f"max_seq_len{method} - 1 = {model.max_tokens - 1}"


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
            f"prompt {index} has {len(ids)} tokens, more than {_token_limit(model)}; "
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
    _check_sampling(max_new_tokens, temperature, top_p)
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

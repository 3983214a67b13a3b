"""Decoding on the KV cache at the token level: greedy or temperature / top-p sampling of batched prompts.

Paper defaults (LLaMA-Adapter V1 and the official example.py): temperature 0.1, top-p 0.75; temperature 0 is
greedy. One request = one prefill over the left-padded prompts (images encoded there, once; the PEFT method's
per-sequence state, e.g. adapter K/V, computed there and kept in the cache) followed by one single-token forward
per new token. model/generate.py is the text level above it (prompts, stop strings, streaming).

Left padding: prompts of different lengths are right-aligned; the pad slots are marked invalid in
``cache.key_valid`` and every row's RoPE positions count from its own first real token, so each row decodes as if
it were alone. A method's soft tokens (prompt tuning, P-tuning) sit in the cache before the padding, at positions
0..P-1 of every row (PEFT's layout), so each row still sees exactly what it would see alone.

Decoding runs ``Transformer.decode_step``, a fixed-shape step over the whole preallocated cache (write at a slot
tensor, attend under a mask of the filled, valid slots): one step for every position, so ``compile=True`` can hand
it to ``torch.compile`` once (``mode="reduce-overhead"``, CUDA graphs, on a GPU; the default mode on a CPU) and
replay it for every new token. Compiled, the cache is sized in multiples of ``COMPILE_BUCKET`` tokens and kept
for the next call of the same shape (a CUDA graph holds its address); prompts of nearby lengths share a graph.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

COMPILE_BUCKET = 128
"""compile=True: cache slots (past the soft tokens) are a multiple of this, capped at ``model.max_tokens``."""


def token_limit(model: nn.Module) -> str:
    """The longest prompt, in words: 'max_seq_len - 1 = N', with the method's positions when it takes some."""
    taken = model.config.llama.max_seq_len - model.max_tokens
    method = f" - {taken} positions of the {model.method.name} method" if taken else ""
    return f"max_seq_len{method} - 1 = {model.max_tokens - 1}"


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


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
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
    check_sampling(max_new_tokens, temperature, top_p)
    max_tokens = model.max_tokens
    if not prompt_ids:
        raise ValueError("no prompts given")
    for i, ids in enumerate(prompt_ids):
        if not 0 < len(ids) < max_tokens:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; need 1 to {token_limit(model)}")
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

"""LLaMA in one readable file, with one plug-in point for PEFT methods (model/methods/).

Module names follow Meta's checkpoint keys (``tok_embeddings``, ``layers.N.attention.wq`` ...), so a Meta
state dict loads with a strict ``load_state_dict``. The backbone names no PEFT method: it builds the one its
config asks for (``model.method``, a ``Method``; the plain base model when there is none) and calls its hooks:
per-sequence state kept in the KV cache, soft input tokens before the caller's, keys / values joined to attention,
an extra term of the attention heads, a module after each sublayer, and linears the method wraps when it
attaches. Every tensor a method adds carries the ``adapter_`` prefix; ``is_trainable`` is the one rule that decides
what is optimized and saved. Beside it: the decoding cache's buffers (model/kv_cache.py) and the compiled form of a
block for training steps (model/compiled_block.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.compiled_block import compiled_block, run_block
from model.config import LlamaConfig, ModelConfig
from model.kv_cache import KVCache
from model.methods import Method, build_method
from model.methods.visual_prompt import build_shared_visual

ADAPTER_PREFIX = "adapter_"


def is_trainable(name: str) -> bool:
    """The one name-based filter: trainable, optimized and saved iff some part of the name starts with adapter_."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back, then scale (Meta and transformers agree on this order).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(cfg: LlamaConfig) -> tuple[Tensor, Tensor]:
    """cos / sin of pos * theta^(-2j/hd) for j < hd/2 (Llama 3.1 scaling applied when configured), each
    (max_seq_len, hd/2), fp32."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # (hd/2,)
    if cfg.rope_scaling_factor is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, cfg)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)  # (max_seq_len, hd/2)
    return angles.cos(), angles.sin()


def llama3_scaled_frequencies(inv_freq: Tensor, cfg: LlamaConfig) -> Tensor:
    """Llama 3.1's context extension: rotations slower than original_len / low_freq_factor positions per turn are
    slowed by ``factor``, those faster than original_len / high_freq_factor are kept, and the band between is a
    linear blend of the two in original_len / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    orig, low, high = cfg.rope_original_max_seq_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    scaled = inv_freq / cfg.rope_scaling_factor
    smooth = (orig / wavelen - low) / (high - low)  # 0 at the slow edge of the band, 1 at the fast edge
    blended = (1 - smooth) * scaled + smooth * inv_freq
    return torch.where(wavelen < orig / high, inv_freq, torch.where(wavelen > orig / low, scaled, blended))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Meta's interleaved RoPE: rotate adjacent pairs (x[2j], x[2j+1]). x (B, T, nh, hd); cos/sin (B, T, 1, hd/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, nh, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, nh, hd/2, 2)
    return out.flatten(-2).type_as(x)


@dataclass
class AttentionContext:
    """What every layer of one forward needs besides its input x."""

    cos: Tensor  # (B, T, 1, hd/2) RoPE tables at the tokens' positions
    sin: Tensor  # (B, T, 1, hd/2)
    mask: Tensor | None  # (B, 1, T, S) bool, True = may attend; None: causal (is_causal) or every key visible
    is_causal: bool
    cache: KVCache | None
    method: Method
    state: Any  # method.sequence_state(...) of this sequence
    slot: Tensor | None = None  # (1,) long: the cache slot a fixed-shape decode step writes (decode_step); else None


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads; the method may join keys or add head terms."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hd)
        if ctx.cache is not None and ctx.slot is not None:  # fixed shapes: write at a slot tensor, keep every slot
            ck, cv = ctx.cache.k[self.layer_idx], ctx.cache.v[self.layer_idx]
            ck.index_copy_(2, ctx.slot, k)
            cv.index_copy_(2, ctx.slot, v)
            k, v = ck, cv  # (B, nkv, max_len, hd); ctx.mask hides the slots not (yet) filled
        elif ctx.cache is not None:
            start, ck, cv = ctx.cache.length, ctx.cache.k[self.layer_idx], ctx.cache.v[self.layer_idx]
            ck[:, :, start : start + T], cv[:, :, start : start + T] = k, v
            k, v = ck[:, :, : start + T], cv[:, :, : start + T]  # (B, nkv, S, hd)
        mask, is_causal = ctx.mask, ctx.is_causal
        joint = ctx.method.joint_kv(self, ctx)
        if joint is not None:
            # Extra keys in front of the tokens', in the same softmax, visible to every query.
            pk, pv = (t.expand(B, -1, -1, -1).to(k.dtype) for t in joint)  # (B, nkv, P, hd)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # (B, nkv, P + S, hd)
            if is_causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, S)
            if mask is not None:
                mask = F.pad(mask, (pk.shape[2], 0), value=True)  # (..., T, P + S)
            is_causal = False
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        y = ctx.method.attention_output(self, q, y, ctx)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        a = self.attention_norm(x)
        h = x + ctx.method.after_sublayer(self, "attention", a, self.attention(a, ctx), ctx)
        f = self.ffn_norm(h)
        return h + ctx.method.after_sublayer(self, "feed_forward", f, self.feed_forward(f), ctx)


class Transformer(nn.Module):
    """The frozen LLaMA with the PEFT method of ``config.method`` attached as ``self.method``.

    ``visual``, if given, maps preprocessed images (B, 3, H, W) to Q LLaMA-width visual tokens per image, which the
    method receives once per sequence (``Method.sequence_state`` / ``soft_tokens``; adaption prompts and soft
    tokens: token i added to prompt i, or one token to every one).
    """

    def __init__(self, config: ModelConfig, visual: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        cfg = config.llama
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.visual = visual
        shared = visual is not None and config.visual is not None and config.visual.entry == "shared"
        self.method = build_shared_visual(config, cfg) if shared else build_method(config.method, cfg)
        if visual is not None and not self.method.takes_visual:
            raise ValueError(f"the PEFT method {self.method.name!r} takes no visual vector; build it without clip")
        if visual is not None and config.method is not None and not shared:
            config.method.check_visual_tokens(getattr(visual, "n_tokens", 1))
        self.method.attach(self)
        if not self.tok_embeddings.weight.is_meta:  # on the meta device load_model materializes and inits later
            self.method.reset_parameters(self, None)
        self.tokenizer: Any = None  # set by load_model when a tokenizer is known; used by generate / stream
        self.chat_template: Any = None  # set by load_model for a run prompted by its base's chat template
        self.base_weights_fingerprint: str | None = None  # set by load_model; recorded by save_adapter
        self._rope: tuple[Tensor, Tensor] | None = None
        # Recompute each block in the backward pass instead of keeping its activations (when gradients are taken;
        # train.py sets it from --train.activation_checkpointing): the same gradients for much less memory.
        self.activation_checkpointing: bool = False
        # Run each block through torch.compile when gradients are taken without a cache (train.py sets it from
        # --train.compile; see compiled_block): the same loss and gradients, fused kernels.
        self.compile_blocks: bool = False
        self.freeze_base()

    def rope(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """fp32 RoPE cos / sin tables on ``device``, built on first use.

        Not buffers on purpose: ``model.to(torch.bfloat16)`` would round them, and meta-device construction
        would leave them empty.
        """
        if self._rope is None or self._rope[0].device != device:
            cos, sin = rope_tables(self.config.llama)
            self._rope = (cos.to(device), sin.to(device))
        return self._rope

    # ---- parameters -------------------------------------------------------------------------------------------
    def freeze_base(self) -> None:
        """requires_grad follows ``is_trainable``: only adapter_* tensors train."""
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name))

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trainable tensor: the method's and the visual projection."""
        return ((n, p) for n, p in self.named_parameters() if is_trainable(n))

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Only the trainable tensors, detached, under their module names."""
        return {n: p.detach() for n, p in self.trainable_parameters()}

    def describe_trainable(self) -> str:
        """'N trainable values (prompts a, gates b, visual projection c)': counts per kind (``Method.group``)."""
        groups: dict[str, int] = {}
        for name, p in self.trainable_parameters():
            kind = "visual projection" if name.startswith("visual.") else self.method.group(name)
            groups[kind] = groups.get(kind, 0) + p.numel()
        parts = ", ".join(f"{kind} {n:,}" for kind, n in groups.items())
        return f"{sum(groups.values()):,} trainable values ({parts})"

    # ---- forward ----------------------------------------------------------------------------------------------
    def visual_prompt(self, images: Tensor | None, image_mask: Tensor | None = None) -> Tensor | None:
        """(B, Q, dim) visual tokens, zero rows for items without an image; None if there are no images at all."""
        if images is None:
            return None
        if self.visual is None:
            raise ValueError("images were given but this model has no visual path (load_model(..., clip=NAME))")
        tokens = self.visual(images)  # (B, Q, dim)
        if image_mask is not None:
            tokens = tokens * image_mask.to(tokens.dtype)[:, None, None]  # text-only items: no addition
        return tokens

    def forward(
        self,
        tokens: Tensor,
        images: Tensor | None = None,
        *,
        image_mask: Tensor | None = None,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        last_only: bool = False,
        labels: Tensor | None = None,
        loss_chunk: int = 0,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) (or (B, 1, vocab) with ``last_only``); with ``labels`` the loss.

        images: (B, 3, H, W) preprocessed for the CLIP tower, or None; image_mask (B,) bool marks which rows
        really have an image. With a cache, tokens are appended after what it holds; the image features, the
        method's per-sequence state and its soft tokens are computed on the first call only and kept in the cache.
        positions (B, T) count the caller's tokens from 0 (default: the tokens already cached + arange(T)); the
        method's soft tokens and ``position_offset`` come before them (see ``Method``).

        labels (B, T), training: returns instead the fp32 sum of the next-token cross-entropy (position t predicts
        labels[:, t + 1]) over the labels that are not IGNORE_INDEX, computed ``loss_chunk`` targets at a time
        (0: in one piece) so the whole batch's logits never exist (model/loss.py). Computed inside the forward so
        that DDP / FSDP wrappers see the whole step.
        """
        B, T = tokens.shape
        if labels is not None and (cache is not None or last_only):
            raise ValueError("labels (the training loss) take a whole sequence: no cache, no last_only")
        method, n_soft = self.method, self.method.n_soft_tokens
        start = cache.length if cache is not None else 0  # cache slots already filled, soft tokens included
        new_sequence = start == 0
        done = 0 if new_sequence else start - n_soft  # the caller's tokens already in the cache
        n_positions = method.position_offset + n_soft + done + T
        max_seq_len = self.config.llama.max_seq_len
        if n_positions > max_seq_len:
            raise ValueError(f"sequence of {n_positions} positions ({n_soft} soft) exceeds max_seq_len={max_seq_len}")
        if positions is None:
            positions = torch.arange(done, done + T, device=tokens.device).expand(B, T)
        positions = positions + n_soft

        x = self.tok_embeddings(tokens)  # (B, T, dim)
        if new_sequence:  # images are encoded and the method's state and soft tokens computed once, here
            visual = self.visual_prompt(images, image_mask)
            state = method.sequence_state(self, visual)
            if cache is not None:
                cache.method_state = state
            if n_soft:
                soft = method.soft_tokens(self, visual).to(x.dtype).expand(B, n_soft, -1)  # (B, P, dim)
                x = torch.cat([soft, x], 1)  # (B, P + T, dim)
                soft_positions = torch.arange(n_soft, device=tokens.device).expand(B, n_soft)
                positions = torch.cat([soft_positions, positions], 1)  # (B, P + T)
        else:
            state = cache.method_state
        L = x.shape[1]  # slots this forward fills: T, or P + T for a new sequence with soft tokens
        rope_cos, rope_sin = self.rope(tokens.device)
        positions = positions + method.position_offset
        cos = rope_cos[positions][:, :, None, :]  # (B, L, 1, hd/2)
        sin = rope_sin[positions][:, :, None, :]
        # Unpadded and starting at 0 (training, prefill): plain causal attention. One new token over an unpadded
        # cache sees every key: no mask either (keeps fused GPU kernels). Otherwise an explicit (B, 1, L, S) mask.
        mask, is_causal = None, cache is None or (new_sequence and not cache.padded)
        if not is_causal and (L > 1 or cache.padded):
            q_idx = torch.arange(start, start + L, device=tokens.device)
            k_idx = torch.arange(start + L, device=tokens.device)
            causal = k_idx[None, :] <= q_idx[:, None]  # (L, S)
            mask = causal[None] & cache.key_valid[:, None, : start + L]  # (B, L, S)
            # A left-pad query would see no key at all; let every slot see itself so no row is fully masked
            # (fused GPU kernels return NaN there). Real tokens are unaffected.
            mask = (mask | (k_idx[None, :] == q_idx[:, None]))[:, None]  # (B, 1, L, S)

        training_step = torch.is_grad_enabled() and cache is None
        recompute = self.activation_checkpointing and training_step
        # Compiled for training steps only. A method with per-step state (begin_step: AdaMix's routes, which a graph
        # would specialise on and recompile for at every new route) keeps its blocks eager.
        compiled = self.compile_blocks and training_step and type(method).begin_step is Method.begin_step
        block = compiled_block if compiled else run_block

        def run_blocks(state: Any) -> Tensor:
            """The layers over x with the method's per-sequence ``state`` -> (B, T, dim) at the caller's tokens."""
            h, layer_ctx = x, AttentionContext(cos, sin, mask, is_causal, cache, method, state)
            for layer in self.layers:
                if recompute:  # keeps only h; the block (method hooks included) runs again in the backward pass
                    h = checkpoint(block, layer, h, layer_ctx, use_reentrant=False)
                else:
                    h = block(layer, h, layer_ctx)
            return h[:, L - T :]  # the caller's tokens only: soft positions dropped

        if labels is not None:  # the method's training loss (default: the next-token loss of one pass), () fp32
            head = lambda hidden: self.output(self.norm(hidden))  # noqa: E731  (N, dim) -> (N, vocab)
            return method.training_loss(self, run_blocks, state, labels, head, loss_chunk)
        h = run_blocks(state)
        if cache is not None:
            cache.length = start + L
        return self.output(self.norm(h if not last_only else h[:, -1:]))  # (B, T or 1, vocab)

    @property
    def max_tokens(self) -> int:
        """Tokens one sequence can hold: ``max_seq_len`` less the method's soft tokens and position offset."""
        return self.config.llama.max_seq_len - self.method.n_soft_tokens - self.method.position_offset

    def decode_step(self, tokens: Tensor, positions: Tensor, slot: Tensor, cache: KVCache) -> Tensor:
        """One new token per row with every shape fixed: tokens (B, 1) -> logits (B, 1, vocab).

        The form ``torch.compile`` captures whole (model.generate, compile=True): no shape depends on the step, no
        Python value is read from a tensor (no host sync) and no branch depends on the step, so one graph (one CUDA
        graph under mode="reduce-overhead") serves every step. K / V are written at ``slot`` (1,) long, the same
        cache slot for every row (``cache.length`` after the prefill, + 1 per step: the caller advances it), and the
        query attends over all ``max_len`` slots, masked to those filled and valid (``key_valid``: not left padding).
        positions (B, 1) count the caller's tokens as ``forward``'s do. The cache must hold a prefill from
        ``forward`` (the method's per-sequence state is read from it, never recomputed); ``cache.length`` is not
        advanced, and lengths are not checked here (``generate_tokens`` caps them before decoding).
        """
        method = self.method
        rope_cos, rope_sin = self.rope(tokens.device)
        positions = positions + method.n_soft_tokens + method.position_offset  # (B, 1)
        cos, sin = rope_cos[positions][:, :, None, :], rope_sin[positions][:, :, None, :]  # (B, 1, 1, hd/2)
        filled = torch.arange(cache.key_valid.shape[1], device=tokens.device) <= slot  # (S,): causal, one query
        mask = (cache.key_valid & filled)[:, None, None, :]  # (B, 1, 1, S)
        ctx = AttentionContext(cos, sin, mask, False, cache, method, cache.method_state, slot=slot)
        x = self.tok_embeddings(tokens)  # (B, 1, dim)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.output(self.norm(x))  # (B, 1, vocab)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``max_len`` tokens (default ``max_tokens``) plus the method's soft tokens, in the
        model's dtype and device."""
        w, n_soft = self.tok_embeddings.weight, self.method.n_soft_tokens
        slots = n_soft + (max_len or self.max_tokens)
        return KVCache(self.config.llama, batch_size, slots, w.dtype, w.device, n_soft=n_soft)

    # ---- one-call text API (implemented in model/generate.py) --------------------------------------------------
    def generate(self, prompts: list[str] | str, images: Any = None, **kwargs: Any) -> list[str] | str:
        """Complete a prompt (-> str) or a batch (-> list[str]), optionally with images; see model.generate.generate.

        kwargs: max_new_tokens=128, temperature=0.1 (0 = greedy), top_p=0.75, stop=None, seed=None, compile=False.
        """
        from model.generate import generate

        return generate(self, prompts, images, **kwargs)

    def stream(self, prompt: str, image: Any = None, **kwargs: Any) -> Iterator[str]:
        """Text pieces of one completion as they decode (same kwargs as ``generate``); see model.generate.stream."""
        from model.generate import stream

        return stream(self, prompt, image, **kwargs)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable values (works on the meta device)."""
    return sum(p.numel() for n, p in model.named_parameters() if is_trainable(n))

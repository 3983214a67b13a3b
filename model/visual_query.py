"""The visual path of the released LLaMA-Adapter V2 multimodal model (``VisualConfig.kind = "query"``): learned
queries that read every CLIP token and become Q visual tokens of the LLaMA width.

    CLIP tokens (B, N, clip_dim)            every token through ln_post and the tower's projection
    -> clip_proj, clip_proj_norm            Linear + LayerNorm           (B, N, width)
    -> [visual_query ; tokens]              Q learned rows in front      (B, Q + N, width)
    -> visual_blocks                        pre-norm ViT blocks, no mask (B, Q + N, width)
    -> first Q rows -> visual_proj, visual_proj_norm                     (B, Q, llama_dim)

The blocks are the timm-0.3.2 ``Block`` the release pins: x += attn(norm1(x)); x += mlp(norm2(x)), with torch's
LayerNorm (eps 1e-5), a biased packed qkv (rows: q of every head, then k, then v), scale head_dim^-0.5, and an
erf GELU MLP; no dropout, drop-path or layer scale. Submodule names are the release file's own keys
(``visual_blocks.0.attn.qkv.weight`` ...), so import and export only add or strip the ``visual.adapter_query.``
prefix (model/checkpoint/release_v2.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import VisualConfig


class QueryAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, hd): every token sees every token
        return self.proj(y.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class QueryMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class QueryBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)  # eps 1e-5: the Block's default norm layer, not timm ViT's 1e-6
        self.attn = QueryAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = QueryMlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class QueryProjector(nn.Module):
    """CLIP tokens (B, N, clip_dim) -> visual tokens (B, Q, llama_dim); every tensor trainable."""

    def __init__(self, cfg: VisualConfig, clip_dim: int, llama_dim: int) -> None:
        super().__init__()
        width = cfg.query_width
        self.clip_proj = nn.Linear(clip_dim, width)
        self.clip_proj_norm = nn.LayerNorm(width)
        self.visual_query = nn.Embedding(cfg.query_len, width)  # (Q, width); the release stores it as an Embedding
        self.visual_blocks = nn.ModuleList(
            QueryBlock(width, cfg.query_heads, cfg.query_mlp_ratio) for _ in range(cfg.query_blocks)
        )
        self.visual_proj = nn.Linear(width, llama_dim)
        self.visual_proj_norm = nn.LayerNorm(llama_dim)

    def forward(self, clip_tokens: Tensor) -> Tensor:
        x = self.clip_proj_norm(self.clip_proj(clip_tokens))  # (B, N, width)
        queries = self.visual_query.weight  # (Q, width), the same for every image
        x = torch.cat([queries[None].expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, Q + N, width)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : queries.shape[0]]))  # (B, Q, llama_dim)

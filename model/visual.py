"""Frozen CLIP image tower + trainable projection: the visual tokens of the multimodal LLaMA-Adapter.

The PEFT method receives the visual tokens (B, Q, LLaMA dim) once per sequence (``Method.sequence_state``;
adaption prompts: token i added to prompt i, or one token to every prompt). Two kinds (``VisualConfig.kind``):

- ``global`` (paper V1, arXiv 2303.16199, Sec. 3.3, Q = 1): the frozen encoder's multi-scale *global* features,
  concatenated, through a small MLP ``adapter_proj`` to one LLaMA-width vector. Which layers make up the
  "multi-scale" features is not stated; we take the pooled (final, projected) output plus the class token of a few
  intermediate ViT blocks (``VisualConfig.feature_layers``).
- ``query`` (the released V2 multimodal model, Q = query_len): EVERY CLIP token through ln_post and the tower's
  projection, then learned queries over them (``adapter_query``, model/visual_query.py).

The CLIP tower is frozen (no gradients, always in eval mode). The projection is the only trainable part; its name
carries the ``adapter_`` prefix so ``model.llama.is_trainable`` picks it up. The towers themselves are built in
model/clip_towers.py.

Image loading (``load_image``) turns whatever users upload (RGBA, palette, grayscale, CMYK, 16-bit, rotated
phone photos) into RGB and reports broken files (empty, truncated, not an image, decompression bombs) as one
clear ``ImageLoadError`` that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from model.clip_towers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, open_clip_tower, openai_tower, tiny_tower
from model.config import VisualConfig
from model.visual_query import QueryProjector

MAX_IMAGE_PIXELS = 89_478_485
"""Largest image (width * height) ``load_image`` accepts by default: Pillow's own bomb threshold (~0.25 GB RGB)."""

ImageSource = str | os.PathLike | IO[bytes]


class ImageLoadError(ValueError):
    """An image file that cannot be used: missing, empty, truncated, not an image, or too large."""


# ---- image loading --------------------------------------------------------------------------------------------
def _source_name(src: ImageSource) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", "<in-memory image>"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB: EXIF rotation applied, transparency composited on white, 16-bit scaled."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow clips 16-bit values to 255 when converting; scale 0..65535 to 0..255 instead.
        levels = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "F":
        raise ImageLoadError("floating-point images (Pillow mode 'F') have no standard value range; convert to 8-bit")
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def load_image(src: ImageSource, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file (path or binary file object) as a fully decoded RGB ``PIL.Image``.

    Raises ``FileNotFoundError`` for a missing path and ``ImageLoadError`` (a ``ValueError``) naming the file for
    an empty file, a file that is not an image, a truncated or corrupt image, or one over ``max_pixels`` pixels
    (checked from the header, before decoding, so a decompression bomb never allocates its pixels).
    """
    name = _source_name(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {name}")
        if not path.is_file():
            raise ImageLoadError(f"{name} is not a file")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"image file {name} is empty (0 bytes)")
    try:
        img = Image.open(src)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image {name} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name} is not an image file Pillow can read") from e
    except (OSError, SyntaxError, EOFError) as e:
        raise ImageLoadError(f"image file {name} is truncated or corrupt: {e}") from e
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageLoadError(
                f"image {name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                "(a decompression bomb or an oversized image); downscale it first"
            )
        try:
            img.load()
        except Exception as e:  # any decoder failure (OSError "truncated", SyntaxError, ...) means a bad file
            raise ImageLoadError(f"image file {name} is truncated or corrupt: {e}") from e
        try:
            return to_rgb(img)
        except ImageLoadError as e:
            raise ImageLoadError(f"{name}: {e}") from None


# ---- the visual prompt module ---------------------------------------------------------------------------------
class VisualPrompt(nn.Module):
    """Frozen CLIP tower ``clip`` + a trainable projection: images (B, 3, S, S) -> visual tokens (B, Q, llama_dim).

    ``global``: features per image [pooled CLIP output (pooled_dim) ; LayerNorm'd class token of each block in
    ``feature_layers`` (width each)] -> ``adapter_proj`` -> Q = 1 token. The intermediate class tokens are
    normalised without learned scale because the residual stream grows with depth; the pooled output already
    passed CLIP's own ln_post + projection. ``query``: every token through ln_post + projection ->
    ``adapter_query`` -> Q tokens.
    """

    def __init__(
        self,
        clip: nn.Module,
        cfg: VisualConfig,
        *,
        pooled_dim: int,
        feature_layers: tuple[int, ...],
        llama_dim: int,
        image_size: int,
        mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
        std: tuple[float, ...] = OPENAI_CLIP_STD,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
    ) -> None:
        super().__init__()
        if (feature_layers or cfg.kind == "query") and not _is_vit(clip):
            need = f"feature_layers={feature_layers}" if cfg.kind == "global" else "kind='query'"
            raise ValueError(
                f"{need} needs a ViT tower with class tokens, but this CLIP tower is a {type(clip).__name__}; "
                "set VisualConfig.kind='global' and feature_layers=() to use the pooled output only"
            )
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"CLIP resize_mode {resize_mode!r} is not supported (only 'shortest' and 'squash')")
        self.clip = clip
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.kind, self.n_tokens, self.channel_order = cfg.kind, cfg.n_tokens, cfg.channel_order
        self.feature_layers = tuple(feature_layers) if cfg.kind == "global" else ()
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = InterpolationMode(interpolation)
        self.resize_mode = resize_mode
        if cfg.kind == "query":
            self.adapter_query = QueryProjector(cfg, pooled_dim, llama_dim)
            return
        self.feature_dim = pooled_dim + len(feature_layers) * (clip.transformer.width if feature_layers else 0)
        # Two-layer bottleneck MLP. 7B + ViT-L/14 with hidden 80: 2816 -> 80 -> 4096 = 557,136 values, which with
        # the 1,229,760 prompt/gate values gives the paper's 1.79M (Table 4, L=30) and its "0.6M" projection.
        self.adapter_proj = nn.Sequential(
            nn.Linear(self.feature_dim, cfg.proj_hidden), nn.GELU(), nn.Linear(cfg.proj_hidden, llama_dim)
        )

    def train(self, mode: bool = True) -> VisualPrompt:
        """Train mode for the projection only: the frozen CLIP tower stays in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        self.clip.eval()
        return self

    def _check_images(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}) as made by VisualPrompt.preprocess, "
                f"got {tuple(images.shape)}"
            )
        return images.to(next(self.clip.parameters()).dtype)

    @torch.no_grad()
    def clip_features(self, images: Tensor) -> Tensor:
        """global: frozen multi-scale global features, (B, feature_dim), no gradient."""
        images = self._check_images(images)
        if not self.feature_layers:
            pooled = self.clip(images)
            return pooled[0] if isinstance(pooled, tuple) else pooled  # (B, pooled_dim)
        out = self.clip.forward_intermediates(
            images, indices=list(self.feature_layers), output_fmt="NLC", output_extra_tokens=True
        )
        cls_tokens = [t[:, 0] for t in out["image_intermediates_prefix"]]  # each (B, width)
        cls_tokens = [F.layer_norm(t.float(), t.shape[-1:]).to(images.dtype) for t in cls_tokens]
        return torch.cat([out["image_features"], *cls_tokens], dim=-1)  # (B, pooled_dim + n_layers * width)

    @torch.no_grad()
    def clip_tokens(self, images: Tensor) -> Tensor:
        """query: every token of the frozen tower, class token first, through ln_post and the projection, as the V2
        release computes them (open_clip's own forward projects the pooled token only): (B, 1 + grid^2, pooled_dim)."""
        tower = self.clip
        x = tower.conv1(self._check_images(images))  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid^2, width), patches row-major
        cls = tower.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + tower.positional_embedding.to(x.dtype)  # (B, 1 + grid^2, width)
        x = tower.transformer(tower.ln_pre(x))
        return tower.ln_post(x) @ tower.proj  # (B, 1 + grid^2, pooled_dim)

    def forward(self, images: Tensor) -> Tensor:
        if self.kind == "query":
            tokens = self.clip_tokens(images)
            return self.adapter_query(tokens.to(self.adapter_query.clip_proj.weight.dtype))  # (B, Q, llama_dim)
        feats = self.clip_features(images)
        return self.adapter_proj(feats.to(self.adapter_proj[0].weight.dtype))[:, None, :]  # (B, 1, llama_dim)

    def preprocess(self, img: Image.Image | str | os.PathLike | IO[bytes]) -> Tensor:
        """One image (PIL image, path or file object) -> float tensor (3, S, S) ready for ``forward``.

        CLIP's inference transform: RGB, bicubic resize of the shortest side to S, center crop S x S, [0, 1],
        normalise with the tower's mean / std (OpenAI CLIP's for ViT-L/14 and for the tiny tower). With
        ``channel_order="bgr"`` the channels are reversed before normalising, as the V2 release's cv2 reader
        hands them on (its weights were trained so).
        """
        img = to_rgb(img) if isinstance(img, Image.Image) else load_image(img)
        size = self.image_size if self.resize_mode == "shortest" else [self.image_size, self.image_size]
        img = TF.resize(img, size, interpolation=self.interpolation)
        img = TF.center_crop(img, [self.image_size, self.image_size])
        pixels = TF.to_tensor(img)  # (3, S, S) in [0, 1], RGB
        if self.channel_order == "bgr":
            pixels = pixels.flip(0)
        return TF.normalize(pixels, self.mean, self.std)  # (3, S, S)


def _is_vit(clip: nn.Module) -> bool:
    from open_clip.transformer import VisionTransformer

    return isinstance(clip, VisionTransformer)


def default_feature_layers(depth: int) -> tuple[int, ...]:
    """Blocks at one and two thirds of the depth (0-based): ViT-L/14 (24 blocks) -> (7, 15); tiny (3) -> (0, 1).

    The last block is left out: the pooled output already summarises it.
    """
    return tuple(sorted({i for i in (depth // 3 - 1, 2 * depth // 3 - 1) if 0 <= i < depth - 1}))


def build_visual(
    cfg: VisualConfig,
    llama_dim: int,
    clip_weights: str | os.PathLike | None = None,
    *,
    random_clip: bool = False,
) -> VisualPrompt:
    """The visual path for a model of width ``llama_dim``.

    ``cfg.clip_model == "tiny"``: the seeded, download-free test tower (takes no weights); ``"openai"``: the ViT of
    an OpenAI-layout state dict ``clip_weights``, its shape read from the file. Otherwise a built-in open_clip model
    name, with ``clip_weights`` a LOCAL checkpoint file (open_clip / OpenAI state dict,
    ``.safetensors`` or a ``torch.load(weights_only=True)``-able file). Nothing is ever downloaded. Without
    ``clip_weights`` the build is refused (a ViT-L tower is 1.2 GB of random numbers that no result can use)
    unless ``random_clip`` asks for a random tower (benchmarks) or it runs under ``with torch.device("meta")``
    (parameter counting: nothing is allocated).
    """
    if cfg.clip_model == "tiny":
        if clip_weights is not None:
            raise ValueError("the 'tiny' CLIP tower is built from a fixed seed and takes no clip_weights")
        clip, pre, pooled_dim = tiny_tower()
    elif cfg.clip_model == "openai":
        clip, pre, pooled_dim = openai_tower(clip_weights)
    else:
        clip, pre, pooled_dim = open_clip_tower(cfg.clip_model, clip_weights, random_clip)

    depth = len(clip.transformer.resblocks) if _is_vit(clip) else 0
    layers = cfg.feature_layers if cfg.feature_layers is not None else default_feature_layers(depth)
    out_of_range = [i for i in layers if i >= depth]
    if _is_vit(clip) and out_of_range:
        raise ValueError(
            f"VisualConfig.feature_layers {out_of_range} out of range: {cfg.clip_model} has {depth} blocks "
            f"(0..{depth - 1})"
        )
    size = pre["size"]
    return VisualPrompt(
        clip,
        cfg,
        pooled_dim=pooled_dim,
        feature_layers=layers,
        llama_dim=llama_dim,
        image_size=size if isinstance(size, int) else size[0],
        mean=pre.get("mean", OPENAI_CLIP_MEAN),
        std=pre.get("std", OPENAI_CLIP_STD),
        interpolation=pre.get("interpolation", "bicubic"),
        resize_mode=pre.get("resize_mode", "shortest"),
    )

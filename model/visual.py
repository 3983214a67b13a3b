"""Frozen CLIP image tower + trainable projection: the visual prompt of the multimodal LLaMA-Adapter.

Paper V1 (arXiv 2303.16199, Sec. 3.3): the frozen CLIP encoder gives multi-scale *global* features; they are
concatenated along channels and a small learnable projection maps them to one LLaMA-width vector I_p, which the
PEFT method receives once per sequence (``Method.sequence_state``; adaption prompts: added to every prompt of every
adapted layer). Which layers make up the "multi-scale" features is not stated; we take the pooled (final,
projected) output plus the class token of a few intermediate ViT blocks (``VisualConfig.feature_layers``).

The CLIP tower is frozen (no gradients, always in eval mode). The projection ``adapter_proj`` is the only
trainable part; its name carries the ``adapter_`` prefix so ``model.llama.is_trainable`` picks it up.

Image loading (``load_image``) turns whatever users upload (RGBA, palette, grayscale, CMYK, 16-bit, rotated
phone photos) into RGB and reports broken files (empty, truncated, not an image, decompression bombs) as one
clear ``ImageLoadError`` that names the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from model.config import VisualConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 89_478_485
"""Largest image (width * height) ``load_image`` accepts by default: Pillow's own bomb threshold (~0.25 GB RGB)."""

# The download-free tower for tests and the embedded default: 32 px images, 8 px patches (4x4 grid + class
# token), width 64, 3 blocks. Built from a fixed seed, so every build is the same network.
TINY_TOWER = dict(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=4.0, output_dim=64)
TINY_TOWER_SEED = 0

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
    """Frozen CLIP tower ``clip`` + trainable ``adapter_proj``: images (B, 3, S, S) -> visual prompt (B, llama_dim).

    Features per image: [pooled CLIP output (pooled_dim) ; LayerNorm'd class token of each block in
    ``feature_layers`` (width each)]. The intermediate class tokens are normalised without learned scale because
    the residual stream grows with depth; the pooled output already passed CLIP's own ln_post + projection.
    """

    def __init__(
        self,
        clip: nn.Module,
        *,
        pooled_dim: int,
        feature_layers: tuple[int, ...],
        llama_dim: int,
        proj_hidden: int,
        image_size: int,
        mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
        std: tuple[float, ...] = OPENAI_CLIP_STD,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
    ) -> None:
        super().__init__()
        if feature_layers and not _is_vit(clip):
            raise ValueError(
                f"feature_layers={feature_layers} needs a ViT tower with class tokens, but this CLIP tower is a "
                f"{type(clip).__name__}; set VisualConfig.feature_layers=() to use the pooled output only"
            )
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"CLIP resize_mode {resize_mode!r} is not supported (only 'shortest' and 'squash')")
        self.clip = clip
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.feature_layers = tuple(feature_layers)
        self.feature_dim = pooled_dim + len(feature_layers) * (clip.transformer.width if feature_layers else 0)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = InterpolationMode(interpolation)
        self.resize_mode = resize_mode
        # Two-layer bottleneck MLP. 7B + ViT-L/14 with hidden 80: 2816 -> 80 -> 4096 = 557,136 values, which with
        # the 1,229,760 prompt/gate values gives the paper's 1.79M (Table 4, L=30) and its "0.6M" projection.
        self.adapter_proj = nn.Sequential(
            nn.Linear(self.feature_dim, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, llama_dim)
        )

    def train(self, mode: bool = True) -> VisualPrompt:
        """Train mode for the projection only: the frozen CLIP tower stays in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def clip_features(self, images: Tensor) -> Tensor:
        """Frozen multi-scale global features, (B, feature_dim), no gradient."""
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}) as made by VisualPrompt.preprocess, "
                f"got {tuple(images.shape)}"
            )
        dtype = next(self.clip.parameters()).dtype
        images = images.to(dtype)
        if not self.feature_layers:
            pooled = self.clip(images)
            return pooled[0] if isinstance(pooled, tuple) else pooled  # (B, pooled_dim)
        out = self.clip.forward_intermediates(
            images, indices=list(self.feature_layers), output_fmt="NLC", output_extra_tokens=True
        )
        cls_tokens = [t[:, 0] for t in out["image_intermediates_prefix"]]  # each (B, width)
        cls_tokens = [F.layer_norm(t.float(), t.shape[-1:]).to(dtype) for t in cls_tokens]
        return torch.cat([out["image_features"], *cls_tokens], dim=-1)  # (B, pooled_dim + n_layers * width)

    def forward(self, images: Tensor) -> Tensor:
        feats = self.clip_features(images)
        return self.adapter_proj(feats.to(self.adapter_proj[0].weight.dtype))  # (B, llama_dim)

    def preprocess(self, img: Image.Image | str | os.PathLike | IO[bytes]) -> Tensor:
        """One image (PIL image, path or file object) -> float tensor (3, S, S) ready for ``forward``.

        CLIP's inference transform: RGB, bicubic resize of the shortest side to S, center crop S x S, [0, 1],
        normalise with the tower's mean / std (OpenAI CLIP's for ViT-L/14 and for the tiny tower).
        """
        img = to_rgb(img) if isinstance(img, Image.Image) else load_image(img)
        size = self.image_size if self.resize_mode == "shortest" else [self.image_size, self.image_size]
        img = TF.resize(img, size, interpolation=self.interpolation)
        img = TF.center_crop(img, [self.image_size, self.image_size])
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)  # (3, S, S)


def _is_vit(clip: nn.Module) -> bool:
    from open_clip.transformer import VisionTransformer

    return isinstance(clip, VisionTransformer)


def default_feature_layers(depth: int) -> tuple[int, ...]:
    """Blocks at one and two thirds of the depth (0-based): ViT-L/14 (24 blocks) -> (7, 15); tiny (3) -> (0, 1).

    The last block is left out: the pooled output already summarises it.
    """
    return tuple(sorted({i for i in (depth // 3 - 1, 2 * depth // 3 - 1) if 0 <= i < depth - 1}))


def _tiny_tower() -> tuple[nn.Module, dict[str, Any], int]:
    from open_clip.transformer import VisionTransformer

    # fork_rng: a fixed seed for an identical tower on every build, without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_TOWER_SEED)
        tower = VisionTransformer(**TINY_TOWER)
    preprocess = {"size": TINY_TOWER["image_size"], "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
    return tower, preprocess, TINY_TOWER["output_dim"]


def _check_weights_file(path: Path, model_name: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights for {model_name} not found: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist()):
                raise ValueError(
                    f"{path} is a TorchScript archive (OpenAI's original release format), which cannot be loaded "
                    "with torch.load(weights_only=True). Use open_clip's checkpoint of the same model "
                    "(open_clip_model.safetensors), or convert once: torch.save(torch.jit.load(PATH, "
                    "map_location='cpu').state_dict(), 'clip_state_dict.pt')"
                )


def _open_clip_tower(
    name: str, clip_weights: str | os.PathLike | None, random_clip: bool
) -> tuple[nn.Module, dict[str, Any], int]:
    import open_clip

    from model.checkpoint import weights_only_refusal

    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP model {name!r}: use 'tiny' or a built-in open_clip name such as 'ViT-L-14-quickgelu' "
            "(open_clip.list_models() lists them; hub names are refused because they download)"
        )
    on_meta = torch.get_default_device().type == "meta"  # shapes only: nothing is allocated
    if clip_weights is None and not (random_clip or on_meta):
        raise ValueError(
            f"CLIP model {name!r} needs its weights: pass a local weights file (clip_weights=, --clip-weights); "
            "random_clip=True builds a randomly initialised tower instead, which only benchmarks want"
        )
    pretrained = None
    if clip_weights is not None:
        path = Path(clip_weights).expanduser().resolve()
        _check_weights_file(path, name)
        # An absolute path can never be taken for one of open_clip's download tags ("openai", ...).
        pretrained = str(path)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=torch.get_default_device())
    except RuntimeError as e:
        if pretrained is None:
            raise
        raise ValueError(f"CLIP weights {pretrained} do not fit open_clip model {name}: {e}") from e
    except pickle.UnpicklingError as e:
        refusal = weights_only_refusal(e)
        if refusal is None:
            raise ValueError(f"CLIP weights {pretrained}: cannot read the file, truncated or corrupt? ({e})") from e
        raise ValueError(f"CLIP weights {pretrained}: {refusal}") from None
    pooled_dim = open_clip.get_model_config(name)["embed_dim"]
    return model.visual, open_clip.get_model_preprocess_cfg(model), pooled_dim  # the text tower is dropped


def build_visual(
    cfg: VisualConfig,
    llama_dim: int,
    clip_weights: str | os.PathLike | None = None,
    *,
    random_clip: bool = False,
) -> VisualPrompt:
    """The visual path for a model of width ``llama_dim``.

    ``cfg.clip_model == "tiny"``: the seeded, download-free test tower (takes no weights). Otherwise a built-in
    open_clip model name, with ``clip_weights`` a LOCAL checkpoint file (open_clip / OpenAI state dict,
    ``.safetensors`` or a ``torch.load(weights_only=True)``-able file). Nothing is ever downloaded. Without
    ``clip_weights`` the build is refused (a ViT-L tower is 1.2 GB of random numbers that no result can use)
    unless ``random_clip`` asks for a random tower (benchmarks) or it runs under ``with torch.device("meta")``
    (parameter counting: nothing is allocated).
    """
    if cfg.clip_model == "tiny":
        if clip_weights is not None:
            raise ValueError("the 'tiny' CLIP tower is built from a fixed seed and takes no clip_weights")
        clip, pre, pooled_dim = _tiny_tower()
    else:
        clip, pre, pooled_dim = _open_clip_tower(cfg.clip_model, clip_weights, random_clip)

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
        pooled_dim=pooled_dim,
        feature_layers=layers,
        llama_dim=llama_dim,
        proj_hidden=cfg.proj_hidden,
        image_size=size if isinstance(size, int) else size[0],
        mean=pre.get("mean", OPENAI_CLIP_MEAN),
        std=pre.get("std", OPENAI_CLIP_STD),
        interpolation=pre.get("interpolation", "bicubic"),
        resize_mode=pre.get("resize_mode", "shortest"),
    )

"""The frozen CLIP image towers the visual path can use, each built from local files only (nothing downloads):

- ``tiny``: a seeded, download-free ViT for tests and the embedded default;
- an open_clip model name with a local open_clip / OpenAI checkpoint (``open_clip.create_model``);
- ``openai``: whatever ViT an OpenAI-layout state dict holds (``visual.*`` keys, as ``torch.jit.load(path)
  .state_dict()`` of OpenAI's release gives them), its shape read from the tensors the way OpenAI's ``build_model``
  reads it. The text tower and the scalar entries (``input_resolution`` ...) are ignored. This is the tower of the
  released LLaMA-Adapter V2 (ViT-L/14, QuickGELU), which needs every one of its tokens.

Each builder returns (tower, preprocessing settings, output dim).
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The download-free tower for tests and the embedded default: 32 px images, 8 px patches (4x4 grid + class
# token), width 64, 3 blocks. Built from a fixed seed, so every build is the same network.
TINY_TOWER = dict(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=4.0, output_dim=64)
TINY_TOWER_SEED = 0

Tower = tuple[nn.Module, dict[str, Any], int]


def tiny_tower() -> Tower:
    from open_clip.transformer import VisionTransformer

    # fork_rng: a fixed seed for an identical tower on every build, without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_TOWER_SEED)
        tower = VisionTransformer(**TINY_TOWER)
    preprocess = {"size": TINY_TOWER["image_size"], "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
    return tower, preprocess, TINY_TOWER["output_dim"]


def check_weights_file(path: Path, model_name: str) -> None:
    """FileNotFoundError for a missing file; ValueError with the one-line conversion for a TorchScript archive."""
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


def open_clip_tower(name: str, clip_weights: str | os.PathLike | None, random_clip: bool) -> Tower:
    import open_clip

    from model.checkpoint import weights_only_refusal

    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP model {name!r}: use 'tiny', 'openai' (shape from an OpenAI-layout state dict) or a "
            "built-in open_clip name such as 'ViT-L-14-quickgelu' (open_clip.list_models() lists them; hub names "
            "are refused because they download)"
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
        check_weights_file(path, name)
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


def _visual_state(path: Path) -> dict[str, Tensor]:
    """The ``visual.*`` tensors of an OpenAI-layout file, prefix stripped; everything else is ignored."""
    from model.checkpoint.files import CheckpointError, load_safetensors, torch_load_object

    try:  # CheckpointError (a ValueError) names the file; weights-only loading as for every checkpoint
        state: Any = load_safetensors(path) if path.suffix == ".safetensors" else torch_load_object(path)
    except CheckpointError as e:
        raise ValueError(f"CLIP weights {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip's training checkpoints wrap it
    if not isinstance(state, dict):
        raise ValueError(f"CLIP weights {path}: expected a state dict, got {type(state).__name__}")
    visual = {k.removeprefix("module.")[len("visual.") :]: v for k, v in state.items() if isinstance(k, str)
              and k.removeprefix("module.").startswith("visual.")}  # fmt: skip
    wrong = [k for k, v in visual.items() if not isinstance(v, Tensor) or not v.is_floating_point()]
    if wrong:
        raise ValueError(f"CLIP weights {path}: visual.{wrong[0]} is not a floating-point tensor")
    return visual


def _need(state: dict[str, Tensor], key: str, ndim: int, path: Path) -> Tensor:
    if key not in state or state[key].ndim != ndim:
        raise ValueError(
            f"CLIP weights {path}: not an OpenAI-layout ViT state dict (visual.{key} missing or not {ndim}-D); "
            "'openai' needs the visual.* keys of OpenAI's CLIP (torch.jit.load(PATH).state_dict())"
        )
    return state[key]


def openai_tower(clip_weights: str | os.PathLike | None) -> Tower:
    """The ViT of an OpenAI-layout CLIP state dict, its shape inferred as OpenAI's build_model does: width from
    conv1, depth from the residual blocks, patch from conv1's kernel, grid from the position rows, heads =
    width / 64, output dim from proj; QuickGELU. ViT-L/14: width 1024, 24 blocks, patch 14, 224 px, 16 heads, 768."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    if clip_weights is None:
        raise ValueError("CLIP model 'openai' reads its shape from the weights: pass clip_weights= (--clip-weights)")
    path = Path(clip_weights).expanduser().resolve()
    check_weights_file(path, "openai")
    state = _visual_state(path)
    conv = _need(state, "conv1.weight", 4, path)  # (width, 3, patch, patch)
    positions = _need(state, "positional_embedding", 2, path).shape[0]  # grid^2 + 1
    proj = _need(state, "proj", 2, path)  # (width, output_dim)
    c_fc = _need(state, "transformer.resblocks.0.mlp.c_fc.weight", 2, path)  # (mlp width, width)
    width, patch = conv.shape[0], conv.shape[-1]
    layers = sum(1 for k in state if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight"))
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or width % 64 or width > 2**14 or layers > 2**8 or grid > 2**8:
        raise ValueError(
            f"CLIP weights {path}: width {width}, {layers} blocks, {positions} positions do not make an OpenAI ViT "
            "(width a multiple of 64, positions a square grid + 1)"
        )
    tower = VisionTransformer(
        image_size=patch * grid, patch_size=patch, width=width, layers=layers, heads=width // 64,
        mlp_ratio=c_fc.shape[0] / width, output_dim=proj.shape[1], act_layer=QuickGELU,
    )  # fmt: skip
    if torch.get_default_device().type != "meta":
        try:
            tower.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"CLIP weights {path}: the visual tensors do not fit the inferred ViT: {e}") from None
    preprocess = {"size": patch * grid, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
    return tower, preprocess, proj.shape[1]

"""The training set-ups ``python -m bench memory`` predicts (bench/memory_predict.py) and measures
(bench/memory_measure.py): the shapes, the set-up, and the model it builds, on the meta device or with random
weights."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from bench.shapes import SHAPES
from model.config import PRESETS, LlamaConfig, ModelConfig, VisualConfig
from model.llama import Transformer

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LLAMA_SHAPES: dict[str, LlamaConfig] = {
    **{name: shape.llama for name, shape in SHAPES.items()},
    "13b": dataclasses.replace(PRESETS["13B"]),
    # LLaMA-1 33B (Meta's "30B"): dim 6656, 60 layers, 52 heads, Meta's FFN rule.
    "33b": LlamaConfig(dim=6656, n_layers=60, n_heads=52, vocab_size=32000, ffn_dim=LlamaConfig.meta_ffn_dim(6656)),
    # Llama-2-70B: grouped-query attention with 8 key/value heads, ffn_dim_multiplier 1.3, multiple_of 4096.
    "70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim=28672, max_seq_len=4096
    ),
}
"""--shape: the bench shapes (tiny, 100m, 7b) and the larger LLaMA sizes."""


@dataclass(frozen=True)
class Setup:
    """One training set-up; batch and seq are per device (the micro-batch each process runs)."""

    shape: str = "7b"
    method: str = "llama_adapter"
    dtype: str = "bfloat16"
    quantize: str = "none"
    batch: int = 4
    seq: int = 512
    activation_checkpointing: bool = False
    loss_chunk: int = 1024
    gpus: int = 1
    strategy: str = "ddp"
    images: bool = False
    clip: str = "ViT-L-14-quickgelu"

    def __post_init__(self) -> None:
        checks = {
            "--shape": (self.shape in LLAMA_SHAPES, ", ".join(LLAMA_SHAPES)),
            "--dtype": (self.dtype in DTYPE_BYTES, ", ".join(DTYPE_BYTES)),
            "--quantize": (self.quantize in ("none", "nf4", "int8"), "none, nf4, int8"),
            "--strategy": (self.strategy in ("ddp", "fsdp"), "ddp, fsdp"),
        }
        for flag, (ok, choices) in checks.items():
            if not ok:
                raise ValueError(f"{flag} {getattr(self, flag[2:])!r}: choose one of {choices}")
        for flag, value, low in (("--batch", self.batch, 1), ("--seq", self.seq, 2), ("--gpus", self.gpus, 1)):
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if self.loss_chunk < 0:
            raise ValueError(f"--loss-chunk must be >= 0 (0: the whole batch at once), got {self.loss_chunk}")
        if self.seq > LLAMA_SHAPES[self.shape].max_seq_len:
            raise ValueError(
                f"--seq {self.seq} exceeds the {self.shape} shape's {LLAMA_SHAPES[self.shape].max_seq_len}"
            )

    @property
    def llama(self) -> LlamaConfig:
        return dataclasses.replace(LLAMA_SHAPES[self.shape])


def method_config(setup: Setup, llama: LlamaConfig) -> Any:
    """The method's default settings (as ``--model.method NAME`` trains with), its adapted layers fitted to the
    shape: LLaMA-Adapter on the bench shape's layers (7B: the top 30 of 32) or its default for the depth."""
    from model.methods import LlamaAdapterConfig, method_class
    from model.methods.llama_adapter import default_config_for

    cls = method_class(setup.method)  # ValueError naming the registered methods
    config = cls.config_class()
    if type(config) is LlamaAdapterConfig:
        top = SHAPES[setup.shape].adapter_layers if setup.shape in SHAPES else default_config_for(llama).n_layers
        return dataclasses.replace(config, n_layers=top)
    if isinstance(config, LlamaAdapterConfig) and config.n_layers >= llama.n_layers:  # V2: all but the bottom layer
        config = dataclasses.replace(config, n_layers=max(llama.n_layers - 1, 1))
    return config


def build_model(setup: Setup, device: torch.device | str = "meta") -> Transformer:
    """The set-up's model: on the meta device shapes only; elsewhere random weights in ``setup.dtype`` (fp32
    adapter), quantized as asked."""
    device = torch.device(device)
    llama, dtype = setup.llama, getattr(torch, setup.dtype)
    config = ModelConfig(llama=llama, method=method_config(setup, llama))
    visual = None
    if setup.images:
        from model.visual import build_visual  # imported on use: open_clip

        with torch.device("meta") if device.type == "meta" else torch.device("cpu"):
            visual = build_visual(VisualConfig(clip_model=setup.clip), llama.dim, random_clip=True)
        visual = visual.to(device)
        visual.clip.to(dtype)
    with torch.device("meta"):
        model = Transformer(config, visual=visual)
    if device.type != "meta":
        from model.checkpoint import check_materialized, init_fresh_adapter, init_random_base

        init_random_base(model, seed=0, dtype=dtype, device=device)
        init_fresh_adapter(model, seed=0, device=device)
        check_materialized(model)
        if setup.quantize != "none":
            from model.quantize import quantize_base

            quantize_base(model, setup.quantize)
    return model


@functools.lru_cache(maxsize=16)
def meta_model(shape: str, method: str, images: bool, clip: str) -> Transformer:
    """The meta-device model of a set-up (what the counts depend on), built once per process."""
    return build_model(Setup(shape=shape, method=method, images=images, clip=clip))

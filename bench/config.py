"""The settings of one ``python -m bench train|generate`` run, checked against the shape and the method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bench.lengths import ALPACA_EXAMPLES, ALPACA_MAX, DISTRIBUTIONS
from bench.measure import DTYPES
from bench.methods import METHODS, virtual_tokens
from bench.shapes import get_shape


@dataclass
class BenchConfig:
    """One benchmark run, fully resolved (no None left except the optional overrides)."""

    task: Literal["train", "generate"]
    shape: str
    device: str
    dtype: str
    batches: list[int]
    """train: exactly one batch size; generate: one measurement per batch size."""
    seq: int
    """train: sequence length; generate: prompt length."""
    new_tokens: int
    steps: int
    warmup: int
    threads: int
    seed: int = 0
    rounds: int = 1
    """Runs of both sides, alternating which goes first; their timed steps are pooled (for busy machines)."""
    peak_tflops: float | None = None
    """Override of the device's dense peak TFLOP/s for MFU."""
    peak_bandwidth_gbs: float | None = None
    """Override of the device's memory bandwidth (GB/s) for decode bandwidth use."""
    workdir: str | None = None
    """Where the shared weights are written (kept); None: a temporary directory, removed afterwards."""
    method: str = "llama_adapter"
    """The PEFT method both sides load (bench/methods.py)."""
    compile: bool = False
    """Ours through torch.compile: train, its blocks (``Transformer.compile_blocks``); generate, the fixed-shape
    decode step (model.generate, compile=True)."""
    lengths: str | None = None
    """train: a realistic length distribution (bench/lengths.py: alpaca) instead of full rows of ``seq`` tokens;
    ``seq`` is then its longest example."""

    def __post_init__(self) -> None:
        shape = get_shape(self.shape)
        if self.lengths is not None:
            if self.task != "train" or self.lengths not in DISTRIBUTIONS:
                raise ValueError(f"--lengths takes {', '.join(DISTRIBUTIONS)} with train, got {self.lengths!r}")
            if self.seq != ALPACA_MAX or self.steps * self.batches[0] > ALPACA_EXAMPLES:
                raise ValueError(
                    f"--lengths {self.lengths}: seq must be {ALPACA_MAX} and steps x batch at most "
                    f"{ALPACA_EXAMPLES:,}, got seq {self.seq}, {self.steps} x {self.batches[0]}"
                )
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task == "train" and virtual_tokens(self.method):
            raise ValueError(
                f"train --method {self.method}: PEFT cannot load a saved prompt-learning adapter as trainable "
                "(PeftModel.from_pretrained refuses); use generate, or --method llama_adapter | lora | dora | ia3"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"--batch must be positive integers, got {self.batches}")
        if self.task == "train" and len(self.batches) != 1:
            raise ValueError(f"train takes one --batch, got {self.batches}")
        for name in ("seq", "new_tokens", "steps", "warmup", "threads", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.task == "train" and self.seq < 2:
            raise ValueError(f"--seq must be >= 2 for a next-token loss, got {self.seq}")
        extra = virtual_tokens(self.method)
        longest = self.seq + (self.new_tokens if self.task == "generate" else 0) + extra
        if longest > shape.llama.max_seq_len:
            terms = (
                f"--seq{' + --new-tokens' if self.task == 'generate' else ''}{f' + {extra} virtual' if extra else ''}"
            )
            raise ValueError(
                f"{self.task}: {longest} tokens ({terms}) "
                f"exceed max_seq_len={shape.llama.max_seq_len} of shape {self.shape}"
            )

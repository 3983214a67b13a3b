"""P-tuning: soft input tokens produced by a trainable prompt encoder (Liu et al. 2021, "GPT Understands, Too",
arXiv 2103.10385), as PEFT's ``PromptEncoder`` builds it.

P learned input vectors go through the encoder; its P outputs are the soft tokens, prepended like prompt tuning's
(model/methods/prompt.py: RoPE positions 0..P-1, before any left padding). Encoders (``PTuningConfig.encoder``):

- ``mlp``: Linear(dim, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, dim) on each input vector;
- ``lstm``: a 2-layer bidirectional LSTM of width h over the P inputs, then Linear(2h, 2h) -> ReLU -> Linear(2h, dim);
- ``none``: no encoder, the soft tokens themselves: what ``merge()`` and PEFT import leave.

Init as PEFT (PyTorch's defaults, drawn from the seed's generator on the CPU): inputs N(0, 1) like ``nn.Embedding``,
linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LSTM tensors U(-1/sqrt(h), 1/sqrt(h)). The model is
not the base model at init.

The encoder is for training only. ``merge()`` computes the soft tokens once, drops the encoder and its inputs and
switches the config to ``encoder="none"``: an adapter saved after it holds only the encoder's output, (P, dim),
as PEFT saves ``prompt_embeddings``. ``save_adapter`` always writes that form (``exported``); a run resumes
from the encoder's tensors in its state.pt.

With images: the visual tokens (B, Q, dim) are added to the soft tokens after the encoder, Q = 1 or P (so it works
the same before and after ``merge()``); text-only items (zero rows) add nothing.

Tensors: ``method.adapter_encoder_input`` (P, dim), ``method.adapter_lstm.*``, ``method.adapter_mlp.*``; after
``merge()``: ``method.adapter_soft_tokens`` (P, dim).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from model.methods.base import Method, MethodConfig, check_tokens_fit, register_method
from model.methods.memory import MemoryTerms, StepShape
from model.methods.prompt import add_visual, check_soft_tokens, soft_tokens_from_peft, soft_tokens_to_peft

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import Transformer

LSTM_LAYERS = 2  # PEFT's encoder_num_layers default


@dataclass
class PTuningConfig(MethodConfig):
    """Soft input tokens from a prompt encoder (P-tuning, arXiv 2103.10385)."""

    n_tokens: int = 20
    """P: soft tokens before every sequence (they count in max_seq_len)."""
    encoder: Literal["mlp", "lstm", "none"] = "mlp"
    """The prompt encoder trained in front of the soft tokens; "none": the soft tokens alone (after merge())."""
    encoder_hidden: int = 256
    """h: the encoder's width (PEFT's default is the model width: ~50M values at 7B)."""

    def __post_init__(self) -> None:
        if self.n_tokens <= 0:
            raise ValueError(f"PTuningConfig.n_tokens must be positive, got {self.n_tokens}")
        if self.encoder not in ("mlp", "lstm", "none"):
            raise ValueError(f"PTuningConfig.encoder must be 'mlp', 'lstm' or 'none', got {self.encoder!r}")
        if self.encoder_hidden <= 0:
            raise ValueError(f"PTuningConfig.encoder_hidden must be positive, got {self.encoder_hidden}")

    def check(self, llama: LlamaConfig) -> None:
        """The soft tokens must leave room for tokens in max_seq_len."""
        check_soft_tokens("PTuningConfig", self.n_tokens, llama)

    def check_visual_tokens(self, n_tokens: int) -> None:
        check_tokens_fit(self, "n_tokens", n_tokens)


@register_method("ptuning")
class PTuning(Method):
    """``config.n_tokens`` soft tokens before every sequence, produced by a prompt encoder while training."""

    config: PTuningConfig
    config_class = PTuningConfig
    takes_visual = True
    peft_type = "P_TUNING"
    fold_refusal = "its soft tokens are extra input positions before every sequence"

    @property
    def n_soft_tokens(self) -> int:
        return self.config.n_tokens

    def attach(self, model: Transformer) -> None:
        P, dim, h, encoder = self.config.n_tokens, self.llama.dim, self.config.encoder_hidden, self.config.encoder
        if encoder == "none":
            self.adapter_soft_tokens = nn.Parameter(torch.empty(P, dim))  # (P, dim)
            return
        self.adapter_encoder_input = nn.Parameter(torch.empty(P, dim))  # (P, dim): PEFT's embedding
        if encoder == "lstm":
            self.adapter_lstm = nn.LSTM(dim, h, num_layers=LSTM_LAYERS, bidirectional=True, batch_first=True)
            widths = (2 * h, 2 * h, dim)
        else:
            widths = (dim, h, h, dim)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.adapter_mlp = nn.Sequential(*layers[:-1])  # PEFT's mlp_head: no ReLU after the last linear

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """PEFT's (PyTorch's default) init, see the module docstring; drawn in the order inputs, LSTM, MLP."""
        with torch.no_grad():
            if self.config.encoder == "none":
                self.adapter_soft_tokens.copy_(torch.randn(self.adapter_soft_tokens.shape, generator=generator))
                return
            self.adapter_encoder_input.copy_(torch.randn(self.adapter_encoder_input.shape, generator=generator))
            if self.config.encoder == "lstm":
                for p in self.adapter_lstm.parameters():
                    uniform_(p, 1 / math.sqrt(self.config.encoder_hidden), generator)
            for linear in self.adapter_mlp[::2]:  # the Linear layers, between the ReLUs
                for p in (linear.weight, linear.bias):
                    uniform_(p, 1 / math.sqrt(linear.in_features), generator)

    def encode(self) -> Tensor:
        """The soft tokens (P, dim): the encoder's output, or the stored ones with ``encoder="none"``."""
        if self.config.encoder == "none":
            return self.adapter_soft_tokens
        x = self.adapter_encoder_input[None]  # (1, P, dim)
        if self.config.encoder == "lstm":
            x = self.adapter_lstm(x)[0]  # (1, P, 2h)
        return self.adapter_mlp(x)[0]  # (P, dim)

    def soft_tokens(self, model: Transformer, visual: Tensor | None) -> Tensor:
        """(1, P, dim), or (B, P, dim) with the visual vector added to every soft token."""
        return add_visual(self.encode(), visual)

    def exported(self, model: Transformer) -> tuple[PTuningConfig, dict[str, Tensor]]:
        """The encoder's output as ``method.adapter_soft_tokens`` (the encoder is not saved), plus the other
        trainable tensors (the visual projection)."""
        if self.config.encoder == "none":
            return super().exported(model)
        tensors = {n: t for n, t in model.adapter_state_dict().items() if not n.startswith("method.")}
        tensors["method.adapter_soft_tokens"] = self.encode()
        return dataclasses.replace(self.config, encoder="none"), tensors

    def merge(self, model: Transformer) -> None:
        """Keep only the encoder's output: the soft tokens become the trainable tensor, the encoder is dropped and
        the config (``model.config.method``, what save_adapter records) says ``encoder="none"``."""
        if self.config.encoder == "none":
            return
        with torch.no_grad():
            soft = self.encode().clone()  # (P, dim)
        del self.adapter_encoder_input, self.adapter_mlp
        if self.config.encoder == "lstm":
            del self.adapter_lstm
        self.adapter_soft_tokens = nn.Parameter(soft)
        self.config = dataclasses.replace(self.config, encoder="none")
        model.config = dataclasses.replace(model.config, method=self.config)  # not in place: configs may be shared

    @classmethod
    def from_peft(
        cls, peft_config: dict[str, Any], state: dict[str, Tensor], llama: LlamaConfig, source: Path
    ) -> tuple[PTuningConfig, dict[str, Tensor]]:
        """PEFT's P_TUNING saves the encoder's output as ``prompt_embeddings`` (P, dim): our merged soft tokens."""
        n_tokens, tensors = soft_tokens_from_peft(peft_config, state, llama, source)
        return PTuningConfig(n_tokens=n_tokens, encoder="none"), tensors

    @classmethod
    def to_peft(
        cls, config: PTuningConfig, tensors: dict[str, Tensor], llama: LlamaConfig
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """PEFT's P_TUNING: the encoder's output (our soft tokens) as ``prompt_embeddings``, which PEFT uses in
        inference mode; the encoder fields describe the MLP encoder PEFT builds beside it (unused when loaded)."""
        fields, state = soft_tokens_to_peft(config.n_tokens, tensors, llama, "P-tuning")
        encoder = {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": config.encoder_hidden,
                   "encoder_num_layers": LSTM_LAYERS, "encoder_dropout": 0.0}  # fmt: skip
        return fields | encoder, state

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # Soft tokens from the embeddings up: every layer in full, over T + P positions, nothing of its own.
        return MemoryTerms()

    def describe(self) -> str:
        c = self.config
        if c.encoder == "none":
            return f"{c.n_tokens} soft input tokens (a prompt encoder's output)"
        return f"{c.n_tokens} soft input tokens from an {c.encoder.upper()} prompt encoder of width {c.encoder_hidden}"

    def group(self, name: str) -> str:
        part = next(p for p in name.split(".") if p.startswith("adapter_"))
        return {"adapter_soft_tokens": "soft tokens", "adapter_encoder_input": "encoder inputs"}.get(part, "encoder")


def uniform_(p: Tensor, bound: float, generator: torch.Generator | None) -> None:
    """Fill ``p`` with U(-bound, bound) drawn on the CPU from ``generator``."""
    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))

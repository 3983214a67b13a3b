"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353), LoRA's update with a learned
magnitude per output row.

Each target linear W (out, in) of the adapted layers becomes

    W' = m * (W + s B A) / ||W + s B A||_row,   s = alpha / rank   (alpha / sqrt(rank) with ``rslora``)

where ||.||_row is the L2 norm of each output row (over the input features: one value per output, the paper's
"column-wise" norm of W^T), and m (out,) is trained, initialised to ||W||_row: with B = 0 the factor m / ||W|| is
exactly 1 and the model is exactly the base at init. A and B, their init and the wrapped linear are LoRA's
(model/methods/lora.py's LoraLinear, subclassed here); ``merge()`` writes W' into the frozen weight.

Provenance: installed PEFT 0.21 (``peft/tuners/lora/dora.py`` DoraLinearLayer, ``variants.py`` DoraLinearVariant),
followed in every point that changes an output or a gradient:
- the norm is over ``dim=1`` of the (out, in) weight (``fan_in_fan_out`` transposes first; we refuse that setting:
  LLaMA's linears are plain nn.Linear) and is detached, so no gradient flows through it (the paper's Sec. 4.3),
  B A inside it detached too; m and the update get their gradients through m / ||.|| times the output;
- dropout: without it (or in eval mode) y = (m / n) (W x + s B A x); with it in training PEFT keeps the frozen path
  on the plain input and rescales the dropped one: y = W x + (m / n - 1) W x_d + (m / n) s B A x_d, x_d = dropout(x).
Differences from PEFT: the norm is computed in fp32 outside autocast (PEFT: in the input's dtype), which only
matters for 16-bit bases; a row whose norm is zero gives factor 0 instead of NaN. On a quantized base (QDoRA) the
norm is of the dequantized weight, as PEFT does it.

Cost: the row norms need W + s B A, an (out, in) sum, in every forward; for inference ``merge()`` folds it away.

With images: the gated visual prompt of model/methods/visual_prompt.py, as LoRA has it.

Tensor names: LoRA's ``adapter_lora_a`` / ``adapter_lora_b`` plus ``layers.N.attention.wq.adapter_dora_magnitude``
(out,).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.methods.base import register_method
from model.methods.lora import Lora, LoraConfig, LoraLinear, check_mergeable
from model.methods.memory import MemoryTerms, StepShape, block_linear_shapes
from model.quantize import dequantized

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import Transformer


@dataclass
class DoraConfig(LoraConfig):
    """DoRA (arXiv 2402.09353): LoRA's update, each output row of W + (alpha / rank) B A then rescaled to a learned
    magnitude (initialised to the row norms of W: exactly the base model at init). Fields as LoRA's."""


class DoraLinear(LoraLinear):
    """LoraLinear whose output rows are rescaled to the learned magnitude ``adapter_dora_magnitude`` (out,)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float) -> None:
        super().__init__(base, rank, scale, dropout)
        self.adapter_dora_magnitude = nn.Parameter(torch.empty(base.out_features))  # (out,)

    def weight_norm(self) -> Tensor:
        """||W + s B A|| of each output row (out,), fp32, outside the autograd graph (PEFT detaches it)."""
        with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
            combined = dequantized(self.weight, torch.float32) + self.delta().float()  # (out, in)
            return torch.linalg.vector_norm(combined, dim=1)

    def factor(self) -> Tensor:
        """m / ||W + s B A||_row (out,): 1 exactly while m holds the norms themselves (init, after merge)."""
        norm = self.weight_norm()
        return self.adapter_dora_magnitude / torch.where(norm > 0, norm, torch.inf)  # a zero row: factor 0, not NaN

    def forward(self, x: Tensor) -> Tensor:
        factor = self.factor().to(x.dtype)  # (out,)
        if self.training and self.dropout.p > 0:  # PEFT: the frozen path on x, the rescaled ones on dropout(x)
            dropped = self.dropout(x)
            base, base_dropped = F.linear(x, self.weight), F.linear(dropped, self.weight)
            return base + (factor - 1) * base_dropped + factor * self.update(dropped).to(x.dtype)
        return factor * (F.linear(x, self.weight) + self.update(x).to(x.dtype))

    def reset_magnitude(self) -> None:
        """m = ||W + s B A||_row: the factor is exactly 1 (at init, B = 0: the frozen weight's own norms)."""
        with torch.no_grad():
            self.adapter_dora_magnitude.copy_(self.weight_norm())

    def merge(self) -> None:
        """W = (m / n) (W + s B A), then B = 0 and m = the new W's row norms: the same outputs from W alone."""
        check_mergeable("DoRA", self.weight)
        with torch.no_grad():
            merged = self.factor()[:, None] * (self.weight.float() + self.delta())  # (out, in), fp32
            self.weight.copy_(merged.to(self.weight.dtype))
            self.adapter_lora_b.zero_()
            self.reset_magnitude()


@register_method("dora")
class Dora(Lora):
    """LoRA's updates on ``config.targets`` of the top ``config.n_layers`` layers, each with a learned magnitude."""

    config: DoraConfig
    config_class = DoraConfig
    linear_class = DoraLinear
    label = "DoRA"
    peft_kinds = ("A.weight", "B.weight", "magnitude_vector")

    @classmethod
    def imports_peft(cls, peft_config: dict[str, Any]) -> bool:
        """PEFT's LORA with ``use_dora: true`` (read by ``Lora.from_peft``: ``lora_magnitude_vector`` becomes
        ``adapter_dora_magnitude``, its q_proj / k_proj values un-permuted like lora_B's rows)."""
        return peft_config.get("peft_type") == cls.peft_type and bool(peft_config.get("use_dora"))

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """LoRA's A and B (B = 0), then m = the frozen weight's row norms: exactly the base model. Needs the base
        weights loaded (load_model calls it after loading them)."""
        super().reset_parameters(model, generator)
        for linear in self.adapted(model):
            linear.reset_magnitude()

    @classmethod
    def to_peft(
        cls, config: LoraConfig, tensors: dict[str, Tensor], llama: LlamaConfig
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """PEFT's LORA with ``use_dora`` (inverse of the import): LoRA's tensors plus ``lora_magnitude_vector`` per
        linear, its q_proj / k_proj values in HF's rotate-half row order like lora_B's rows."""
        from model.checkpoint.hf import meta_rows_to_hf, meta_to_hf_name, rope_permuted_heads

        magnitudes = {n: t for n, t in tensors.items() if n.endswith(".adapter_dora_magnitude")}
        fields, state = super().to_peft(config, {n: t for n, t in tensors.items() if n not in magnitudes}, llama)
        for name, magnitude in magnitudes.items():
            weight = name.removesuffix("adapter_dora_magnitude") + "weight"  # layers.N.attention.wq.weight
            heads = rope_permuted_heads(weight, llama)
            value = meta_rows_to_hf(magnitude[:, None], heads)[:, 0] if heads else magnitude  # (out,)
            state[f"base_model.model.{meta_to_hf_name(weight).removesuffix('.weight')}.lora_magnitude_vector"] = value
        return fields | {"use_dora": True}, state

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # The magnitude's factor times (W x + s B A x): that sum per position, and per layer the fp32 row norm the
        # factor divides by and the factor in the compute dtype (the row norms are taken without grad). The row norms
        # of W + s B A, one target linear at a time: the fp32 update and the fp32 sum, and an fp32 copy of W unless
        # W is fp32 already.
        lora, e = super().memory_terms(step), step.dtype_bytes
        shapes = {t: s for t, s in block_linear_shapes(self.llama).items() if t in self.config.targets}
        outputs = sum(o for o, i in shapes.values())
        copies = 2 if e == 4 and not step.quantized else 3
        return dataclasses.replace(
            lora,
            per_position=lora.per_position + e * outputs,
            per_layer=lora.per_layer + (4 + e) * outputs,
            workspace=copies * 4 * max(o * i for o, i in shapes.values()),
        )

    def group(self, name: str) -> str:
        return "dora magnitude" if name.endswith(".adapter_dora_magnitude") else super().group(name)

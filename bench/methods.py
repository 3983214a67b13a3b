"""The PEFT methods the bench compares (``--method``): PEFT's config of each, its non-zero weights, its accounting.

Every method is built by PEFT on the shared base and saved as a PEFT directory; ours imports it through the
method's ``from_peft`` (``model.load_model(base, adapter=peft_dir)``), PEFT loads it with ``PeftModel``. Parts
PEFT initialises to zero (adaption-prompt gates, LoRA's B) are drawn away from zero so that the adapter changes
the outputs and the greedy-agreement check means something.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bench.shapes import BenchShape

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

METHODS = ("llama_adapter", "lora", "dora", "ia3", "prefix", "ptuning_v2", "prompt", "ptuning")
"""``--method`` choices, named as ``train.py --method`` names them."""

GATE_RANGE = (0.05, 0.25)  # PEFT gates (raw, one per layer) drawn uniformly from here: a clearly non-zero adapter
LORA_B_STD = 0.1  # LoRA's B (zero at init) drawn from N(0, LORA_B_STD^2): a clearly non-zero update
IA3_RANGE = (0.5, 1.5)  # (IA)^3 vectors (ones at init) drawn uniformly from here
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ["q_proj", "v_proj"]
PREFIX_TOKENS = 10
PREFIX_MLP_HIDDEN = 128  # PEFT's prefix projection width for prefix (ours' default; PEFT's own is the model width)
SOFT_TOKENS = 20  # prompt tuning and p-tuning


def virtual_tokens(method: str) -> int:
    """Positions the method puts ahead of the prompt: soft input tokens (prompt, ptuning) or prefix K/V (prefix)."""
    return {"prefix": PREFIX_TOKENS, "ptuning_v2": PREFIX_TOKENS, "prompt": SOFT_TOKENS, "ptuning": SOFT_TOKENS}.get(
        method, 0
    )


def peft_config(method: str, shape: BenchShape) -> PeftConfig:
    """PEFT's config of ``method`` on ``shape`` (the adapter both sides load)."""
    from peft import (
        AdaptionPromptConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
    )

    if method == "llama_adapter":
        return AdaptionPromptConfig(
            adapter_len=shape.adapter_len, adapter_layers=shape.adapter_layers, task_type="CAUSAL_LM"
        )
    if method in ("lora", "dora"):
        return LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, use_dora=method == "dora",
            task_type="CAUSAL_LM",
        )  # fmt: skip
    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM")  # PEFT's LLaMA default: k_proj, v_proj, down_proj (its input)
    if method == "prefix":  # PEFT runs its projection MLP at every forward; ours imports the prefixes it saves
        return PrefixTuningConfig(
            num_virtual_tokens=PREFIX_TOKENS,
            prefix_projection=True,
            encoder_hidden_size=PREFIX_MLP_HIDDEN,
            task_type="CAUSAL_LM",
        )
    if method == "ptuning_v2":  # PEFT's prefix tuning without projection: P-tuning v2 (model/methods/ptuning_v2.py)
        return PrefixTuningConfig(num_virtual_tokens=PREFIX_TOKENS, prefix_projection=False, task_type="CAUSAL_LM")
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=SOFT_TOKENS, task_type="CAUSAL_LM")
    if method == "ptuning":
        return PromptEncoderConfig(
            num_virtual_tokens=SOFT_TOKENS, encoder_reparameterization_type="MLP", task_type="CAUSAL_LM"
        )
    raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")


def perturb_zero_init(peft_model: PeftModel, seed: int) -> None:
    """Draw PEFT's identity-initialised tensors away from it: adaption-prompt gates, LoRA's (and DoRA's) B, the
    (IA)^3 vectors (others are random)."""
    gen = torch.Generator().manual_seed(seed)
    low, high = GATE_RANGE
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(low + (high - low) * torch.rand((), generator=gen).item())
            elif ".lora_B." in name:
                p.copy_(LORA_B_STD * torch.randn(p.shape, generator=gen))
            elif ".ia3_l." in name:
                p.uniform_(*IA3_RANGE, generator=gen)


@dataclass(frozen=True)
class Accounting:
    """What bench/measure.py's FLOP and byte counts are given for a method (recorded in the report config)."""

    adapter_layers: int
    """``adapter_layers`` of train_step_flops / decode_bytes_per_step (backward runs from the lowest one up)."""
    adapter_len: int
    """``adapter_len``: adaption prompts per adapted layer (0: no adapter attention counted)."""
    train_extra_tokens: int
    """Positions added to the training sequence (soft input tokens run through every block)."""
    cache_extra_tokens: int
    """Positions added to the decode context (soft tokens or prefixes in the KV cache)."""
    note: str


def accounting(method: str, shape: BenchShape) -> Accounting:
    """Exact for llama_adapter; the frozen base (backward through every block) for the others."""
    if method == "llama_adapter":
        note = "exact: frozen base plus adaption-prompt attention and prompt K/V projections of the adapted layers"
        return Accounting(shape.adapter_layers, shape.adapter_len, 0, 0, note)
    soft = virtual_tokens(method)
    note = "frozen base, backward through every block; the method's own FLOPs and weights not counted"
    if method in ("prefix", "ptuning_v2"):
        return Accounting(shape.llama.n_layers, 0, 0, soft, f"{note}; {soft} prefix positions in the decode context")
    if soft:
        note = f"{note}; {soft} soft tokens counted as extra positions in training and in the decode context"
    return Accounting(shape.llama.n_layers, 0, soft, soft, note)

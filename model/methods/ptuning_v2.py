"""P-tuning v2 (Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales
and Tasks", ACL 2022, arXiv 2110.07602): deep prompt tuning, trainable key / value prefixes at every layer of the
model, trained directly; their reparameterisation (prefix tuning's MLP) is optional and off by default.

The computation is prefix tuning's (model/methods/prefix.py), whose inference form it trains from the start: per
layer, P key and value vectors joined to the tokens' keys / values in the same softmax, the tokens' RoPE positions
starting at P, the image added to the prefixes through each layer's frozen wk / wv. ``reparameterize=True`` trains
them through prefix tuning's MLP instead (THUDM/P-tuning-v2's ``prefix_projection``). So this module is that
method's config with P-tuning v2's default, registered under its own name.

PEFT has no P-tuning v2 type, but its PREFIX_TUNING with ``prefix_projection=False`` (PEFT's default) is the same
computation: such a PEFT directory imports as ``ptuning_v2`` (``imports_peft``), one with ``prefix_projection=True``
as ``prefix``. Init as PEFT's without the projection: every prefix N(0, 1), like its ``nn.Embedding``.

Differences from the paper: their classification heads (a linear head on [CLS] instead of verbalizers) belong to
encoder models and have no place in a generating LLaMA; prefixes start at every layer (``n_layers`` can restrict
them to the top layers, which the paper ablates).

Tensors: ``layers.N.attention.adapter_prefix_key`` / ``adapter_prefix_value`` (P, kv_dim) each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.methods.base import register_method
from model.methods.prefix import PrefixConfig, PrefixTuning


@dataclass
class PTuningV2Config(PrefixConfig):
    """Deep prompt tuning (P-tuning v2, arXiv 2110.07602): key/value prefixes in every layer, trained directly."""

    reparameterize: bool = False
    """False (P-tuning v2's default): the prefixes themselves train; True: through prefix tuning's MLP of width
    mlp_hidden (their optional reparameterisation)."""


@register_method("ptuning_v2")
class PTuningV2(PrefixTuning):
    """Prefix tuning's computation with P-tuning v2's default: the per-layer prefixes trained directly."""

    config: PTuningV2Config
    config_class = PTuningV2Config

    @classmethod
    def imports_peft(cls, peft_config: dict[str, Any]) -> bool:
        """PEFT's PREFIX_TUNING without its projection (PEFT's default)."""
        return peft_config.get("peft_type") == cls.peft_type and peft_config.get("prefix_projection", False) is False

    def describe(self) -> str:
        c, n = self.config, self.llama.n_layers
        how = f"through an MLP of width {c.mlp_hidden}" if c.reparameterize else "trained directly"
        return f"P-tuning v2: key/value prefixes P={c.prefix_len} in the top {c.n_layers or n} of {n} layers, {how}"

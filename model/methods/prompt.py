"""Prompt tuning: P trainable soft input tokens before every sequence (Lester et al. 2021, arXiv 2104.08691).

The soft tokens are vectors in the embedding space, prepended to the token embeddings at RoPE positions 0..P-1 (the
backbone's ``Method.soft_tokens`` contract, PEFT's layout: soft tokens before any left padding); nothing else in
the model changes. The model is not the base model at init: the soft tokens are seen by every later token.

Init (``PromptConfig.init``, PEFT's ``prompt_tuning_init``): ``random`` N(0, 1) like PEFT's ``nn.Embedding``;
``vocab`` the embedding rows of P token ids drawn uniformly from the whole vocabulary (PEFT's ``SAMPLE_VOCAB``);
``text`` the embeddings of ``init_text``'s tokens (no BOS), repeated / cut to P as PEFT does. Random draws come
from the seed's generator (``load_model(..., seed=)``), so a seed gives the same soft tokens on every device.

With images: the visual tokens (B, Q, dim) are added to the soft tokens (as LLaMA-Adapter adds them to its prompts:
Q = 1 to every one, Q = P token i to soft token i);
text-only items (zero rows) add nothing, so P stays fixed and a batch mixes both.

Tensor: ``method.adapter_soft_tokens`` (P, dim), the same values PEFT saves as ``prompt_embeddings``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from model.methods.base import Method, MethodConfig, check_tokens_fit, register_method
from model.methods.memory import MemoryTerms, StepShape

if TYPE_CHECKING:
    from model.config import LlamaConfig
    from model.llama import Transformer


@dataclass
class PromptConfig(MethodConfig):
    """Soft input tokens trained directly (prompt tuning, arXiv 2104.08691)."""

    n_tokens: int = 20
    """P: soft tokens before every sequence (they count in max_seq_len)."""
    init: Literal["random", "vocab", "text"] = "vocab"
    """Start values: random N(0, 1), embeddings of P tokens sampled from the vocabulary, or of init_text's tokens
    (vocabulary samples beat random init in the paper, Fig. 3b; PEFT's default is random)."""
    init_text: str = ""
    """The text whose token embeddings start the soft tokens (init="text" only), repeated or cut to n_tokens."""

    def __post_init__(self) -> None:
        if self.n_tokens <= 0:
            raise ValueError(f"PromptConfig.n_tokens must be positive, got {self.n_tokens}")
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"PromptConfig.init must be 'random', 'vocab' or 'text', got {self.init!r}")
        if (self.init == "text") != bool(self.init_text):
            raise ValueError(
                f"PromptConfig.init_text is used with init='text' and only then; got init={self.init!r}, "
                f"init_text={self.init_text!r}"
            )

    def check(self, llama: LlamaConfig) -> None:
        """The soft tokens must leave room for tokens in max_seq_len."""
        check_soft_tokens("PromptConfig", self.n_tokens, llama)

    def check_visual_tokens(self, n_tokens: int) -> None:
        check_tokens_fit(self, "n_tokens", n_tokens)


def check_soft_tokens(config_name: str, n_tokens: int, llama: LlamaConfig) -> None:
    """ValueError naming ``config_name``.n_tokens when P soft tokens leave no room for a token and an answer."""
    if n_tokens >= llama.max_seq_len - 1:
        raise ValueError(
            f"{config_name}.n_tokens={n_tokens} leaves no room for tokens in max_seq_len={llama.max_seq_len}"
        )


def soft_tokens_from_peft(
    peft_config: dict[str, Any], state: dict[str, Tensor], llama: LlamaConfig, source: Path
) -> tuple[int, dict[str, Tensor]]:
    """(P, our tensors) from a PEFT prompt-learning directory whose ``prompt_embeddings`` (P, dim) are the soft
    tokens (PROMPT_TUNING: the embedding; P_TUNING: the encoder's output). Other keys are passed through."""
    try:
        n_tokens = int(peft_config["num_virtual_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid num_virtual_tokens in the PEFT config ({e!r})") from e
    if peft_config.get("num_transformer_submodules", 1) not in (1, None):
        raise ValueError(
            f"num_transformer_submodules={peft_config['num_transformer_submodules']}; a causal LM has 1 (encoder-"
            "decoder adapters do not fit LLaMA)"
        )
    tensors = {k: v for k, v in state.items() if k != "prompt_embeddings"}
    if "prompt_embeddings" not in state:
        raise ValueError(f"{source}: no prompt_embeddings tensor (PEFT's soft tokens)")
    value = state["prompt_embeddings"]
    if tuple(value.shape) != (n_tokens, llama.dim):
        raise ValueError(
            f"{source}: prompt_embeddings has shape {tuple(value.shape)}; expected "
            f"(num_virtual_tokens={n_tokens}, dim={llama.dim})"
        )
    tensors["method.adapter_soft_tokens"] = value.float()
    return n_tokens, tensors


def soft_tokens_to_peft(
    n_tokens: int, tensors: dict[str, Tensor], llama: LlamaConfig, what: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Inverse of ``soft_tokens_from_peft``: PEFT's prompt-learning fields common to PROMPT_TUNING and P_TUNING and
    the soft tokens (P, dim) as ``prompt_embeddings``; ``what`` names the PEFT method in errors."""
    rest = dict(tensors)
    soft = rest.pop("method.adapter_soft_tokens")  # (P, dim)
    if rest:
        raise ValueError(f"tensors PEFT's {what} has no place for: {', '.join(sorted(rest))}")
    fields = {"num_virtual_tokens": n_tokens, "token_dim": llama.dim, "num_transformer_submodules": 1,
              "num_attention_heads": llama.n_heads, "num_layers": llama.n_layers}  # fmt: skip
    return fields, {"prompt_embeddings": soft}


def add_visual(soft: Tensor, visual: Tensor | None) -> Tensor:
    """Soft tokens (P, dim) -> (1, P, dim), or (B, P, dim) with the visual tokens (B, 1 or P, dim) added."""
    soft = soft[None]  # (1, P, dim)
    return soft if visual is None else soft + visual.to(soft.dtype)  # (B, P, dim)


@register_method("prompt")
class PromptTuning(Method):
    """``config.n_tokens`` soft tokens before every sequence, trained as they are."""

    config: PromptConfig
    config_class = PromptConfig
    takes_visual = True
    peft_type = "PROMPT_TUNING"
    fold_refusal = "its soft tokens are extra input positions before every sequence"

    @property
    def n_soft_tokens(self) -> int:
        return self.config.n_tokens

    def attach(self, model: Transformer) -> None:
        self.adapter_soft_tokens = nn.Parameter(torch.empty(self.config.n_tokens, self.llama.dim))  # (P, dim)

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """The soft tokens of ``config.init`` (module docstring); needs the model's embeddings, and for "text"
        its tokenizer (``model.tokenizer``)."""
        P, soft = self.config.n_tokens, self.adapter_soft_tokens
        if self.config.init == "random":
            values = torch.randn(soft.shape, generator=generator)
        else:
            if self.config.init == "vocab":
                ids = torch.randint(self.llama.vocab_size, (P,), generator=generator)
            else:
                ids = torch.tensor(text_token_ids(model, self.config.init_text, P))
            embeddings = model.tok_embeddings.weight
            values = embeddings.detach()[ids.to(embeddings.device)]  # (P, dim)
        with torch.no_grad():
            soft.copy_(values.float())

    def soft_tokens(self, model: Transformer, visual: Tensor | None) -> Tensor:
        """(1, P, dim), or (B, P, dim) with the visual vector added to every soft token."""
        return add_visual(self.adapter_soft_tokens, visual)

    @classmethod
    def from_peft(
        cls, peft_config: dict[str, Any], state: dict[str, Tensor], llama: LlamaConfig, source: Path
    ) -> tuple[PromptConfig, dict[str, Tensor]]:
        """PEFT's PROMPT_TUNING: ``prompt_embeddings`` (P, dim) are our soft tokens. Their init is not recorded
        (the values are PEFT's), so the config says "random"."""
        n_tokens, tensors = soft_tokens_from_peft(peft_config, state, llama, source)
        return PromptConfig(n_tokens=n_tokens, init="random"), tensors

    @classmethod
    def to_peft(
        cls, config: PromptConfig, tensors: dict[str, Tensor], llama: LlamaConfig
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """PEFT's PROMPT_TUNING: the soft tokens as ``prompt_embeddings``. The init is written as RANDOM whatever
        ours was: PEFT would otherwise load a tokenizer to re-draw values that the file's tensor then replaces."""
        fields, state = soft_tokens_to_peft(config.n_tokens, tensors, llama, "prompt tuning")
        return fields | {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None}, state

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        # Soft tokens from the embeddings up: every layer in full, over T + P positions, nothing of its own.
        return MemoryTerms()

    def describe(self) -> str:
        return f"{self.config.n_tokens} soft input tokens ({self.config.init} init)"

    def group(self, name: str) -> str:
        return "soft tokens" if name.endswith("adapter_soft_tokens") else super().group(name)


def text_token_ids(model: Transformer, text: str, n_tokens: int) -> list[int]:
    """``text``'s token ids (no BOS / EOS) repeated and cut to ``n_tokens`` (PEFT's TEXT init)."""
    if model.tokenizer is None:
        raise ValueError("PromptConfig.init='text' needs the model's tokenizer (a base directory with one)")
    ids = model.tokenizer.encode(text, bos=False, eos=False)
    if not ids:
        raise ValueError(f"PromptConfig.init_text={text!r} has no tokens")
    return (ids * math.ceil(n_tokens / len(ids)))[:n_tokens]

"""A merged Hugging Face checkpoint (``python -m model.export RUN --to hf DIR``): the base with the method folded in,
for ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``.

What the directory holds: ``config.json`` (LlamaForCausalLM; ``attention_bias`` / ``mlp_bias`` when the method gives
linears a bias), ``model.safetensors`` (every weight under transformers' names, q / k rows in its rotate-half order:
the HF reader's tables and permutation run backwards) and the tokenizer as transformers reads it
(``Tokenizer.hf_files``, its tokenizer_config.json with the chat template the run was trained with, if any; none
when the model has no tokenizer). The weights keep the base's dtype.

Which methods fold is each method's answer (``Method.folded_weights``): the base model alone, LoRA (merged),
LLaMA-Adapter V2's biases, scales, LoRA and norms (when its prompts add nothing); the others are refused saying
why. transformers' LLaMA has no image input: a model with a visual path is refused unless ``text_only``, which
writes what it computes for text-only input.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from model.checkpoint.files import atomic_write_files, check_output_dir
from model.checkpoint.hf import LAYER_LINEARS, meta_rows_to_hf, meta_to_hf_name, rope_permuted_heads
from model.llama import Transformer

HF_WEIGHTS = "model.safetensors"
_BIAS_FLAGS = {"attention": "attention_bias", "feed_forward": "mlp_bias"}
"""The sublayer of a biased linear -> the LlamaConfig flag that gives every linear of that sublayer a bias."""


def hf_state(model: Transformer, *, text_only: bool = False) -> tuple[dict[str, Tensor], dict[str, bool]]:
    """(transformers' state dict of the folded model, its ``attention_bias`` / ``mlp_bias`` flags). Changes
    ``model`` (the method is merged into it); ValueError for a method that cannot fold or an unwanted visual path."""
    if model.visual is not None and not text_only:
        raise ValueError(
            "the model has a visual path and transformers' LlamaForCausalLM has no image input: pass --text-only "
            "to export what it computes for text-only input"
        )
    with torch.no_grad():
        weights = model.method.folded_weights(model)
    llama = model.config.llama
    flags = {flag: False for flag in _BIAS_FLAGS.values()}
    for name in weights:
        if name.endswith(".bias"):
            linear = re.fullmatch(r"layers\.\d+\.(\w+\.\w+)\.bias", name)
            if linear is None or linear.group(1) not in LAYER_LINEARS:
                raise ValueError(f"{name}: transformers' LLaMA has biases on the linears of a layer only")
            flags[_BIAS_FLAGS[linear.group(1).split(".")[0]]] = True
    dtype = model.tok_embeddings.weight.dtype
    for i in range(llama.n_layers):  # a flag gives every linear of its sublayer a bias: zero where the method has none
        for linear in LAYER_LINEARS:
            if flags[_BIAS_FLAGS[linear.split(".")[0]]]:
                out_features = weights[f"layers.{i}.{linear}.weight"].shape[0]
                weights.setdefault(f"layers.{i}.{linear}.bias", torch.zeros(out_features, dtype=dtype))
    state: dict[str, Tensor] = {}
    stored: set[int] = set()
    for name, tensor in weights.items():
        hf_name = meta_to_hf_name(name)
        if hf_name is None:
            raise ValueError(f"{name}: not a tensor of transformers' LlamaForCausalLM")
        heads = rope_permuted_heads(name, llama)
        tensor = meta_rows_to_hf(tensor, heads) if heads else tensor
        if tensor.data_ptr() in stored:  # tied embeddings: safetensors stores no shared memory
            tensor = tensor.clone()
        stored.add(tensor.data_ptr())
        state[hf_name] = tensor.detach().to("cpu", dtype).contiguous()
    return state, flags


def hf_config(model: Transformer, flags: dict[str, bool]) -> dict[str, Any]:
    """config.json of the folded model (transformers' LlamaConfig fields)."""
    tokenizer = model.tokenizer
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id} if tokenizer is not None else {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **model.config.llama.to_hf_config(),
        "hidden_act": "silu",
        **flags,
        "tie_word_embeddings": False,
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        **ids,
    }


def write_hf(model: Transformer, out_dir: str | Path, *, text_only: bool = False) -> Path:
    """The folded model as a Hugging Face directory (module docstring); returns it. Changes ``model`` (merged).
    Raises ValueError for what cannot fold, CheckpointError for an output directory holding other files, WriteError
    for a failed write (every file or none)."""
    out_dir = Path(out_dir)
    tokenizer_files = model.tokenizer.hf_files() if model.tokenizer is not None else {}
    if model.chat_template is not None and "tokenizer_config.json" in tokenizer_files:  # served as it was trained
        config = json.loads(tokenizer_files["tokenizer_config.json"])
        config["chat_template"] = model.chat_template.source
        tokenizer_files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    check_output_dir(out_dir, ["config.json", HF_WEIGHTS, *tokenizer_files])
    state, flags = hf_state(model, text_only=text_only)
    config = json.dumps(hf_config(model, flags), indent=2) + "\n"
    writes = {
        out_dir / "config.json": lambda tmp: tmp.write_text(config),
        out_dir / HF_WEIGHTS: lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
    }
    for name, content in tokenizer_files.items():
        writes[out_dir / name] = lambda tmp, content=content: tmp.write_bytes(content)
    atomic_write_files(writes)
    return out_dir

"""The official LLaMA-Adapter V2 multimodal release files (BIAS-7B, LORA-BIAS-7B, CAPTION-7B, LORA-BIAS-7B-v21), read
as our ``llama_adapter_v2`` + ``query`` visual path, and our V2 adapters written back in that format.

The container (facts in shared/reference/v2_multimodal_release.md): a ``torch.save``d dict ``{'model': {name:
tensor}, 'config': {'w_bias', 'w_lora', 'lora_rank'}}``, ``config`` possibly absent (CAPTION-7B), tensors fp16 or
fp32. Names and what they become here:

    visual_query / clip_proj(_norm) / visual_blocks.* / visual_proj(_norm)  visual.adapter_query.<same name>
    adapter_query.weight (L*K, dim), row block j -> layer n - L + j        layers.N.attention.adapter_prompt (K, dim)
    llama.layers.N.attention.gate (1, H, 1, 1)                               layers.N.attention.adapter_gate (H,)
    llama.layers.N.attention.new_gate (1, 1, 1, 1)                           layers.N.attention.adapter_new_gate (1,)
    llama.layers.N.{attention.wq|attention.wo|feed_forward.w1|w2|w3}.bias    layers.N.<same>.adapter_bias
    llama.layers.N.{attention_norm|ffn_norm}.weight, llama.norm.weight       <same>.adapter_norm_weight
    llama.layers.N.attention.lora_w<t>_l1 / _l2 .weight (and feed_forward.)  layers.N.<owner>.w<t>.adapter_lora_a / _b

What the official loader does with absent keys (``strict=False``: they keep their init) is reproduced where it is a
value: absent biases are 0, absent new gates 1; the gates of layers without prompts (layer 0) are never used and are
ignored. Absent norms (CAPTION-7B: none at all) leave the base's norms untouched (``norm_tuning="none"``). A group
present in part only (some norms, some LoRA tensors) is refused: that is a damaged file, not a release.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoint.adapter import AdapterWeights
from model.checkpoint.files import CheckpointError, atomic_write
from model.checkpoint.keys import check_adapter_values, listing
from model.config import LlamaConfig, VisualConfig
from model.llama import Transformer
from model.methods.base import LINEAR_SUBLAYER
from model.methods.llama_adapter_v2 import AdapterV2Config

RELEASE_BIASES = ("wq", "wo", "w1", "w2", "w3")
"""The linears the release model gives a bias (phase finetune, every file)."""
RELEASE_QUERY_HEADS = 16
"""Heads of the release's query blocks: fixed by its code (v_num_heads=16), not stored in the file."""
VISUAL_PREFIX = "visual.adapter_query."
_VISUAL_KEY = re.compile(r"(clip_proj|clip_proj_norm|visual_query|visual_blocks\.\d+\.\S+|visual_proj|visual_proj_norm)"
                         r"(\.\S+)?")  # fmt: skip
_LAYER_KEY = re.compile(r"llama\.layers\.(\d+)\.(.+)")
_LORA_KEY = re.compile(r"(attention|feed_forward)\.lora_(w[qkvo123])_l([12])\.weight")


def is_release_v2(obj: Any) -> bool:
    """Whether a loaded ``.pth`` object is the V2 release container (not V1's flat state dict)."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and set(obj) <= {"model", "config"}


def _release_config(path: Path, raw: Any) -> tuple[bool, int | None]:
    """(w_lora, lora_rank) from the file's ``config`` (None: not stated), every value checked."""
    if raw is None:
        return False, None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: 'config' must be a dict, got {type(raw).__name__}")
    for key in ("w_bias", "w_lora"):
        if key in raw and not isinstance(raw[key], bool):
            raise CheckpointError(f"{path}: config {key} must be True or False, got {raw[key]!r}")
    rank = raw.get("lora_rank", 16)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= 2**14:
        raise CheckpointError(f"{path}: config lora_rank must be an integer in 1..16384, got {rank!r}")
    return bool(raw.get("w_lora", False)), rank


def _visual_config(path: Path, visual: dict[str, Tensor]) -> VisualConfig:
    query = visual.get("visual_query.weight")
    if query is None or query.ndim != 2:
        raise CheckpointError(f"{path}: no visual_query.weight (Q, width); not a LLaMA-Adapter V2 multimodal file")
    blocks = {int(k.split(".")[1]) for k in visual if k.startswith("visual_blocks.")}
    fc1 = visual.get("visual_blocks.0.mlp.fc1.weight")
    if blocks != set(range(len(blocks))) or (blocks and fc1 is None):
        raise CheckpointError(f"{path}: visual_blocks are numbered {sorted(blocks)[:8]}; expected 0..N-1")
    width = query.shape[1]
    try:
        return VisualConfig(
            clip_model="openai", kind="query", query_len=query.shape[0], query_width=width,
            query_blocks=len(blocks), query_heads=RELEASE_QUERY_HEADS,
            query_mlp_ratio=fc1.shape[0] / width if fc1 is not None else 4.0, channel_order="bgr",
        )  # fmt: skip
    except ValueError as e:
        raise CheckpointError(f"{path}: the visual tensors make no valid query path: {e}") from None


def read_release_v2(path: str | Path, llama: LlamaConfig, obj: dict[str, Any]) -> AdapterWeights:
    """The loaded release container ``obj`` of ``path`` as our tensors, V2 config and query visual config."""
    path = Path(path)
    state, (w_lora, rank) = obj["model"], _release_config(path, obj.get("config"))
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    bad += [k for k, v in state.items() if isinstance(v, Tensor) and not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{path}: model entry {bad[0]!r} is not a floating-point tensor")
    check_adapter_values(state, path)
    state = {k: v.float() for k, v in state.items()}
    visual = {k: v for k, v in state.items() if _VISUAL_KEY.fullmatch(k)}
    visual_cfg = _visual_config(path, visual)
    K = visual_cfg.query_len
    prompts = state.get("adapter_query.weight")
    if prompts is None or prompts.ndim != 2 or prompts.shape[1] != llama.dim or prompts.shape[0] % K:
        shape = None if prompts is None else tuple(prompts.shape)
        raise CheckpointError(f"{path}: adapter_query.weight has shape {shape}; expected (L*{K}, {llama.dim})")
    n_adapted = prompts.shape[0] // K
    if not 0 < n_adapted <= llama.n_layers:
        raise CheckpointError(f"{path}: {n_adapted} adapted layers but the base has {llama.n_layers}")
    first = llama.n_layers - n_adapted
    tensors = {VISUAL_PREFIX + k: v for k, v in visual.items()}
    for j, block in enumerate(prompts.view(n_adapted, K, llama.dim)):  # row block j feeds layer first + j
        tensors[f"layers.{first + j}.attention.adapter_prompt"] = block.clone()

    layer_keys, unexpected = {}, []
    for key, value in state.items():
        m = _LAYER_KEY.fullmatch(key)
        if m and int(m.group(1)) < llama.n_layers:
            layer_keys[(int(m.group(1)), m.group(2))] = value
        elif key == "llama.norm.weight":
            layer_keys[(None, "norm.weight")] = value
        elif key not in visual and key != "adapter_query.weight":
            unexpected.append(key)
    lora_present = any(_LORA_KEY.fullmatch(name) for _, name in layer_keys)
    w_lora = w_lora or (obj.get("config") is None and lora_present)
    rank = rank or 16
    norm_names = [(i, f"{n}.weight") for i in range(llama.n_layers) for n in ("attention_norm", "ffn_norm")]
    norm_names.append((None, "norm.weight"))
    norms_present = [n for n in norm_names if n in layer_keys]
    if norms_present and len(norms_present) != len(norm_names):
        missing = [f"llama.{'' if i is None else f'layers.{i}.'}{n}" for i, n in norm_names if (i, n) not in layer_keys]
        raise CheckpointError(f"{path}: norms present for some layers only; missing {listing(missing)}")

    for i in range(llama.n_layers):
        prefix = f"layers.{i}."
        gate = layer_keys.pop((i, "attention.gate"), None)
        if i >= first:
            if gate is None or gate.numel() != llama.n_heads:
                raise CheckpointError(
                    f"{path}: llama.layers.{i}.attention.gate is {None if gate is None else tuple(gate.shape)}; "
                    f"expected (1, {llama.n_heads}, 1, 1)"
                )
            tensors[prefix + "attention.adapter_gate"] = gate.flatten().clone()
        new_gate = layer_keys.pop((i, "attention.new_gate"), None)
        if new_gate is not None and not w_lora:
            unexpected.append(f"llama.layers.{i}.attention.new_gate (config w_lora is False)")
        if w_lora and i >= first:
            value = torch.ones(1) if new_gate is None else new_gate.reshape(-1)
            tensors[prefix + "attention.adapter_new_gate"] = value
        for target in RELEASE_BIASES:
            name = f"{LINEAR_SUBLAYER[target]}.{target}"
            bias = layer_keys.pop((i, f"{name}.bias"), None)
            out = llama.ffn_dim if target in ("w1", "w3") else llama.dim
            tensors[f"{prefix}{name}.adapter_bias"] = torch.zeros(out) if bias is None else bias
        for norm in ("attention_norm", "ffn_norm"):
            weight = layer_keys.pop((i, f"{norm}.weight"), None)
            if weight is not None:
                tensors[f"{prefix}{norm}.adapter_norm_weight"] = weight
        for target in LINEAR_SUBLAYER:
            owner = LINEAR_SUBLAYER[target]
            pair = [layer_keys.pop((i, f"{owner}.lora_{target}_l{n}.weight"), None) for n in (1, 2)]
            if not w_lora:
                unexpected += [f"llama.layers.{i}.{owner}.lora_{target}_l{n}.weight" for n, t in zip((1, 2), pair) if
                               t is not None]  # fmt: skip
                continue
            if any(t is None for t in pair):
                raise CheckpointError(f"{path}: llama.layers.{i}.{owner}.lora_{target}_l1/_l2 missing (config w_lora)")
            if pair[0].ndim != 2 or pair[0].shape[0] != rank:  # before any tensor of that rank is allocated
                shape = tuple(pair[0].shape)
                raise CheckpointError(
                    f"{path}: llama.layers.{i}.{owner}.lora_{target}_l1.weight is {shape}; rank {rank}"
                )
            tensors[f"{prefix}{owner}.{target}.adapter_lora_a"], tensors[f"{prefix}{owner}.{target}.adapter_lora_b"] = (
                pair
            )
    final_norm = layer_keys.pop((None, "norm.weight"), None)
    if final_norm is not None:
        tensors["norm.adapter_norm_weight"] = final_norm
    unexpected += [f"llama.layers.{i}.{name}" for i, name in layer_keys]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys for a LLaMA-Adapter V2 release file: {listing(unexpected)}")
    method = AdapterV2Config(
        prompt_len=K, n_layers=n_adapted, gate_fn="tanh", bias_targets=RELEASE_BIASES, input_scales=False,
        lora_rank=rank if w_lora else 0, new_gate=w_lora, norm_tuning="weight" if norms_present else "none",
    )  # fmt: skip
    return AdapterWeights(tensors, method, visual_cfg, path)


def release_state(model: Transformer) -> dict[str, Any]:
    """Our V2 model as the release container: what the official ``llama.load`` reads (every tensor it holds,
    fp32). Refuses (ValueError) what the release model cannot express."""
    c, visual = model.config.method, model.config.visual
    if not isinstance(c, AdapterV2Config):
        raise ValueError(f"only llama_adapter_v2 adapters have the release format, not {model.method.name}")
    if visual is None or visual.kind != "query":
        raise ValueError("the release format needs the query visual path (VisualConfig.kind='query')")
    problems = [
        (visual.query_len != c.prompt_len, f"query_len {visual.query_len} != prompt_len {c.prompt_len}"),
        (c.gate_fn != "tanh", "gate_fn must be tanh"),
        (c.visual_entry != "late", "visual_entry must be late"),
        (visual.query_heads != RELEASE_QUERY_HEADS, f"query_heads must be {RELEASE_QUERY_HEADS}"),
        (not set(c.bias_targets) <= set(RELEASE_BIASES), f"bias_targets must be among {', '.join(RELEASE_BIASES)}"),
        (bool(c.lora_rank) and set(c.lora_targets) != set(LINEAR_SUBLAYER), "LoRA must target all seven linears"),
        (bool(c.lora_rank) != c.new_gate, "the release has new gates exactly when it has LoRA"),
    ]
    scales = [n for n, p in model.trainable_parameters() if n.endswith(".adapter_scale") and not torch.all(p == 1)]
    problems.append((bool(scales), f"input scales other than 1 ({listing(scales)}); the release has none"))
    refused = [text for bad, text in problems if bad]
    if refused:
        raise ValueError("cannot write the release format: " + "; ".join(refused))
    llama, params = model.config.llama, dict(model.named_parameters())
    first = llama.n_layers - c.n_layers
    out: dict[str, Tensor] = {}
    for name, p in params.items():
        if name.startswith(VISUAL_PREFIX):
            out[name[len(VISUAL_PREFIX) :]] = p
    out["adapter_query.weight"] = torch.cat([params[f"layers.{i}.attention.adapter_prompt"] for i in
                                             range(first, llama.n_layers)])  # fmt: skip
    for i in range(llama.n_layers):
        attention, src = f"llama.layers.{i}.attention.", f"layers.{i}."
        gate = params.get(f"{src}attention.adapter_gate")
        out[attention + "gate"] = (gate if gate is not None else torch.zeros(llama.n_heads)).view(1, -1, 1, 1)
        if c.new_gate:
            new_gate = params.get(f"{src}attention.adapter_new_gate")
            out[attention + "new_gate"] = (new_gate if new_gate is not None else torch.ones(1)).view(1, 1, 1, 1)
        for target in RELEASE_BIASES:
            name = f"{LINEAR_SUBLAYER[target]}.{target}"
            bias = params.get(f"{src}{name}.adapter_bias")
            out[f"llama.layers.{i}.{name}.bias"] = bias if bias is not None else torch.zeros(
                params[f"{src}{name}.weight"].shape[0])  # fmt: skip
            for n, ours in ((1, "a"), (2, "b")):
                lora = params.get(f"{src}{name}.adapter_lora_{ours}")
                if lora is not None:
                    out[f"llama.layers.{i}.{LINEAR_SUBLAYER[target]}.lora_{target}_l{n}.weight"] = lora
        for target in ("wk", "wv"):
            for n, ours in ((1, "a"), (2, "b")):
                lora = params.get(f"{src}attention.{target}.adapter_lora_{ours}")
                if lora is not None:
                    out[f"{attention}lora_{target}_l{n}.weight"] = lora
    norms = [f"layers.{i}.{n}" for i in range(llama.n_layers) for n in ("attention_norm", "ffn_norm")] + ["norm"]
    for norm in norms:
        if c.norm_tuning == "weight":
            weight = params[f"{norm}.adapter_norm_weight"]
        elif c.norm_tuning == "scale":
            weight = params[f"{norm}.weight"].float() * params[f"{norm}.adapter_norm_scale"]
        else:
            weight = params[f"{norm}.weight"]
        out[f"llama.{norm}.weight"] = weight
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in out.items()}
    return {"model": tensors, "config": {"w_bias": True, "w_lora": bool(c.lora_rank), "lora_rank": c.lora_rank or 16}}


def write_release_v2(model: Transformer, path: str | Path) -> Path:
    """``release_state(model)`` saved with torch.save to ``path`` (atomic); the official ``llama.load`` reads it."""
    path = Path(path)
    state = release_state(model)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path

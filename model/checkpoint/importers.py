"""Adapters from elsewhere as our trainable tensors: the official LLaMA-Adapter V1 release file and PEFT
adaption-prompt directories; ``open_adapter`` detects which format (ours included) a path holds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from model.checkpoint.adapter import ADAPTER_FILE, AdapterWeights, read_adapter
from model.checkpoint.files import CheckpointError, load_safetensors, read_json, torch_load, torch_load_object
from model.checkpoint.keys import check_adapter_values, listing
from model.checkpoint.release_v2 import is_release_v2, read_release_v2
from model.config import LlamaConfig
from model.methods import LlamaAdapterConfig, method_class, method_names


def read_official_v1(
    path: str | Path,
    llama: LlamaConfig,
    *,
    prompt_len: int = 10,
    gate_fn: Literal["tanh", "raw"] = "tanh",
    obj: Any = None,
) -> AdapterWeights:
    """The official LLaMA-Adapter V1 release file (``llama_adapter_len10_layer30_release.pth``) as our tensors.

    Layout: ``adapter_query.weight`` (L*K, dim), the prompts of the top L layers in order, and
    ``layers.N.attention.gate`` per layer, (1, n_heads, 1, 1) per head or (1,) one scalar (the first release, before
    commit fa65dbc) broadcast to every head. L = rows / K. Gates of the bottom, non-adapted layers are in the file
    too; they never trained, so they must be zero.

    gate_fn: the official training code scales by tanh(gate) while its released inference code (llama/model.py)
    multiplies by the raw gate (issue #39). We default to "tanh", the semantics the weights were trained under, and
    ``open_adapter`` / ``load_model`` read it so; "raw" reproduces the released inference code (build the model
    with the returned config and load these tensors). ``obj``: the file's content when already read.
    """
    path = Path(path)
    raw = torch_load(path, obj)
    check_adapter_values(raw, path)
    state = {k: v.float() for k, v in raw.items()}
    if "adapter_query.weight" not in state:
        raise CheckpointError(f"{path}: no 'adapter_query.weight'; not an official LLaMA-Adapter V1 file")
    query = state.pop("adapter_query.weight")
    rows = query.shape[0]
    if query.ndim != 2 or query.shape[1] != llama.dim or rows % prompt_len:
        raise CheckpointError(
            f"{path}: adapter_query.weight has shape {tuple(query.shape)}; expected (L*{prompt_len}, {llama.dim})"
        )
    n_adapted = rows // prompt_len
    if n_adapted > llama.n_layers:
        raise CheckpointError(f"{path}: {n_adapted} adapted layers but the base has only {llama.n_layers}")
    first = llama.n_layers - n_adapted
    prompts = query.view(n_adapted, prompt_len, llama.dim)  # (L, K, dim): slice i feeds layer first + i
    tensors = {f"layers.{first + i}.attention.adapter_prompt": prompts[i].clone() for i in range(n_adapted)}
    gate_key = re.compile(r"layers\.(\d+)\.attention\.gate")
    unexpected = [k for k in state if not gate_key.fullmatch(k)]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys for an official V1 file: {listing(sorted(unexpected))}")
    for key, gate in state.items():
        layer = int(gate_key.fullmatch(key).group(1))
        if gate.numel() not in (1, llama.n_heads):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(gate.shape)}; expected (1, {llama.n_heads}, 1, 1) or (1,)"
            )
        if layer >= llama.n_layers:
            raise CheckpointError(f"{path}: {key} names layer {layer} but the base has {llama.n_layers} layers")
        if layer < first:
            if gate.any():
                raise CheckpointError(f"{path}: {key} is non-zero but layer {layer} carries no prompts")
            continue
        tensors[f"layers.{layer}.attention.adapter_gate"] = gate.flatten().expand(llama.n_heads).clone()
    adapter = LlamaAdapterConfig(prompt_len=prompt_len, n_layers=n_adapted, gate_fn=gate_fn)
    return AdapterWeights(tensors, adapter, None, path)


def read_peft(path: str | Path, llama: LlamaConfig) -> AdapterWeights:
    """A PEFT directory (adapter_config.json + adapter_model.safetensors / .bin) as our tensors: the registered
    method whose ``peft_type`` matches converts it (``Method.from_peft``)."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    cfg = read_json(config_file)
    methods = [method_class(n) for n in method_names()]
    claiming = [m for m in methods if m.imports_peft(cfg)] if isinstance(cfg.get("peft_type"), str) else []
    if len(claiming) != 1:
        supported = sorted({m.peft_type for m in methods if m.peft_type})
        which = f" (claimed by {', '.join(m.name for m in claiming)})" if claiming else ""
        raise CheckpointError(
            f"{config_file}: peft_type={cfg.get('peft_type')!r}{which}; supported: {', '.join(supported)}"
        )
    method = claiming[0]
    if (path / "adapter_model.safetensors").is_file():
        weight_file = path / "adapter_model.safetensors"
        state = load_safetensors(weight_file)
    elif (path / "adapter_model.bin").is_file():
        weight_file = path / "adapter_model.bin"
        state = torch_load(weight_file)
    else:
        raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    check_adapter_values(state, weight_file)
    try:
        config, tensors = method.from_peft(cfg, state, llama, weight_file)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    return AdapterWeights(tensors, config, None, weight_file)


def open_adapter(path: str | Path, llama: LlamaConfig) -> AdapterWeights:
    """Detect and read an adapter: ours (``.safetensors`` file or directory with ``adapter.safetensors``), a PEFT
    directory (``adapter_config.json``), an official V2 multimodal release file (``.pth`` holding ``{'model',
    'config'}``) or an official V1 file (``.pth`` holding a flat state dict; its gates as trained, tanh: see
    ``read_official_v1``)."""
    path = Path(path)
    if path.is_dir():
        if (path / ADAPTER_FILE).is_file():
            return read_adapter(path)
        if (path / "adapter_config.json").is_file():
            return read_peft(path, llama)
        raise CheckpointError(
            f"{path}: no {ADAPTER_FILE} (our adapter / run directory) and no adapter_config.json (PEFT adaption prompt)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter not found")
    if path.suffix == ".safetensors":
        return read_adapter(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        obj = torch_load_object(path)
        if is_release_v2(obj):
            return read_release_v2(path, llama, obj)
        return read_official_v1(path, llama, obj=obj)
    raise CheckpointError(f"{path}: unknown adapter format (expected .safetensors, .pth or a directory)")

"""Our adapter format: the trainable tensors (``Transformer.adapter_state_dict()``) as safetensors, plus a JSON
sidecar with the configs, the base, the tokenizer, the CLIP weights, the prompt format, the chat template (when the
run was prompted with its base's) and two fingerprints of the base: its architecture (refused when it differs) and
its weights' content (``weights_fingerprint``; a warning, or an error under ``strict_base``). The sidecar also
records a digest of the tensors (``tensors_digest``), so that a tensor file from another save (a process killed
between renaming the two files, or a file copied from elsewhere) or with damaged values is refused instead of
loading under the wrong configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from model.chat_template import ChatTemplate, ChatTemplateError
from model.checkpoint.files import CheckpointError, atomic_write_files, load_safetensors, read_json
from model.checkpoint.keys import check_adapter_values, check_keys
from model.config import ConfigError, LlamaConfig, ModelConfig, VisualConfig
from model.llama import Transformer
from model.methods import MethodConfig, config_to_dict

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_SIDECAR = "adapter.json"
SIDECAR_VERSION = 2  # 2: model_config records "method" + "method_config"; 1 (still read): "adapter"


class BaseWeightsWarning(UserWarning):
    """An adapter is loaded onto a base whose weights differ from those it was trained on (same shapes)."""


FINGERPRINT_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")


def base_fingerprint(llama: LlamaConfig) -> dict[str, int]:
    """The architecture an adapter fits: shapes of the frozen base, vocabulary included."""
    return {f: getattr(llama, f) for f in FINGERPRINT_FIELDS}


def _describe(fp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fp.get(k)}" for k in FINGERPRINT_FIELDS)


def adapter_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, sidecar) for an adapter file ``x.safetensors`` (sidecar ``x.json``) or a directory holding one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / ADAPTER_FILE, path / ADAPTER_SIDECAR


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 (hex) of the tensors by name: each name, dtype, shape and the bytes of its values."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _path_or_name(value: str | Path | None) -> str | None:
    """Existing paths are recorded absolute (the run directory may be read from elsewhere); names as given."""
    if value is None:
        return None
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


def save_adapter(
    model: Transformer,
    path_or_dir: str | Path,
    *,
    base: str | Path,
    tokenizer: str | Path | None = None,
    clip_weights: str | Path | None = None,
    prompt_format: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the trainable tensors (safetensors) and the JSON sidecar, both or neither; return the tensor file.
    The tensors and method config are the method's ``exported`` form (prefix tuning and P-tuning: the computed
    prefixes / soft tokens, not the MLP / encoder they were trained through).

    ``path_or_dir``: a ``.safetensors`` path (sidecar beside it, ``.json``) or a directory (``adapter.safetensors``
    + ``adapter.json``). ``base``: preset name or base directory; ``extra``: free-form JSON-able metadata.
    The sidecar records the base's architecture and, for a model from ``load_model``, its content fingerprint
    (``weights_fingerprint``). Raises WriteError naming the file that could not be written.
    """
    tensor_path, sidecar_path = adapter_paths(path_or_dir)
    with torch.no_grad():
        method_config, exported = model.method.exported(model)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in exported.items()}
    sidecar = {
        "version": SIDECAR_VERSION,
        "model_config": dataclasses.replace(model.config, method=method_config).to_dict(),
        "base": _path_or_name(base),
        "tokenizer": _path_or_name(tokenizer),
        "clip_weights": _path_or_name(clip_weights),
        "prompt_format": prompt_format,
        "chat_template": model.chat_template.to_record() if model.chat_template is not None else None,
        "base_fingerprint": base_fingerprint(model.config.llama),
        "base_weights_fingerprint": model.base_weights_fingerprint,
        "tensors_sha256": tensors_digest(tensors),
        "extra": extra or {},
    }
    text = json.dumps(sidecar, indent=2) + "\n"  # fails before anything is written if extra is not JSON-able
    atomic_write_files(
        {
            tensor_path: lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
            sidecar_path: lambda tmp: tmp.write_text(text),
        }
    )
    return tensor_path


@dataclass
class AdapterWeights:
    """Trainable tensors under our names, the configs they need, and where they came from."""

    tensors: dict[str, Tensor]
    method: MethodConfig | None
    visual: VisualConfig | None
    source: Path
    sidecar: dict[str, Any] | None = None  # our own format only
    chat_template: ChatTemplate | None = None
    """The base's chat template the adapter was trained with (``data.prompt_template chat-template``); None: the
    Alpaca prompts. ``load_trainable`` puts it on the model, which generation then prompts with."""


def read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    """Our adapter sidecar, validated enough to build a model from it."""
    if not sidecar_path.is_file():
        raise CheckpointError(f"{sidecar_path}: adapter sidecar not found (written by save_adapter beside the tensors)")
    sidecar = read_json(sidecar_path)
    version = sidecar.get("version")
    if isinstance(version, bool) or version not in (None, 1, SIDECAR_VERSION):
        raise CheckpointError(
            f"{sidecar_path}: field version is {version!r}; this code reads sidecar versions 1 and {SIDECAR_VERSION} "
            "(a newer release of this project wrote it?)"
        )
    for key in ("model_config", "base_fingerprint"):
        if not isinstance(sidecar.get(key), dict):
            raise CheckpointError(f"{sidecar_path}: field {key!r} is missing or not an object")
    return sidecar


def read_adapter(path: str | Path) -> AdapterWeights:
    """Our adapter (file or directory) with its sidecar; not yet checked against any model."""
    tensor_path, sidecar_path = adapter_paths(path)
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path}: adapter file not found")
    sidecar = read_sidecar(sidecar_path)
    try:
        config = ModelConfig.from_dict(sidecar["model_config"])
    except ConfigError as e:
        raise CheckpointError(f"{sidecar_path}: field model_config.llama.{e.field}: {e.problem}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{sidecar_path}: invalid model_config ({e!r})") from e
    try:
        record = sidecar.get("chat_template")
        chat_template = None if record is None else ChatTemplate.from_record(record, str(sidecar_path))
    except ChatTemplateError as e:
        raise CheckpointError(str(e)) from None
    tensors = load_safetensors(tensor_path)
    check_adapter_values(tensors, tensor_path)
    return AdapterWeights(tensors, config.method, config.visual, tensor_path, sidecar, chat_template)


def check_fingerprint(weights: AdapterWeights, llama: LlamaConfig, base_name: str) -> None:
    """CheckpointError naming both architectures unless the adapter was made for this base's architecture."""
    recorded = weights.sidecar["base_fingerprint"] if weights.sidecar else None
    if recorded is not None and recorded != base_fingerprint(llama):
        raise CheckpointError(
            f"{weights.source}: adapter was trained for another architecture:\n"
            f"  adapter base ({weights.sidecar.get('base')}): {_describe(recorded)}\n"
            f"  this base ({base_name}): {_describe(base_fingerprint(llama))}"
        )


def check_base_weights(weights: AdapterWeights, fingerprint: str | None, base_name: str, *, strict: bool) -> None:
    """Warn (BaseWeightsWarning), or with ``strict`` raise CheckpointError, when the adapter was trained on a base
    whose weights differ from this one's (``fingerprint``, see ``weights_fingerprint``) although the shapes match.

    Silent when either side has no content fingerprint: adapters saved before it was recorded, models whose
    weights were not loaded by ``load_model``.
    """
    recorded = weights.sidecar.get("base_weights_fingerprint") if weights.sidecar else None
    if recorded is None or fingerprint is None or recorded == fingerprint:
        return
    message = (
        f"{weights.source}: adapter was trained on base {weights.sidecar.get('base')}, whose weights differ from "
        f"those of this base ({base_name}) although the shapes match; its outputs will not be the trained ones"
    )
    if strict:
        raise CheckpointError(message)
    warnings.warn(f"{message} (strict_base=True refuses this)", BaseWeightsWarning, stacklevel=3)


def check_tensors_digest(weights: AdapterWeights) -> None:
    """CheckpointError unless the tensors are those the sidecar was saved with (its ``tensors_sha256``; sidecars
    written before it was recorded, and other formats, are not checked). Called after the key checks, which name
    what differs when keys or shapes do."""
    recorded = weights.sidecar.get("tensors_sha256") if weights.sidecar else None
    if recorded is None or recorded == tensors_digest(weights.tensors):
        return
    sidecar = adapter_paths(weights.source)[1].name
    raise CheckpointError(
        f"{weights.source}: does not hold the tensors {sidecar} was saved with (its field tensors_sha256 differs): "
        "the two files come from different saves (a process killed between writing them, or one copied from "
        "elsewhere) or the values are damaged; in a train.py run directory, python train.py --resume RUN_DIR "
        "writes both again from state.pt"
    )


def load_trainable(model: Transformer, weights: AdapterWeights) -> None:
    """Strictly load trainable tensors into ``model`` (values cast to each parameter's dtype)."""
    ours, theirs = model.config.method, weights.method
    if config_to_dict(ours) != config_to_dict(theirs):
        raise CheckpointError(
            f"{weights.source}: adapter config {_method_text(theirs)} differs from the model's {_method_text(ours)}"
        )
    if (weights.visual is None) != (model.visual is None):
        have = "has a visual path" if weights.visual else "is text-only"
        raise CheckpointError(
            f"{weights.source}: the adapter {have} (visual={weights.visual}) but the model "
            f"{'has none' if model.visual is None else 'has one'}; pass clip=<model name> only for visual adapters"
        )
    params = dict(model.trainable_parameters())
    check_keys(
        {n: tuple(p.shape) for n, p in params.items()},
        {n: tuple(t.shape) for n, t in weights.tensors.items()},
        weights.source,
        "adapter tensors",
    )
    check_tensors_digest(weights)
    with torch.no_grad():
        for name, tensor in weights.tensors.items():
            if not params[name].is_meta:
                params[name].copy_(tensor)
    model.chat_template = weights.chat_template


def init_trainable(model: Transformer, weights: AdapterWeights) -> list[str]:
    """Start ``model``'s trainable tensors from ``weights`` (training's ``--model.init_from``): every tensor of the
    file must exist in the model with the same shape (CheckpointError naming them otherwise); the model's others
    keep their values. The method settings may differ (a caption-phase file starts a run that also tunes biases).
    Returns the names of the model's trainable tensors the file did not have."""
    check_fingerprint(weights, model.config.llama, "the model")
    params = dict(model.trainable_parameters())
    absent = sorted(set(params) - set(weights.tensors))
    known = {n: tuple(params[n].shape) for n in weights.tensors if n in params}
    check_keys(
        {**known, **{n: tuple(params[n].shape) for n in absent}},
        {**{n: tuple(t.shape) for n, t in weights.tensors.items()}, **{n: tuple(params[n].shape) for n in absent}},
        weights.source,
        "adapter tensors to start from",
    )
    check_tensors_digest(weights)
    with torch.no_grad():
        for name, tensor in weights.tensors.items():
            params[name].copy_(tensor)
    return absent


def _method_text(config: MethodConfig | None) -> str:
    name, values = config_to_dict(config)
    return f"{name} {values}" if name is not None else "none (the base model)"


def load_adapter(model: Transformer, path: str | Path, *, strict_base: bool = False) -> dict[str, Any]:
    """Load our adapter (file or directory) into ``model`` strictly; return its sidecar.

    Fails with CheckpointError when the sidecar's base fingerprint or adapter config differs from the model's,
    or when any key is missing, unexpected or mis-shaped. An adapter trained on other base weights of the same
    shapes warns (BaseWeightsWarning), or fails under ``strict_base`` (see ``check_base_weights``).
    """
    weights = read_adapter(path)
    check_fingerprint(weights, model.config.llama, "the model")
    check_base_weights(weights, model.base_weights_fingerprint, "the model", strict=strict_base)
    load_trainable(model, weights)
    return weights.sidecar

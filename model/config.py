"""Typed configuration for the LLaMA backbone, the PEFT method and the visual path.

One source of truth for every architectural setting. Field docstrings double as user documentation
(train.py turns them into ``--help``). Presets: ``tiny`` (tests and the embedded default), ``7B``, ``13B``.
Each PEFT method's config lives beside the method (model/methods/); ``LlamaAdapterConfig`` (the adaption prompts) is
re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from model.methods import LlamaAdapterConfig, MethodConfig, config_from_dict, config_to_dict, method_of
from model.methods.llama_adapter import default_config_for


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range, wherever it was given: a LlamaConfig field, a
    key of a base's params.json / config.json, a train.py flag or a setting of a run's config.json.

    ``ConfigError(message)`` says it in the caller's words. ``ConfigError(problem, field=..., owner=...)`` names the
    field: ``LlamaConfig.<field>: <problem>``, or ``<owner>: field <field>: <problem>`` for a value read from the
    file ``owner``; checkpoint loaders turn that form into a CheckpointError naming the file and the file's own key
    for the field (``field`` and ``problem``; ``field`` is None for the first form).
    """

    def __init__(self, problem: str, *, field: str | None = None, owner: str | None = None) -> None:
        if field is None:
            message = problem
        else:
            message = f"LlamaConfig.{field}: {problem}" if owner is None else f"{owner}: field {field}: {problem}"
        super().__init__(message)
        self.field, self.problem = field, problem


# Bounds that refuse absurd configs before anything is built or allocated, generous for every released LLaMA
# (Llama 3.1 405B: dim 16384, 126 layers, 128 heads, vocabulary 128256, FFN 53248, 131072 positions).
_INT_LIMITS = {
    "dim": 2**16,
    "n_layers": 2**10,
    "n_heads": 2**16,
    "n_kv_heads": 2**16,
    "vocab_size": 2**22,
    "ffn_dim": 2**20,
    "max_seq_len": 2**21,
    "rope_original_max_seq_len": 2**21,
}
MAX_ROPE_TABLE = 2**28
"""Most values in each RoPE cos / sin table, max_seq_len x head_dim / 2 (1 GiB in fp32; Llama 3.1: 2**23)."""


def _check_int(name: str, value: Any, limit: int, owner: str | None = None) -> None:
    """A real int (not a bool, not a float such as 64.0) in 1..limit."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r} ({type(value).__name__})", field=name, owner=owner)
    if not 0 < value <= limit:
        raise ConfigError(f"must be in 1..{limit:,}, got {value:,}", field=name, owner=owner)


def _check_real(name: str, value: Any, bound: str, ok: Callable[[float], bool], owner: str | None = None) -> None:
    """A finite int or float (not a bool) for which ``ok`` holds (``bound`` says which range that is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"must be a number, got {value!r} ({type(value).__name__})", field=name, owner=owner)
    if not math.isfinite(value) or not ok(value):
        raise ConfigError(f"must be finite and {bound}, got {value!r}", field=name, owner=owner)


@dataclass
class LlamaConfig:
    """LLaMA architecture. Field names follow Meta's ``params.json`` where one exists."""

    dim: int = 4096
    """Model width (hidden size)."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_heads."""
    vocab_size: int = 32000
    """Vocabulary size; must equal the tokenizer's."""
    ffn_dim: int = 11008
    """Hidden size of the SwiGLU feed-forward block."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generation) the RoPE table and KV cache are sized for."""
    rope_scaling_factor: float | None = None
    """Llama 3.1-style RoPE frequency scaling (Hugging Face rope_type 'llama3'): long wavelengths are divided by
    this factor, short ones kept, the band between blended. None: plain RoPE (LLaMA 1 / 2)."""
    rope_low_freq_factor: float = 1.0
    """llama3 RoPE: wavelengths above rope_original_max_seq_len / this factor are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 RoPE: wavelengths below rope_original_max_seq_len / this factor are kept."""
    rope_original_max_seq_len: int = 8192
    """llama3 RoPE: the context length the model was pre-trained with before the extension."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name, limit in _INT_LIMITS.items():
            _check_int(name, getattr(self, name), limit)
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}", field="n_heads")
        if self.n_heads % self.n_kv_heads:
            problem = f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            raise ConfigError(problem, field="n_kv_heads")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE", field="n_heads")
        rope_values = self.max_seq_len * self.head_dim // 2
        if rope_values > MAX_ROPE_TABLE:
            raise ConfigError(
                f"{self.max_seq_len} positions x head_dim {self.head_dim} need a RoPE table of {rope_values:,} values "
                f"per cos/sin, over the limit of {MAX_ROPE_TABLE:,}",
                field="max_seq_len",
            )
        _check_real("norm_eps", self.norm_eps, "0 < norm_eps < 1", lambda x: 0 < x < 1)
        _check_real("rope_theta", self.rope_theta, "> 1", lambda x: x > 1)
        if self.rope_scaling_factor is not None:
            _check_real("rope_scaling_factor", self.rope_scaling_factor, "> 0", lambda x: x > 0)
            _check_real("rope_low_freq_factor", self.rope_low_freq_factor, "> 0", lambda x: x > 0)
            _check_real(
                "rope_high_freq_factor", self.rope_high_freq_factor, "> rope_low_freq_factor",
                lambda x: x > self.rope_low_freq_factor,
            )  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @staticmethod
    def meta_ffn_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
        """Meta's FFN size rule: 2/3 of 4*dim, optionally scaled, rounded up to ``multiple_of``."""
        hidden = int(2 * 4 * dim / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        return multiple_of * math.ceil(hidden / multiple_of)

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], vocab_size: int | None = None) -> LlamaConfig:
        """Build from a Meta ``params.json`` dict. ``vocab_size`` overrides the file's (-1 means "from tokenizer").

        Raises ConfigError naming the params.json key of a missing, mistyped or out-of-range value.
        """
        owner = "params.json"
        for key in ("dim", "n_layers", "n_heads"):
            if key not in params:
                raise ConfigError("missing", field=key, owner=owner)
        dim, multiple_of, multiplier = params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
        _check_int("dim", dim, _INT_LIMITS["dim"], owner)  # the FFN rule below needs a sane dim and multiple_of
        _check_int("multiple_of", multiple_of, _INT_LIMITS["ffn_dim"], owner)
        if multiplier is not None:
            _check_real("ffn_dim_multiplier", multiplier, "in (0, 1024]", lambda x: 0 < x <= 1024, owner)
        values = {f: params[f] for f in _META_KEYS if f in params}
        if vocab_size is not None:
            values["vocab_size"] = vocab_size
        try:
            return cls(**values, ffn_dim=cls.meta_ffn_dim(dim, multiple_of, multiplier))
        except ConfigError as e:  # ffn_dim comes from ffn_dim_multiplier
            field = e.field if e.field in _META_KEYS else "ffn_dim_multiplier"
            raise ConfigError(e.problem, field=field, owner=owner) from None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face ``config.json`` dict of a ``LlamaForCausalLM`` (default or llama3 RoPE).

        transformers < 5 writes rope_theta at the top and rope_scaling beside it; transformers 5 puts both in
        rope_parameters. Raises ConfigError naming the config.json key of a missing, mistyped or out-of-range value.
        """
        owner = "config.json"
        rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        for key in ("rope_scaling", "rope_parameters"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise ConfigError(f"must be an object, got {cfg[key]!r}", field=key, owner=owner)
        rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            problem = f"{kind!r}: only default and llama3 RoPE are supported"
            raise ConfigError(problem, field=f"{rope_key}.rope_type", owner=owner)
        keys = dict(_HF_KEYS)  # LlamaConfig field -> config.json key ("section.key" inside the RoPE section)
        required = set(_HF_REQUIRED)
        if "rope_theta" in rope:
            keys["rope_theta"] = f"{rope_key}.rope_theta"
        if kind == "llama3":
            keys.update({f: f"{rope_key}.{k}" for f, k in _HF_LLAMA3_KEYS.items()})
            required.update(f"{rope_key}.{k}" for k in _HF_LLAMA3_KEYS.values())
        values = {}
        for name, key in keys.items():
            section, entry = (rope, key.split(".", 1)[1]) if "." in key else (cfg, key)
            if entry in section:
                values[name] = section[entry]
            elif key in required:
                raise ConfigError("missing", field=key, owner=owner)
        try:
            llama = cls(**values)
        except ConfigError as e:
            raise ConfigError(e.problem, field=keys[e.field], owner=owner) from None
        if cfg.get("head_dim") not in (None, llama.head_dim):
            problem = f"{cfg['head_dim']!r} differs from hidden_size / num_attention_heads = {llama.head_dim}"
            raise ConfigError(problem, field="head_dim", owner=owner)
        return llama

    def to_hf_config(self) -> dict[str, Any]:
        """The architecture fields of a Hugging Face ``config.json`` (inverse of ``from_hf_config``), RoPE in the
        top-level ``rope_theta`` / ``rope_scaling`` form that transformers 4 and 5 both read."""
        cfg: dict[str, Any] = {key: getattr(self, name) for name, key in _HF_KEYS.items()}
        cfg["head_dim"] = self.head_dim
        cfg["rope_scaling"] = None
        if self.rope_scaling_factor is not None:
            rope = {key: getattr(self, name) for name, key in _HF_LLAMA3_KEYS.items()}
            cfg["rope_scaling"] = {"rope_type": "llama3", **rope}
        return cfg


_META_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "max_seq_len")
"""LlamaConfig fields read from params.json under the same name (ffn_dim comes from multiple_of and
ffn_dim_multiplier)."""
_HF_KEYS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "ffn_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings",
}
_HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
_HF_LLAMA3_KEYS = {
    "rope_scaling_factor": "factor",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_original_max_seq_len": "original_max_position_embeddings",
}


@dataclass
class VisualConfig:
    """Frozen CLIP image tower and the trainable path from its features to visual tokens (B, Q, LLaMA dim).

    Two kinds: ``global`` (paper V1, Sec. 3.3: pooled + class-token features -> MLP -> one token, Q = 1) and
    ``query`` (the released LLaMA-Adapter V2 multimodal model: every CLIP token -> clip_proj + LayerNorm -> Q learned
    queries joined to them through ``query_blocks`` ViT blocks -> the Q query outputs -> visual_proj + LayerNorm).
    """

    clip_model: str = "ViT-L-14-quickgelu"
    """open_clip model name (weights from a local file only), 'tiny' for the download-free test tower, or 'openai':
    the tower's shape read from an OpenAI-layout CLIP state dict (``visual.*`` keys; QuickGELU, as OpenAI's CLIP)."""
    kind: Literal["global", "query"] = "global"
    """global: one visual token from pooled + class-token features (V1); query: ``query_len`` tokens from learned
    queries over every CLIP token (the V2 multimodal release)."""
    feature_layers: tuple[int, ...] | None = None
    """global: 0-based ViT blocks whose class token joins the pooled output (multi-scale global features); None: the
    blocks at one and two thirds of the depth (ViT-L/14: 7, 15); (): the pooled output only (non-ViT towers)."""
    proj_hidden: int = 80
    """global: hidden width of the trainable MLP mapping CLIP features to one LLaMA-width vector (80: the paper's
    ~0.6M projection for 7B + ViT-L/14, 1.79M trainable values in all)."""
    query_len: int = 10
    """query: Q, learned queries and so visual tokens (release: 10, one per adaption prompt)."""
    query_width: int = 768
    """query: width of the query blocks (release: 768)."""
    query_blocks: int = 8
    """query: ViT blocks over [queries ; CLIP tokens] (release: 8)."""
    query_heads: int = 16
    """query: attention heads of those blocks (release: 16)."""
    query_mlp_ratio: float = 4.0
    """query: MLP width of those blocks over query_width (release: 4)."""
    channel_order: Literal["rgb", "bgr"] = "rgb"
    """Channel order the tower sees. bgr reproduces the official V2 release, whose demo, evaluation and training
    read images with cv2.imread and hand them on unconverted: its weights were trained on B and R swapped."""

    entry: Literal["native", "shared"] = "native"
    """How the visual tokens enter the PEFT method. native: the method's own way (added to adaption prompts,
    prefixes or soft tokens; the gated visual prompt for LoRA, Houlsby, AdaMix). shared: every method runs
    text-only and the image enters as the gated visual prompt in the top ``shared_layers`` layers (the same for
    every method: ``python -m bench methods --visual-entry shared``)."""
    shared_layers: int = 2
    """shared: the top layers that carry the gated visual prompt (the gated-prompt methods' own visual_layers must
    equal it)."""

    def __post_init__(self) -> None:
        if self.feature_layers is not None:
            self.feature_layers = tuple(self.feature_layers)
            if any(not isinstance(i, int) or i < 0 for i in self.feature_layers):
                raise ValueError(f"VisualConfig.feature_layers must be block indices >= 0, got {self.feature_layers}")
            if len(set(self.feature_layers)) != len(self.feature_layers):
                raise ValueError(f"VisualConfig.feature_layers has repeated blocks: {self.feature_layers}")
        if not self.clip_model or not isinstance(self.clip_model, str):
            raise ValueError("VisualConfig.clip_model must name an open_clip model or be 'tiny' or 'openai'")
        if self.kind not in ("global", "query"):
            raise ValueError(f"VisualConfig.kind must be 'global' or 'query', got {self.kind!r}")
        if self.entry not in ("native", "shared"):
            raise ValueError(f"VisualConfig.entry must be 'native' or 'shared', got {self.entry!r}")
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"VisualConfig.channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        for name, limit in _VISUAL_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ValueError(f"VisualConfig.{name} must be an integer in 1..{limit:,}, got {value!r}")
        if self.query_width % self.query_heads:
            raise ValueError(
                f"VisualConfig.query_width={self.query_width} is not divisible by query_heads={self.query_heads}"
            )
        ratio = self.query_mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 64:
            raise ValueError(f"VisualConfig.query_mlp_ratio must be a number in (0, 64], got {ratio!r}")

    @property
    def n_tokens(self) -> int:
        """Q: visual tokens per image."""
        return self.query_len if self.kind == "query" else 1


_VISUAL_LIMITS = {"proj_hidden": 2**16, "query_len": 2**12, "query_width": 2**15, "query_blocks": 2**7,
                  "query_heads": 2**10, "shared_layers": 2**10}  # fmt: skip
"""Bounds that refuse absurd visual configs (e.g. from a hostile sidecar) before anything is allocated."""


@dataclass
class ModelConfig:
    """The whole model: backbone, PEFT method and (optionally) the visual path."""

    llama: LlamaConfig = field(default_factory=LlamaConfig)
    method: MethodConfig | None = None
    """The config of a registered PEFT method (``model.methods``); None: the plain base model."""
    visual: VisualConfig | None = None

    def __post_init__(self) -> None:
        if self.method is not None:
            method_of(self.method)  # a registered method's config, else ValueError
            self.method.check(self.llama)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON: the method as its registered name and its fields."""
        name, values = config_to_dict(self.method)
        visual = dataclasses.asdict(self.visual) if self.visual is not None else None
        return {"llama": dataclasses.asdict(self.llama), "method": name, "method_config": values, "visual": visual}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; also reads sidecars written before the method plug-in point, whose ``adapter``
        entry is always an adaption-prompt config."""
        visual = d.get("visual")
        if "method" in d:
            method = config_from_dict(d["method"], d.get("method_config"))
        else:
            method = LlamaAdapterConfig(**d.get("adapter", {}))
        return cls(llama=LlamaConfig(**d["llama"]), method=method, visual=VisualConfig(**visual) if visual else None)


PRESETS: dict[str, LlamaConfig] = {
    # Well under 1M parameters: for tests and the embedded default (vocab of the synthetic tokenizer).
    "tiny": LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=176, max_seq_len=512),
    "7B": LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_dim=11008),
    "13B": LlamaConfig(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, ffn_dim=13824),
}


def preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a preset name (``tiny``, ``7B``, ``13B``), text-only, with the default adaption
    prompts for its depth (``default_config_for``; tiny, the tests' model: the top 3 of its 4 layers)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    llama = dataclasses.replace(PRESETS[name])
    method = LlamaAdapterConfig(n_layers=3) if name == "tiny" else default_config_for(llama)
    return ModelConfig(llama=llama, method=method)

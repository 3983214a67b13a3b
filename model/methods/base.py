"""The plug-in point for parameter-efficient fine-tuning (PEFT) methods: a registry by name and the base class
``Method`` whose hooks the backbone (model/llama.py) calls. The backbone names no method; a new method is one
module in model/methods/ with its config dataclass, registered with ``@register_method("name")``.

Every tensor a method adds must carry the ``adapter_`` prefix on some part of its name: ``is_trainable`` (in
model/llama.py) is the one rule that makes it trainable, optimized and saved; everything else stays frozen.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from model.loss import next_token_loss

if TYPE_CHECKING:
    import torch

    from model.config import LlamaConfig
    from model.llama import Attention, AttentionContext, Transformer, TransformerBlock
    from model.methods.memory import MemoryTerms, StepShape


@dataclass
class MethodConfig:
    """Base of every method's settings: a dataclass whose field docstrings are user documentation."""

    recorded_defaults: ClassVar[dict[str, Any]] = {}
    """Field -> the value a RECORDED config without the field (an adapter sidecar, a run's config.json written
    before the field existed) trained with, when that differs from today's default; see ``with_recorded_defaults``."""

    def check(self, llama: LlamaConfig) -> None:
        """Raise ValueError naming the field when these settings do not fit the architecture ``llama``."""

    def check_visual_tokens(self, n_tokens: int) -> None:
        """Raise ValueError naming the field when Q = ``n_tokens`` visual tokens per image cannot enter this method
        (default: any number can)."""


LINEAR_SUBLAYER = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                   "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}  # fmt: skip
"""The linears of a TransformerBlock a method may wrap (in their canonical order) -> the sublayer holding each."""


class WrappedLinear(nn.Linear):
    """Base of the linears a method puts in place of a frozen one (LoRA, DoRA, IA3, V2), keeping the frozen weight
    as ``weight`` under its Meta name. ``frozen(x)`` is that weight's output alone, without the method's update:
    what the gated visual prompt reads (model/methods/visual_prompt.py). Under FSDP it gathers the shards as the
    forward does (training/dist.py registers it)."""

    def __init__(self, linear: nn.Linear) -> None:
        """Take over the bias-free ``linear``'s frozen weight: no copy, base checkpoints load under its name."""
        if linear.bias is not None:
            raise ValueError(f"{type(self).__name__} wraps bias-free linears only (Meta LLaMA has no biases)")
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")  # nothing allocated
        self.weight = linear.weight  # (out, in)

    def frozen(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


def wrap_linears(
    blocks: Iterable[TransformerBlock], targets: Iterable[str], wrap: Callable[[nn.Linear, str], WrappedLinear]
) -> None:
    """Put ``wrap(linear, target)`` in place of each linear named in ``targets`` (keys of LINEAR_SUBLAYER) of
    every block: the ``attach`` of a method with wrapped linears."""
    targets = tuple(targets)
    for block in blocks:
        for target in targets:
            sublayer = getattr(block, LINEAR_SUBLAYER[target])
            setattr(sublayer, target, wrap(getattr(sublayer, target), target))


def wrapped_linears(blocks: Iterable[TransformerBlock], targets: Iterable[str]) -> list[Any]:
    """The linears ``wrap_linears`` put in place: block by block, in the order of ``targets`` within a block."""
    targets = tuple(targets)
    return [getattr(getattr(block, LINEAR_SUBLAYER[t]), t) for block in blocks for t in targets]


def check_tokens_fit(config: MethodConfig, field: str, n_tokens: int) -> None:
    """For methods that add visual token i to their vector i: Q must be 1 (added to every one) or their count."""
    count = getattr(config, field)
    if n_tokens not in (1, count):
        raise ValueError(
            f"{type(config).__name__}.{field}={count} does not fit {n_tokens} visual tokens per image: token i is "
            f"added to vector i, so the visual path must give 1 token or {count} (VisualConfig.query_len)"
        )


class Method(nn.Module):
    """A PEFT method attached to the Transformer (``model.method``); every hook is a no-op here.

    The base class itself is the plain base model (``ModelConfig.method = None``). Hooks, in the order the
    backbone calls them:

    - ``attach(model)``: once, when the model is built. Add the method's tensors (empty, possibly on the meta
      device) to the backbone's modules or to the method itself. Wrapped linear layers (LoRA, V2 bias / scale)
      are made here too: ``wrap_linears`` replaces e.g. ``block.attention.wq`` by a ``WrappedLinear`` subclass that
      keeps the frozen weight as ``.weight``, so base checkpoints load under their Meta names unchanged.
    - ``reset_parameters(model, generator)``: the one init rule of a fresh adapter (identity at start where the
      method has one). Draw on the CPU from ``generator`` (None: the global RNG), then copy to each tensor's
      device, so a seed gives the same adapter on every device.
    - ``sequence_state(model, visual)``: computed once per sequence (the first forward of a KV cache, or every
      forward without one) and kept in ``cache.method_state``; the layer hooks read it as ``ctx.state``.
      ``visual`` (B, Q, dim) is where the visual tokens enter every method (zero rows: items without an image;
      None: no images at all; Q = 1 for the V1 global path, ``VisualConfig.query_len`` for the query path, checked
      by ``MethodConfig.check_visual_tokens``). Only methods with ``takes_visual`` may be built with a visual path.
    - ``soft_tokens(model, visual)``: with ``n_soft_tokens`` = P > 0, the P soft input vectors (1 or B, P, dim)
      of a new sequence (prompt tuning, P-tuning). The backbone puts them before the caller's tokens at cache
      slots and RoPE positions 0..P-1, before any left padding (PEFT's layout: [soft, pad, tokens]); the caller's
      positions and padding shift by P (``new_cache`` reserves the P slots, ``mark_padding`` counts after them,
      ``max_seq_len`` includes them); the forward drops the P soft positions from its output, so logits stay
      (B, T, vocab) aligned with the caller's tokens and training labels need no change.
    - ``position_offset``: RoPE positions kept free before the soft tokens and tokens, which start there (prefix
      tuning as PEFT runs it: P, the prefixes standing in for past keys). It counts in ``max_seq_len`` too.
    - ``joint_kv(attention, ctx)``: keys / values (1 or B, n_kv_heads, P, head_dim) joined BEFORE the tokens'
      keys in the SAME softmax, visible to every query, without RoPE (prefix tuning).
    - ``attention_output(attention, q, y, ctx)``: the head outputs y (B, n_heads, T, head_dim) before ``wo``,
      given the RoPE'd queries q (B, n_heads, T, head_dim): add terms of a SEPARATE softmax (adaption prompts).
    - ``after_sublayer(block, sublayer, x, out, ctx)``: the output ``out`` (B, T, dim) of the ``"attention"`` or
      ``"feed_forward"`` sublayer, before the residual addition, given the sublayer's input ``x`` (B, T, dim): the
      normalised hidden state it read (Houlsby and AdaMix in series, parallel adapters).
    - ``merge(model)``: fold the method into the frozen weights for inference, outputs unchanged.
    - ``folded_weights(model)`` / ``to_peft(...)``: the method in other tools' formats (``python -m model.export``):
      a plain LLaMA's weights with the method folded in (``--to hf``), PEFT's config and tensors (``--to peft``).
    - ``begin_step(step, seed)``: called by the trainer once per optimizer step, before its micro-batches: per-step
      randomness drawn from (seed, step) is the same on every process and in every split of the batch (AdaMix).
    - ``training_loss(model, run_blocks, state, labels, head, chunk)``: the loss of one training forward
      (``model(tokens, labels=...)``, inside the call DDP / FSDP wrap); ``run_blocks(state)`` runs the layers once
      with the per-sequence state ``state``, so a method may run them twice (AdaMix's consistency loss).
    - ``held_in_step(model)``: after the step's backward passes, the slices of trainable tensors the optimizer step
      must leave unchanged, values and optimizer moments alike (AdaMix's unrouted experts).
    - ``memory_terms(step)``: not called by the backbone; what the method adds to a training step's memory, for
      ``python -m bench memory`` (model/methods/memory.py).
    """

    name: ClassVar[str] = "none"
    """The registered name (set by ``register_method``); recorded in adapter sidecars."""
    config_class: ClassVar[type[MethodConfig] | None] = None
    """The dataclass of this method's settings."""
    takes_visual: ClassVar[bool] = False
    """Whether ``sequence_state`` / ``soft_tokens`` use the visual vector (a model with a visual path needs such a
    method)."""

    peft_type: ClassVar[str | None] = None
    """PEFT's ``peft_type`` of the same method (e.g. "LORA"), when PEFT has it: ``from_peft`` then imports PEFT
    directories (``load_model(base, adapter=peft_dir)``)."""

    fold_refusal: ClassVar[str] = "it adds computation that a plain LLaMA does not have"
    """Why ``folded_weights`` cannot fold this method into plain LLaMA weights (the ``--to hf`` refusal)."""

    def __init__(self, config: MethodConfig | None, llama: LlamaConfig) -> None:
        super().__init__()
        self.config, self.llama = config, llama

    @classmethod
    def imports_peft(cls, peft_config: dict[str, Any]) -> bool:
        """Whether ``from_peft`` reads this PEFT adapter_config.json: its ``peft_type`` is ours (a method sharing
        a ``peft_type`` with another, as DoRA does LoRA's, narrows it by a setting, e.g. ``use_dora``)."""
        return cls.peft_type is not None and peft_config.get("peft_type") == cls.peft_type

    @classmethod
    def from_peft(
        cls, peft_config: dict[str, Any], state: dict[str, Tensor], llama: LlamaConfig, source: Path
    ) -> tuple[MethodConfig, dict[str, Tensor]]:
        """A PEFT directory's adapter_config.json values and weights -> (our config, tensors under our names).
        Raise ValueError naming the field or key PEFT wrote that has no equivalent here; ``source`` names the
        weights file in messages. Unknown keys may be passed through: the strict load names them."""
        raise NotImplementedError(f"{cls.name} has no PEFT import")

    @classmethod
    def to_peft(
        cls, config: MethodConfig, tensors: dict[str, Tensor], llama: LlamaConfig
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Inverse of ``from_peft``: our config and tensors (``exported``'s, the text part) -> (this method's fields of
        PEFT's adapter_config.json, the state dict PEFT's ``save_pretrained`` writes), PEFT's names and layouts.
        Raise ValueError naming the setting or tensor PEFT cannot express. ``peft_type`` and the fields every PEFT
        config has are added by the writer (model/checkpoint/peft_export.py)."""
        raise NotImplementedError(f"{cls.name} has no PEFT export")

    def folded_weights(self, model: Transformer) -> dict[str, Tensor]:
        """The weights of a plain LLaMA computing what ``model`` computes on text: Meta names, plus a
        ``<linear>.bias`` (out,) for linears the method gives a bias. A method that folds merges itself into
        ``model`` first (``model`` changes); the base model gives its own weights; any other method raises
        ValueError saying why it cannot fold (``fold_refusal``)."""
        if self.config is not None:
            raise ValueError(f"{self.name} cannot be folded into plain LLaMA weights: {self.fold_refusal}")
        return base_weights(model)

    def attach(self, model: Transformer) -> None:
        """Add this method's ``adapter_*`` tensors (empty) and wrapped linears to ``model``."""

    def reset_parameters(self, model: Transformer, generator: torch.Generator | None) -> None:
        """Give every tensor this method added its fresh value (see the class docstring)."""

    def sequence_state(self, model: Transformer, visual: Tensor | None) -> Any:
        """Per-sequence state kept in the KV cache; ``visual`` (B, Q, dim) or None."""
        return None

    @property
    def n_soft_tokens(self) -> int:
        """P: soft vectors ``soft_tokens`` prepends to every sequence (0: none)."""
        return 0

    @property
    def position_offset(self) -> int:
        """RoPE position of a sequence's first soft token or token (0: none kept before them)."""
        return 0

    def soft_tokens(self, model: Transformer, visual: Tensor | None) -> Tensor | None:
        """The ``n_soft_tokens`` soft input vectors (1 or B, P, dim) of a new sequence, or None; ``visual`` (B, dim)
        or None as in ``sequence_state``."""
        return None

    def joint_kv(self, attention: Attention, ctx: AttentionContext) -> tuple[Tensor, Tensor] | None:
        """Keys and values joined to this layer's token keys in the same softmax, or None."""
        return None

    def attention_output(self, attention: Attention, q: Tensor, y: Tensor, ctx: AttentionContext) -> Tensor:
        """This layer's head outputs y (B, nh, T, hd), with any separate-softmax terms added."""
        return y

    def after_sublayer(
        self, block: TransformerBlock, sublayer: str, x: Tensor, out: Tensor, ctx: AttentionContext
    ) -> Tensor:
        """The output of ``block``'s ``"attention"`` / ``"feed_forward"`` sublayer before the residual add; ``x`` is
        the (normalised) input the sublayer read."""
        return out

    def exported(self, model: Transformer) -> tuple[MethodConfig | None, dict[str, Tensor]]:
        """What an adapter file holds (``save_adapter``): this method's config and the model's trainable tensors.
        A method trained through a reparameterisation (prefix tuning's MLP, P-tuning's encoder) returns the form
        it computes instead, as ``merge()`` would leave it, without changing the model; resuming a run reads the
        training form from its state.pt."""
        return self.config, dict(model.adapter_state_dict())

    def merge(self, model: Transformer) -> None:
        """Fold into the frozen weights for inference where the math allows (LoRA, V2 bias / scale), leaving the
        method's tensors at their identity values so outputs are unchanged. Methods whose work cannot fold
        (adaption prompts, prefixes: extra keys) keep working as they are."""

    def begin_step(self, step: int, seed: int) -> None:
        """Optimizer step ``step`` (0-based) of a run seeded with ``seed`` begins (see the class docstring)."""

    def training_loss(
        self,
        model: Transformer,
        run_blocks: Callable[[Any], Tensor],
        state: Any,
        labels: Tensor,
        head: Callable[[Tensor], Tensor],
        chunk: int,
    ) -> Tensor:
        """The fp32 training loss summed over the targets of ``labels`` (B, T): by default the next-token
        cross-entropy (model/loss.py) of one pass, ``run_blocks(state)`` -> hidden states (B, T, dim) at the caller's
        tokens, ``head`` mapping hidden states to logits, ``chunk`` targets at a time. A term added here is summed
        over the targets too (the trainer divides the sum by the global target count)."""
        return next_token_loss(run_blocks(state), labels, head, chunk)

    @property
    def training_passes(self) -> int:
        """Passes through the layers that one training forward (``training_loss``) makes: 1 by default."""
        return 1

    def memory_terms(self, step: StepShape) -> MemoryTerms:
        """What this method adds to the memory of one training step of ``step``'s shape (model/methods/memory.py),
        for ``python -m bench memory``. Every method describes its own: one without raises, so no prediction is made
        without it."""
        raise NotImplementedError(f"{self.name} does not describe its training memory (Method.memory_terms)")

    def held_in_step(self, model: Transformer) -> list[tuple[nn.Parameter, Tensor]]:
        """(trainable tensor, indices along its first axis) that this optimizer step must leave as they are, values
        and optimizer moments alike (the trainer restores them after the step); default: none."""
        return []

    def describe(self) -> str:
        """One line for people: what the method adds and where."""
        return "no PEFT method (the base model)"

    def group(self, name: str) -> str:
        """The kind of the trainable tensor ``name`` for the training log (default: its own name, unprefixed)."""
        return name.rsplit(".", 1)[-1].removeprefix("adapter_")


def base_weights(model: Transformer) -> dict[str, Tensor]:
    """The backbone's frozen tensors under their Meta names: no adapter tensor, no visual tower, nothing of the
    method's own module."""
    from model.llama import is_trainable  # on use: model.llama imports this package

    return {
        name: tensor.detach()
        for name, tensor in model.state_dict().items()
        if not is_trainable(name) and not name.startswith(("visual.", "method."))
    }


# ---- registry ---------------------------------------------------------------------------------------------------
_METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a Method subclass (with its ``config_class``) under ``name``."""

    def register(cls: M) -> M:
        if cls.config_class is None or not issubclass(cls.config_class, MethodConfig):
            raise TypeError(f"{cls.__qualname__}.config_class must be a MethodConfig dataclass")
        for other_name, other in _METHODS.items():
            if other is not cls and (other_name == name or other.config_class is cls.config_class):
                raise ValueError(f"PEFT method {name!r} ({cls.__qualname__}) clashes with {other_name!r}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


def method_names() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; ValueError listing the registered ones otherwise."""
    if name not in _METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; registered: {', '.join(method_names())}")
    return _METHODS[name]


def method_of(config: MethodConfig) -> type[Method]:
    """The registered method whose config class ``config`` is."""
    for cls in _METHODS.values():
        if type(config) is cls.config_class:
            return cls
    raise ValueError(f"{type(config).__name__} is not the config of a registered PEFT method ({method_names()})")


def build_method(config: MethodConfig | None, llama: LlamaConfig) -> Method:
    """The method for ``config`` (None: the no-op base ``Method``, i.e. the plain base model)."""
    return Method(None, llama) if config is None else method_of(config)(config, llama)


def config_from_dict(name: str | None, values: dict[str, Any] | None) -> MethodConfig | None:
    """A method config from the name and field values recorded by ``config_to_dict``; a value of the wrong type
    (``prompt_len: 10.0`` or ``true``, a list for a name) is refused naming the field, before the config is built."""
    if name is None:
        return None
    if not isinstance(name, str) or not isinstance(values or {}, dict):
        raise ValueError(f"PEFT method {name!r} with settings {values!r}: expected a name and an object of settings")
    cls = method_class(name).config_class
    values = with_recorded_defaults(cls, values or {})
    hints = typing.get_type_hints(cls)
    for field, value in (values or {}).items():
        if field in hints and not _fits(value, hints[field]):
            tp = hints[field]
            kind = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            raise ValueError(f"settings of PEFT method {name!r}: {cls.__name__}.{field} = {value!r} is not {kind}")
    try:
        return cls(**(values or {}))
    except TypeError as e:  # a field this method does not have
        raise ValueError(f"settings of PEFT method {name!r}: {e}") from None


def with_recorded_defaults(cls: type[MethodConfig], values: dict[str, Any]) -> dict[str, Any]:
    """A recorded config's field values with the fields it lacks filled from ``cls.recorded_defaults``: a record
    from before a field existed keeps the behaviour it trained with, while new configs get today's defaults."""
    return {**cls.recorded_defaults, **values}


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a config field's type (bool is no int; an int is a float; a list is a tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return len(items) == len(value) and all(_fits(v, t) for v, t in zip(value, items))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # other types: the config's own checks


def config_to_dict(config: MethodConfig | None) -> tuple[str | None, dict[str, Any] | None]:
    """(name, field values) of a method config, as adapter sidecars record them."""
    if config is None:
        return None, None
    return method_of(config).name, dataclasses.asdict(config)

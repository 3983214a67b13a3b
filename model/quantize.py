"""Quantized frozen base: the linear weights of every block stored as 4-bit NF4 or int8 through torchao.

QLoRA's recipe (Dettmers et al. 2023): the frozen weights are kept quantized and dequantized on the fly inside each
matmul, the trainable tensors stay in full precision, and gradients flow through the frozen matmuls to them. Here
the quantized weight is a torchao tensor subclass put in place of the frozen ``weight`` parameter of each block
linear (``NF4Tensor`` from ``to_nf4``; for int8 ``FrozenInt8Tensor``, torchao's weight-only ``Int8Tensor`` with its
own ``F.linear``, see there); both answer ``F.linear`` (forward, and backward to the input) themselves, so the
backbone and every method's wrapped linear (LoRA, V2's bias / scale) call ``F.linear(x, self.weight)`` unchanged,
and parameter names (Meta's ``layers.N.attention.wq.weight``) and adapter files (``adapter_*`` tensors only) are the
same as unquantized.

What the backward pass keeps matters as much as what the weights hold: NF4's ``linear_nf4`` is an autograd function
that saves the NF4 weight and dequantizes it again for the gradient. torchao 0.18's ``Int8Tensor`` runs its
``F.linear`` above autograd as ``mm(x, int8.t().to(x.dtype)) * scale``, so autograd saves the cast, a full-precision
copy of every block weight, until the backward pass: more memory than training on a 16-bit base (bench/memory.py,
7B bf16 batch 4 x 512: 26.3 GiB against 20.9). ``FrozenInt8Tensor`` computes the same product inside an autograd
function (``_Int8Linear``) that saves the int8 data and row scales only and casts again for the gradient: same
values, and 15.0 GiB predicted there (measured on the 2-core CPU VM at the 100M shape, fp32 batch 4 x 512: 1.32 GiB
peak, 1.54 before).

torchao is imported on use only: the rest of the package does not pay its import time (~3.5 s on the 2-core VM).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from model.llama import Transformer

QuantizeKind = Literal["nf4", "int8"]
QUANTIZE_KINDS: tuple[str, ...] = get_args(QuantizeKind)

BASE_LINEARS: dict[str, tuple[str, ...]] = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3")}
"""The linears of each block that are quantized, by owner module (Meta's names)."""

NF4_BLOCK_SIZE = 64
"""Values per NF4 absmax block (QLoRA's 64)."""
NF4_SCALER_BLOCK_SIZE = 256
"""Block scales per second-level ("double quantization") block (QLoRA's 256); lowered to a divisor of the number of
blocks for matrices too small to hold a multiple of 256 blocks (the tiny test model)."""

_TORCHAO_KINDS = {"NF4Tensor": "nf4", "Int8Tensor": "int8"}


def check_kind(kind: object) -> QuantizeKind:
    """``kind`` itself if it names a quantization, else ValueError naming the value and the choices."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize={kind!r} is not supported; choose one of {', '.join(QUANTIZE_KINDS)}")
    return kind  # type: ignore[return-value]


def quantized_kind(weight: Tensor) -> QuantizeKind | None:
    """The kind of a weight quantize_base made ("nf4" / "int8"), None for a plain tensor. Decided by the torchao
    class, without importing torchao (unquantized code paths, e.g. every ``merge``, call this)."""
    for cls in type(weight).__mro__:
        if cls.__name__ in _TORCHAO_KINDS and cls.__module__.startswith("torchao."):
            return _TORCHAO_KINDS[cls.__name__]  # type: ignore[return-value]
    return None


def refuse_quantized_merge(what: str, weights: Iterable[Tensor]) -> None:
    """ValueError if any of ``weights`` (the frozen weights a ``merge`` would fold ``what`` into) is quantized: a
    sum of a quantized weight and a float update has no exact quantized form. Call it before changing anything."""
    for weight in weights:
        kind = quantized_kind(weight)
        if kind is not None:
            raise ValueError(f"cannot merge {what} into an {kind}-quantized base; load the base unquantized to merge")


def dequantized(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A plain ``dtype`` tensor of the values a frozen weight stands for, quantized by quantize_base or not (DoRA's
    row norms need the values themselves, not a matmul with them)."""
    if type(weight) in (Tensor, nn.Parameter):  # a plain weight first: torch.compile traces this, not the MRO walk
        return weight.to(dtype)
    if quantized_kind(weight) == "int8":
        return weight.dequantize().to(dtype)  # FrozenInt8Tensor: qdata * row scale
    return weight.to(dtype)  # a plain tensor, or an NF4Tensor (whose .to(dtype) dequantizes)


def stored_bytes(tensor: Tensor) -> int:
    """Bytes a tensor holds: for a torchao tensor, those of its inner tensors (data, block scales), not of the
    floating-point tensor it stands for (``numel() * element_size()`` would count that)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(stored_bytes(getattr(tensor, name)) for name in names)


def base_linears(model: Transformer) -> Iterator[tuple[str, nn.Linear]]:
    """(module name, linear) of every block linear, bottom layer first: the wrapped ones of a method included
    (LoRA's, V2's hold the frozen weight as their own ``weight``)."""
    for i, block in enumerate(model.layers):
        for owner, names in BASE_LINEARS.items():
            for name in names:
                yield f"layers.{i}.{owner}.{name}", getattr(getattr(block, owner), name)


def quantize_base(model: Transformer, kind: QuantizeKind) -> Transformer:
    """Store the frozen weight of every block linear (attention wq / wk / wv / wo, feed_forward w1 / w2 / w3) as
    ``kind``, in place; returns ``model``.

    nf4: 4-bit NormalFloat, one absmax per 64 values, the absmaxes themselves int8-quantized (4.13 bits per value
    on the 100M bench shape); dequantized to the input's dtype in every matmul. int8: one int8 per value with a
    scale per output row (torchao's weight-only int8, 8.05 bits per value there); relative error of a matmul ~0.4%
    (nf4: ~9%). Quantizing runs where the weights are: torchao's nf4 conversion takes ~1 s per million values on
    one CPU core (2-core VM), so load a large base onto the GPU (``device``) before quantizing.

    Kept as they are, on purpose: the token embeddings (a row lookup, not a matmul: the quantized tensors offer no
    gather, and prompt tuning initialises its soft tokens from these rows), the RMSNorm weights (``dim`` values each;
    V2 scales them), the output projection (QLoRA keeps it in 16 bit too: the logits are the most sensitive matmul,
    and it is ~2% of a 7B model's values), the CLIP tower and everything trainable (``adapter_*``: fp32 master
    weights, untouched). Parameter names do not change, so adapters save and load as on an unquantized base.

    Call it on a materialized model with its base weights loaded (``load_model(..., quantize=kind)`` does); it
    refuses a base that is already quantized. Methods whose ``merge`` folds into the base weights (LoRA, V2's
    scales) refuse to merge afterwards; training and inference of every method work.
    """
    kind = check_kind(kind)
    linears = list(base_linears(model))
    for name, linear in linears:
        weight = linear.weight
        kind_found = quantized_kind(weight)
        if kind_found is not None:
            raise ValueError(f"{name}.weight is already {kind_found}-quantized; quantize an unquantized base")
        if weight.is_meta or weight.requires_grad or not weight.is_floating_point():
            raise ValueError(
                f"{name}.weight must be a loaded, frozen floating-point weight to quantize "
                f"(found {weight.dtype} on {weight.device}, requires_grad={weight.requires_grad})"
            )
    for name, linear in linears:
        weight = linear.weight.detach()
        quantized = _to_nf4(name, weight) if kind == "nf4" else _to_int8(weight)
        linear.weight = nn.Parameter(quantized, requires_grad=False)
    for name, linear in linears:
        if quantized_kind(linear.weight) != kind or linear.weight.requires_grad:
            raise RuntimeError(f"torchao left {name}.weight as {type(linear.weight).__name__}, not frozen {kind}")
    return model


def _to_nf4(name: str, weight: Tensor) -> Tensor:
    """torchao's NF4 tensor of a 2-D weight; ValueError naming the linear when its size has no 64-value blocks."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if weight.numel() % NF4_BLOCK_SIZE:
        raise ValueError(
            f"{name}.weight {tuple(weight.shape)}: nf4 needs a multiple of {NF4_BLOCK_SIZE} values; use int8"
        )
    scaler_block_size = math.gcd(weight.numel() // NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
    return to_nf4(weight.contiguous(), NF4_BLOCK_SIZE, scaler_block_size)


def _to_int8(weight: Tensor) -> Tensor:
    """torchao's weight-only int8 tensor of a weight, as ``quantize_(.., Int8WeightOnlyConfig())`` makes it (int8
    per value, symmetric, one fp32 scale per output row), as a ``FrozenInt8Tensor``."""
    from torchao.quantization import Int8WeightOnlyConfig, PerRow

    granularity = Int8WeightOnlyConfig().granularity
    if not isinstance(granularity, PerRow):  # _Int8Linear multiplies by one scale per output row
        raise RuntimeError(f"torchao's Int8WeightOnlyConfig now quantizes with {granularity}, not per row")
    return _frozen_int8_class().from_hp(weight, granularity)


class _Int8Linear(torch.autograd.Function):
    """``x @ (int8 * scale).T`` for a frozen int8 weight (``qdata`` (out, in), one ``scale`` per output row), with
    the gradient to ``x`` only: it saves the int8 data and the scales, not a float copy of the weight, and casts
    again in the backward pass.

    The arithmetic is torchao 0.18's weight-only ``Int8Tensor`` linear, ``(x @ qdata.T) * scale`` in the matmul's
    dtype (the autocast dtype under autocast, else the input's), returned in the input's dtype; its backward is
    that of those two operations, ``(grad * scale) @ qdata``: the same values autograd computes through torchao's.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        product = torch.mm(x.reshape(-1, x.shape[-1]).to(dtype), qdata.t().to(dtype))  # (N, out)
        ctx.save_for_backward(qdata, scale)
        ctx.dtypes = x.dtype, dtype
        return (product * scale.to(dtype).flatten()).reshape(*x.shape[:-1], -1).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        qdata, scale = ctx.saved_tensors
        x_dtype, dtype = ctx.dtypes
        scaled = grad.reshape(-1, grad.shape[-1]).to(dtype) * scale.to(dtype).flatten()  # (N, out)
        grad_x = torch.mm(scaled, qdata.to(dtype))  # (N, in)
        return grad_x.reshape(*grad.shape[:-1], -1).to(x_dtype), None, None


@functools.cache
def _frozen_int8_class() -> type[Tensor]:
    """``FrozenInt8Tensor``: defined on first use, since its base class is torchao's."""
    from torchao.quantization import Int8Tensor

    class FrozenInt8Tensor(Int8Tensor):
        """torchao's weight-only ``Int8Tensor`` (same inner tensors and attributes: ``qdata``, ``scale``,
        ``zero_point``; every other op inherited) whose ``F.linear`` is ``_Int8Linear``: backward through it keeps
        the int8 weight, not a full-precision copy. For frozen weights only: it gives no gradient to the weight."""

    @FrozenInt8Tensor.implements_torch_function(F.linear)
    def _linear(func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        x, weight, *rest = args
        bias = rest[0] if rest else kwargs.get("bias")
        out = _Int8Linear.apply(x, weight.qdata, weight.scale)
        return out if bias is None else out + bias

    FrozenInt8Tensor.__module__, FrozenInt8Tensor.__qualname__ = __name__, "FrozenInt8Tensor"  # pickled by name
    torch.serialization.add_safe_globals([FrozenInt8Tensor])  # torch.load(weights_only=True) of a state dict
    return FrozenInt8Tensor


def __getattr__(name: str) -> Any:
    """``model.quantize.FrozenInt8Tensor`` (how pickle finds the class) without importing torchao before."""
    if name == "FrozenInt8Tensor":
        return _frozen_int8_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

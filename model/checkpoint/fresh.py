"""Weights without a checkpoint: a random base for presets, a fresh zero-init adapter, and the check that every
tensor left the meta device."""

from __future__ import annotations

import torch

from model.checkpoint.base import base_shapes, fingerprint_sample, fingerprinted_weights, weights_fingerprint
from model.checkpoint.keys import listing
from model.llama import Transformer, is_trainable

INIT_STD = 0.02  # random presets: N(0, 0.02) like transformers' initializer_range; norms at 1


def init_random_base(model: Transformer, *, seed: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Random frozen weights for a preset: N(0, 0.02) matrices and unit norms, drawn on the CPU from ``seed``;
    return their ``weights_fingerprint`` (None on the meta device, where nothing is drawn).

    Drawing on the CPU makes the weights identical on every device, so an adapter trained on a random preset
    on a GPU still fits the same preset loaded on a CPU.
    """
    if device.type == "meta":
        return None
    gen = torch.Generator().manual_seed(seed)
    sampled = fingerprinted_weights(model.config.llama)
    state, samples = {}, {}
    for name, shape in base_shapes(model).items():
        if name.endswith("norm.weight"):
            value = torch.ones(shape)
        else:
            value = torch.empty(shape).normal_(0.0, INIT_STD, generator=gen)
        if name in sampled:
            samples[name] = fingerprint_sample(value)
        state[name] = value.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    return weights_fingerprint(samples)


def init_fresh_adapter(model: Transformer, *, seed: int, device: torch.device) -> None:
    """Materialize the PEFT method's tensors (not the visual projector) on ``device`` in fp32 and give them the
    method's fresh values (``Method.reset_parameters``) drawn from ``seed``: identity at start where the method
    has one (adaption prompts: exactly the base model). fp32 because they are the trained master weights (the
    forward casts them).
    """
    if device.type == "meta":
        return
    state = {
        name: torch.empty(p.shape, device=device)
        for name, p in model.named_parameters()
        if is_trainable(name) and not name.startswith("visual.")
    }
    model.load_state_dict(state, strict=False, assign=True)
    model.method.reset_parameters(model, torch.Generator().manual_seed(seed))


def check_materialized(model: Transformer) -> None:
    """Every parameter and buffer must have left the meta device after loading."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {listing(left)}")

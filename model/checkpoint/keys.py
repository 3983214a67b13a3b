"""Strict key checking: one error listing every missing, unexpected and mis-shaped key of a checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from model.checkpoint.files import CheckpointError

MAX_LISTED = 8  # keys listed per category in an error message


def listing(names: list[str]) -> str:
    """``names`` comma-separated, the first MAX_LISTED of them, then how many more."""
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _lines(items: list[str]) -> list[str]:
    more = [f"    ... and {len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED else []
    return [f"    {item}" for item in items[:MAX_LISTED]] + more


def check_keys(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    source: str | Path,
    what: str,
    origin: dict[str, str] | None = None,
) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys unless ``found`` matches exactly.

    ``origin`` optionally says, per found key, where it came from (file and original key name).
    """
    origin = origin or {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or misshaped):
        return
    at = {k: f"  [{origin[k]}]" if k in origin else "" for k in found}
    lines = [f"{source}: {what} do not match the model"]
    if missing:
        lines += ["  missing keys:", *_lines(missing)]
    if unexpected:
        lines += ["  unexpected keys:", *_lines([f"{k}{at[k]}" for k in unexpected])]
    if misshaped:
        lines += ["  mis-shaped keys (file shape vs model shape):"]
        lines += _lines([f"{k}: {tuple(found[k])} vs {tuple(expected[k])}{at[k]}" for k in misshaped])
    raise CheckpointError("\n".join(lines))


def check_adapter_values(tensors: dict[str, Tensor], source: str | Path) -> None:
    """Adapter tensors must be floating point (an int64 or bool tensor would be cast silently) and finite (a NaN
    prompt makes every answer garbage): CheckpointError naming the file, the tensor and what is wrong."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
            raise CheckpointError(f"{source}: {name} is {kind}; adapter tensors must be floating point")
        if not bool(tensor.isfinite().all()):
            bad = int((~tensor.isfinite()).sum())
            raise CheckpointError(f"{source}: {name} holds {bad:,} non-finite values (NaN or inf); the file is damaged")

"""The Gradio demo: ``python -m app`` serves a multimodal chat tab and an image tab (caption / question).

``build_demo(engine)`` (app/ui.py) builds the app around an ``Engine`` (app/engine.py) that wraps a loaded model,
so tests pass a tiny one; ``launch`` serves it with safe defaults. The model is loaded only in ``app.__main__``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine", "Reply", "Turn", "build_demo", "launch"]

_EXPORTS = {
    "Engine": "app.engine",
    "Reply": "app.engine",
    "Turn": "app.engine",
    "build_demo": "app.ui",
    "launch": "app.ui",
}


def __getattr__(name: str) -> Any:
    """Import on first use (PEP 562): ``python -m app --help`` should not wait for torch and gradio to load."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'app' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""Writing the synthetic datasets: whole folders atomically (into a temporary sibling, then renamed into place), and
the PNG / JSON files inside them."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from data import DataError


def png_bytes(img: Image.Image) -> bytes:
    """The PNG file of ``img``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON at ``path``, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_folder_atomic(root: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary sibling of ``root``, then rename it to ``root`` (absent or empty)."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: already exists and is not an empty folder; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        write(tmp)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root

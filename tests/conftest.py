"""Fixtures shared by several test modules."""

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A real image file outside every dataset folder of a test: what a hostile image path points at."""
    outside = tmp_path / "outside" / "secret.png"
    outside.parent.mkdir()
    Image.new("RGB", (4, 4)).save(outside)
    return outside

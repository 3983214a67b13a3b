"""The embedded default (`python train.py`, `make train`) genuinely learns: the image decides the answer."""

import json

import pytest

import train
from data.synthetic import ensure_scienceqa


@pytest.mark.slow
def test_default_run_learns_image_questions_and_fails_without_images(tmp_path):
    ensure_scienceqa(tmp_path / "sqa")  # the recipe's synthetic data (train.py generates it only at its own place)
    data = ["--data", str(tmp_path / "sqa"), "--run.progress", "false"]
    assert train.main([*data, "--run.out", str(tmp_path / "with")]) == 0
    assert train.main([*data, "--no-images", "--run.out", str(tmp_path / "without")]) == 0
    with_images = json.loads((tmp_path / "with" / "metrics.json").read_text())
    without = json.loads((tmp_path / "without" / "metrics.json").read_text())
    assert with_images["IMG"] >= 90.0, with_images
    # Chance on the synthetic image questions is ~36% (4 colour options, 2 size options): stay near it.
    assert without["IMG"] <= 50.0, without
    assert with_images["counts"]["IMG"]["total"] == without["counts"]["IMG"]["total"] > 100

"""The tiny recipe (`python train.py` with no arguments: synthetic ScienceQA) genuinely learns: the image decides the
answer; and the demo serving it answers the Image tab's examples right. The embedded default of `make train` (the
demo recipe) is tests/test_demo_default.py."""

import json

import pytest

import train
from data.synthetic import ensure_scienceqa


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The tiny recipe trained (with its evaluation) on its synthetic data, generated in a temporary folder
    (train.py generates it only at its own place)."""
    tmp = tmp_path_factory.mktemp("default")
    ensure_scienceqa(tmp / "sqa")
    argv = ["--data", str(tmp / "sqa"), "--run.progress", "false", "--run.out", str(tmp / "with")]
    assert train.main(argv) == 0
    return tmp


@pytest.mark.slow
def test_default_run_learns_image_questions_and_fails_without_images(default_run):
    data = ["--data", str(default_run / "sqa"), "--run.progress", "false"]
    assert train.main([*data, "--no-images", "--run.out", str(default_run / "without")]) == 0
    with_images = json.loads((default_run / "with" / "metrics.json").read_text())
    without = json.loads((default_run / "without" / "metrics.json").read_text())
    assert with_images["IMG"] >= 90.0, with_images
    # Chance on the synthetic image questions is ~36% (4 colour options, 2 size options): stay near it.
    assert without["IMG"] <= 50.0, without
    assert with_images["counts"]["IMG"]["total"] == without["counts"]["IMG"]["total"] > 100


@pytest.mark.slow
def test_the_image_tabs_examples_are_answered_right_by_the_tiny_recipe(default_run):
    """The header says what the run is, and the Image tab's problems with choices are answered right."""
    from app.__main__ import TINY_NOTE, build_parser, load_engine
    from app.ui import IMAGE_EXAMPLES

    engine = load_engine(build_parser().parse_args(["--checkpoint", str(default_run / "with"), "--device", "cpu"]))
    assert engine.about == TINY_NOTE
    greedy = {"temperature": 0.0, "max_new_tokens": 16}
    answers = ["".join(engine.answer(q, image, context, choices.split("\n"), **greedy))
               for image, q, context, choices in IMAGE_EXAMPLES]  # fmt: skip
    assert answers == ["The answer is (A) red", "The answer is (B) small"]  # a big red circle, a small green square

"""data/synthetic_scenes.py: the harder synthetic ScienceQA (scenes of several shapes) in the official layout, whose
answers live in the picture and never in the text, and the data.synthetic_kind setting that asks for it."""

import collections

import numpy as np
import pytest
from PIL import Image

from data import DataError
from data.scienceqa import load_problems
from data.synthetic import COLORS, SCIENCEQA_KINDS, ensure_scienceqa, make_scienceqa, scienceqa_drafts
from data.synthetic_scenes import COUNT_WORDS, SIDES, Scene


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scienceqa(tmp_path_factory.mktemp("s") / "scenes", kind="scenes", n_train=120, n_val=20, n_test=60,
                          image_fraction=0.75)  # fmt: skip


def test_the_scenes_read_as_scienceqa_with_every_group_populated(scenes):
    problems = load_problems(scenes, "train")
    assert len(problems) == 120 and 0.6 < sum(p.has_image for p in problems) / 120 < 0.9
    assert {p.subject for p in problems} == {"natural science", "social science", "language science"}
    assert any(p.hint and p.has_image for p in problems) and any(not p.hint and not p.has_image for p in problems)
    assert (scenes / "synthetic.json").read_text().count('"scenes"') == 1


def test_every_scene_answer_follows_from_the_shapes_drawn():
    drafts = [d for d in scienceqa_drafts(seed=3, n=3000, image_fraction=1.0, kind="scenes")]
    kinds = collections.Counter()
    for d in drafts:
        rec, scene = d.record, d.drawing
        answer = rec["choices"][rec["answer"]]
        if not isinstance(scene, Scene):  # a one-shape problem of the mix
            kinds["one shape"] += 1
            continue
        items, question = scene.items, rec["question"]
        assert len({it.color for it in items}) == len(items)  # distinct colours: a colour names one shape
        if question.startswith("How many"):
            assert answer == COUNT_WORDS[len(items) - 1]
            kinds["count"] += 1
        elif question.startswith("What color is the"):
            (asked,) = [it for it in items if f" the {it.shape} " in question]
            assert answer == asked.color and 2 <= len(items) <= 3
            kinds["color"] += 1
        elif question.startswith("Is the"):
            (asked,) = [it for it in items if f" the {it.color} shape " in question]
            other = next(it for it in items if it is not asked)
            assert answer == SIDES[int(asked.cx > other.cx)] and abs(asked.cy - other.cy) < 0.1
            kinds["side"] += 1
        else:
            top = min(items, key=lambda it: it.cy)
            assert answer == top.shape and abs(items[0].cx - items[1].cx) < 0.1
            kinds["top"] += 1
    assert min(kinds.values()) > 0.12 * len(drafts), kinds


def test_the_text_never_gives_a_scene_answer_away_and_letters_are_balanced():
    records = [d.record for d in scienceqa_drafts(seed=0, n=8000, image_fraction=1.0, kind="scenes")]
    by_question_type = collections.defaultdict(list)
    for rec in records:  # the options of a question type are fixed: only the picture decides
        by_question_type[tuple(rec["choices"])].append(rec["answer"])
    best = sum(max(collections.Counter(a).values()) for a in by_question_type.values()) / len(records)
    chance = np.mean([1 / len(rec["choices"]) for rec in records])
    assert best < chance + 0.03, (best, chance)


def test_the_pictures_show_each_shape_in_its_colour(scenes):
    drafts = scienceqa_drafts(seed=0, n=200, image_fraction=0.75, kind="scenes")
    checked = 0
    for d in drafts:
        if not isinstance(d.drawing, Scene):
            continue
        pixels = np.asarray(d.drawing.render(64).convert("RGB")).astype(int)  # (64, 64, 3)
        for it in d.drawing.items:
            y, x = int(it.cy * 64), int(it.cx * 64)
            y += 3 if it.shape == "triangle" else 0  # a triangle's centre of mass is below its box centre
            assert np.abs(pixels[y, x] - np.array(COLORS[it.color])).sum() < 30, (it, pixels[y, x])
            checked += 1
    assert checked > 100
    image = next(p for p in load_problems(scenes, "test") if p.has_image).image_path
    assert Image.open(image).size == (64, 64)


def test_a_folder_of_another_kind_or_an_unknown_kind_is_refused(tmp_path):
    root = make_scienceqa(tmp_path / "shapes", n_train=4, n_val=2, n_test=2)
    with pytest.raises(DataError, match=r"holds the synthetic ScienceQA of kind 'shapes', not 'scenes'"):
        ensure_scienceqa(root, kind="scenes")
    assert ensure_scienceqa(root) == root
    with pytest.raises(ValueError, match=r"unknown synthetic ScienceQA kind 'maze'; choose from shapes, scenes"):
        scienceqa_drafts(0, 4, kind="maze")
    assert SCIENCEQA_KINDS == ("shapes", "scenes")


def test_the_scenes_recipe_asks_for_them_and_other_tasks_refuse_a_kind():
    from training.cli import parse_args

    cfg = parse_args(["--recipe", "scenes"]).config
    assert cfg.data.synthetic_kind == "scenes" and cfg.data.task == "scienceqa"
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "tiny", "--data.synthetic_kind", "maze"])

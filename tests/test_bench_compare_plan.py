"""bench/compare_plan.py: OUT/settings.json of ``python -m bench methods`` records the paths inside the repository
relative to its root, so that a results folder moved to another checkout (or continued from a git worktree) holds
the same settings; a record written before, with absolute paths, is the same settings where they point to the same
place, and other settings where they do not."""

import argparse
import copy
import json
from pathlib import Path

import pytest

from bench import compare, compare_plan
from bench.measure import ROOT


@pytest.fixture(scope="module")
def planned() -> tuple[compare_plan.Plan, dict]:
    """The embedded default recipe's plan and its settings record."""
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args(["--steps", "2"])
    plan = compare_plan.make_plan(args)
    return plan, compare_plan.settings_record(plan, args.settings)


def strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_the_recipes_base_and_data_are_recorded_relative_to_the_repository(planned):
    plan, settings = planned
    base, data = Path(plan.base.model.base), Path(plan.base.data.path)
    assert base.is_absolute() and data.is_absolute()  # the runs themselves read the full paths
    assert settings["config"]["model"]["base"] == base.relative_to(ROOT).as_posix() == "assets/tiny-base"
    assert settings["config"]["data"]["path"] == data.relative_to(ROOT).as_posix()
    assert not [s for s in strings(settings) if s.startswith(str(ROOT))]  # nothing of this checkout's location
    assert json.loads(json.dumps(settings)) == settings


def test_an_old_record_with_this_checkouts_absolute_paths_is_the_same_settings(planned):
    plan, settings = planned
    old = copy.deepcopy(settings)
    old["config"]["model"]["base"], old["config"]["data"]["path"] = plan.base.model.base, plan.base.data.path
    assert old != settings
    assert compare_plan.recorded_changes(old, settings) == []
    assert compare_plan.recorded_changes(copy.deepcopy(settings), settings) == []  # a record moved here as it is


def test_an_old_record_pointing_elsewhere_is_other_settings(planned):
    _, settings = planned
    old = copy.deepcopy(settings)
    old["config"]["model"]["base"] = "/another/checkout/assets/tiny-base"
    assert compare_plan.recorded_changes(old, settings) == [
        "config.model.base: '/another/checkout/assets/tiny-base' -> 'assets/tiny-base'"
    ]


def test_repo_relative_changes_only_absolute_paths_inside_the_repository():
    inside = str(ROOT / "assets" / "tiny-base")
    value = {"a": inside, "b": [f"{ROOT}/x/../y", "/llama/7B"], "c": "runs/out", "d": 3, "e": None}
    assert compare_plan.repo_relative(value) == {"a": "assets/tiny-base", "b": ["y", "/llama/7B"], "c": "runs/out",
                                                 "d": 3, "e": None}  # fmt: skip

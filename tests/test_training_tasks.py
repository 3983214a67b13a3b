"""training/tasks.py: each task described once (reader, prompt format, images, evaluator, data hint), and what the
training package takes from it."""

import typing

import pytest

from data.alpaca import load_records
from data.alpaca import to_example as alpaca_example
from data.coco import caption_prompt
from data.scienceqa import load_problems, to_example
from data.synthetic import make_alpaca, make_coco, make_scienceqa
from training import TrainingError
from training.batching import load_examples
from training.config import DataArgs, TrainConfig, load_recipe
from training.tasks import TASKS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_scienceqa(root / "scienceqa", n_train=6, n_val=2, n_test=3)
    make_coco(root / "coco", n_train=3, n_restval=1, n_val=1, n_test=1, captions_per_image=2)
    make_alpaca(root / "alpaca.json", n=5)
    return root


def test_every_task_the_settings_allow_is_described_once():
    assert list(TASKS) == list(typing.get_args(typing.get_type_hints(DataArgs)["task"]))
    assert all(task.name == name for name, task in TASKS.items())
    assert {name for name, task in TASKS.items() if task.has_images} == {"scienceqa", "coco", "mix"}
    assert {name for name, task in TASKS.items() if task.evaluator is not None} == {"scienceqa", "mix"}
    assert {name for name, task in TASKS.items() if task.synthetic is not None} == {"scienceqa", "mix"}


def test_the_prompt_format_recorded_is_the_tasks_own_or_the_configured_one():
    assert [TASKS[name].format_of("CQM-A") for name in ("scienceqa", "coco", "alpaca")] == [
        "CQM-A",
        "coco_caption",
        "alpaca",
    ]


def test_each_reader_gives_the_training_examples_of_its_real_format(data):
    sqa = TASKS["scienceqa"].reader(data / "scienceqa", "train", "CQM-A")
    assert sqa == [to_example(p, "CQM-A") for p in load_problems(data / "scienceqa", "train")]
    assert len(sqa) == 6 and sqa[0].prompt.startswith("Context: ")
    coco = TASKS["coco"].reader(data / "coco", "train", "llama_adapter")
    assert len(coco) == (3 + 1) * 2 and {ex.prompt for ex in coco} == {caption_prompt()}
    assert all(ex.image.is_file() for ex in coco)
    alpaca = TASKS["alpaca"].reader(data / "alpaca.json", "train", "llama_adapter")
    assert alpaca == [alpaca_example(r) for r in load_records(data / "alpaca.json")] and len(alpaca) == 5


def test_images_are_used_only_where_the_task_has_them(data):
    assert load_recipe("tiny").uses_images and load_recipe("coco").uses_images
    alpaca = load_recipe("alpaca")
    alpaca.data.images = True
    assert not alpaca.uses_images
    cfg = load_recipe("tiny")
    cfg.data.path, cfg.data.images = str(data / "scienceqa"), False
    assert not cfg.uses_images
    examples = load_examples(cfg, "train")
    assert len(examples) == 6 and all(ex.image is None for ex in examples)


def test_a_missing_data_path_names_what_the_task_needs():
    for recipe, hint in [
        ("scienceqa", "the ScienceQA folder holding problems.json, pid_splits.json and images/"),
        ("coco", "the COCO folder holding dataset_coco.json and the images"),
        ("alpaca", "the alpaca_data.json file"),
    ]:
        cfg = TrainConfig(recipe=recipe, data=DataArgs(task=recipe))
        cfg.model.base = "tiny"
        with pytest.raises(ValueError, match=f"^recipe '{recipe}' needs --data: {hint}$"):
            cfg.check_inputs()


def test_an_unknown_split_is_one_error_naming_the_file_and_split(data):
    cfg = load_recipe("tiny")
    cfg.data.path = str(data / "scienceqa")
    with pytest.raises(TrainingError, match=f"^{data / 'scienceqa' / 'pid_splits.json'}: unknown split 'trian'; "):
        load_examples(cfg, "trian")

"""train.py settings: recipes, the dataclass -> command-line bridge, config.json round trip, schedule, param groups."""

import json
import math

import pytest
import torch

import train
from model import AdapterConfig, load_model
from train import Schedule, TrainConfig, config_from_dict, config_to_dict, parse_args


def resolved(*argv: str) -> TrainConfig:
    return parse_args(list(argv)).config


def usage_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_no_arguments_is_the_tiny_recipe():
    cfg = resolved()
    assert cfg == train.recipe_tiny()
    assert cfg.recipe == "tiny" and cfg.data.task == "scienceqa" and cfg.data.synthetic and cfg.uses_images
    assert cfg.model.visual.clip_model == "tiny" and cfg.run.device == "cpu"
    assert cfg.model.base == str(train.TINY_BASE)


def test_paper_recipes_keep_the_official_defaults():
    base = ["--base", "/llama/7B", "--data", "/data/x"]
    for recipe in ("scienceqa", "coco", "alpaca"):
        cfg = resolved("--recipe", recipe, *base)
        assert cfg.model.adapter == AdapterConfig(prompt_len=10, n_layers=30, gate_fn="tanh")
        assert (cfg.optim.blr, cfg.optim.weight_decay, cfg.optim.betas) == (9e-3, 0.02, (0.9, 0.95))
        assert (cfg.optim.batch_size, cfg.optim.warmup_epochs, cfg.optim.lr) == (4, 2.0, None)
        assert cfg.data.task == recipe
    assert resolved("--recipe", "alpaca", *base).optim.epochs == 5
    assert resolved("--recipe", "scienceqa", *base).model.visual.clip_model == "ViT-L-14-quickgelu"
    assert not resolved("--recipe", "alpaca", *base).uses_images


def test_every_setting_can_be_overridden_by_dotted_name_or_alias():
    cfg = resolved(
        "--optim.lr", "1e-3",
        "--epochs", "3",
        "--model.adapter.prompt_len", "4",
        "--model.visual.feature_layers", "0,1",
        "--optim.betas", "0.8,0.99",
        "--clip", "ViT-B-32",
        "--run.eval", "false",
        "--run.progress",
        "--optim.grad_clip", "none",
        "--no-images",
        "--data", "/somewhere",
        "--seed", "7",
    )  # fmt: skip
    assert cfg.optim.lr == 1e-3 and cfg.optim.epochs == 3 and cfg.model.adapter.prompt_len == 4
    assert cfg.model.visual.feature_layers == (0, 1) and cfg.optim.betas == (0.8, 0.99)
    assert cfg.model.visual.clip_model == "ViT-B-32" and cfg.run.eval is False and cfg.run.progress is True
    assert cfg.optim.grad_clip is None and cfg.data.images is False and not cfg.uses_images
    assert cfg.data.path == "/somewhere" and cfg.run.seed == 7
    # Untouched settings keep the recipe's values.
    assert cfg.optim.batch_size == train.recipe_tiny().optim.batch_size
    assert resolved("--model.visual.feature_layers", "").model.visual.feature_layers == ()


def test_help_prints_every_field_doc_with_the_recipe_value(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--recipe", "alpaca", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for section in ("model", "data", "optim", "run"):
        for s in train.settings(type(getattr(train.recipe_alpaca(), section)), section):
            assert f"--{s.path}" in out
            assert s.doc, f"{s.path} has no docstring"
            assert " ".join(s.doc.split()[:6]) in out
    assert "Base learning rate: lr = blr * effective_batch / 256 (the official V1 scaling rule). [alpaca: 0.009]" in out
    assert "K: learnable prompt vectors per adapted layer. [alpaca: 10]" in out
    assert "--base" in out and "--clip-weights" in out and "--no-images" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim.batch_size", "0"], "optim.batch_size must be >= 1, got 0"),
        (["--optim.lr", "fast"], "argument --optim.lr/--lr: 'fast': expected a number"),
        (["--optim.epochs", "2.5"], "argument --optim.epochs/--epochs: '2.5': expected an integer"),
        (["--optim.betas", "0.9"], "argument --optim.betas: '0.9': expected 2 comma-separated values"),
        (["--run.eval", "maybe"], "argument --run.eval: 'maybe': expected true or false"),
        (["--model.dtype", "int8"], "argument --model.dtype: 'int8': expected one of auto, float32, bfloat16, float16"),
        (["--model.adapter.gate_fn", "sigmoid"], "expected one of tanh, raw"),
        (["--optim.warmup_epochs", "9"], "optim.warmup_epochs must be in [0, epochs=6], got 9.0"),
        (["--model.adapter.prompt_len", "0"], "AdapterConfig.prompt_len must be positive, got 0"),
        (["--recipe", "imagenet"], "invalid choice: 'imagenet'"),
        (["--optim.learning_rate", "1"], "unrecognized arguments: --optim.learning_rate 1"),
        (["--recipe", "coco", "--base", "/b"], "recipe 'coco' needs --data: the COCO folder holding dataset_coco.json"),
        (["--recipe", "alpaca", "--data", "/a.json"], "recipe 'alpaca' needs --base: a Meta or Hugging Face LLaMA"),
    ],
)
def test_bad_settings_give_one_clear_usage_error(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


def test_resume_reads_the_recorded_config_and_applies_overrides(tmp_path, capsys):
    cfg = resolved("--optim.blr", "0.5", "--run.stop_after", "3")
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    again = parse_args(["--resume", str(tmp_path), "--run.log_every", "2"])
    assert again.resume == train.Resume(tmp_path) and again.config.optim.blr == 0.5 and again.config.run.log_every == 2
    assert again.config.run.stop_after is None  # per invocation: a resumed run goes on
    assert again.config.run.out == str(tmp_path)
    assert "drop --recipe" in usage_error(capsys, "--resume", str(tmp_path), "--recipe", "tiny")
    assert "config.json: not found" in usage_error(capsys, "--resume", str(tmp_path / "nothing"))
    (tmp_path / "config.json").write_text(json.dumps({**config_to_dict(cfg), "optimizer": {}}))
    assert "unknown setting(s): optimizer" in usage_error(capsys, "--resume", str(tmp_path))


def test_resume_refuses_changed_settings_naming_old_and_new_values(tmp_path, capsys):
    cfg = resolved("--optim.lr", "0.01")
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    err = usage_error(capsys, "--resume", str(tmp_path), "--lr", "0.02", "--seed", "3", "--run.log_every", "2")
    assert (
        f"--resume {tmp_path} continues the run with the settings of {tmp_path / 'config.json'}; these differ: "
        "--optim.lr 0.01 -> 0.02, --run.seed 0 -> 3. Drop them, or add --allow-changes" in " ".join(err.split())
    )
    # The value it already has, and settings that do not change what is trained, are no change.
    same = parse_args(["--resume", str(tmp_path), "--lr", "0.01", "--optim.batch_size", "8", "--run.eval", "false"])
    assert same.resume == train.Resume(tmp_path) and same.config.optim.batch_size == 8
    allowed = parse_args(["--resume", str(tmp_path), "--lr", "0.02", "--seed", "3", "--allow-changes"])
    assert allowed.resume == train.Resume(
        tmp_path, allow_changes=True, changes={"optim.lr": (0.01, 0.02), "run.seed": (0, 3)}
    )
    assert allowed.config.optim.lr == 0.02 and allowed.config.run.seed == 3
    assert "--allow-changes applies to --resume RUN_DIR only" in usage_error(capsys, "--allow-changes")


def test_config_round_trips_through_json():
    cfg = resolved("--model.visual.feature_layers", "0,2", "--optim.lr", "0.1")
    again = config_from_dict(TrainConfig, json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg and again.model.visual.feature_layers == (0, 2) and again.optim.betas == (0.9, 0.95)
    with pytest.raises(train.ConfigError, match=r"unknown setting\(s\): optim.momentum"):
        config_from_dict(TrainConfig, {"optim": {"momentum": 0.9}})


def test_schedule_warms_up_linearly_then_decays_by_half_cosine():
    s = Schedule(peak_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=12)
    assert [s.lr(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr(4) == 1.0
    assert s.lr(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr(12) == pytest.approx(0.1)
    assert Schedule(1.0, 0.0, 0, 3).lr(0) == 1.0


def test_only_trainable_tensors_are_optimized_and_1d_ones_get_no_decay():
    model = load_model("tiny", adapter_config=AdapterConfig(prompt_len=2, n_layers=2))
    decay, no_decay = train.param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "layers.2.attention.adapter_prompt",
        "layers.3.attention.adapter_prompt",
    ]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "layers.2.attention.adapter_gate",
        "layers.3.attention.adapter_gate",
    ]
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.dtype == torch.float32 for p in decay["params"] + no_decay["params"])


def test_a_recipe_too_deep_for_the_base_names_the_flag_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--recipe", "scienceqa", "--base", "tiny", "--data", str(tmp_path), "--clip", "tiny", "--out", str(out)]
    assert train.main(argv) == 1  # the recipe adapts 30 layers (LLaMA-7B); tiny has 4
    err = capsys.readouterr().err
    assert "AdapterConfig.n_layers=30 exceeds the model's n_layers=4 (set with --model.adapter.n_layers)" in err
    assert not out.exists()


def test_flag_names_are_added_once_per_field():
    message = "VisualConfig.proj_hidden must be positive; AdapterConfig.n_layers and AdapterConfig.n_layers"
    assert train.with_flag_names(message).endswith("(set with --model.visual.proj_hidden, --model.adapter.n_layers)")
    assert train.with_flag_names("no field here") == "no field here"

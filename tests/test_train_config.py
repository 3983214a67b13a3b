"""training.config (config.json round trip), training.optim (schedule, param groups) and how train.py names the flag
of a model setting it refuses. The command line itself: tests/test_training_cli.py."""

import json
import math

import pytest
import torch

import train
from model import LlamaAdapterConfig, load_model
from training.cli import parse_args
from training.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from training.optim import Schedule, param_groups
from training.run import with_flag_names


def test_config_round_trips_through_json():
    cfg = parse_args(["--model.visual.feature_layers", "0,2", "--optim.lr", "0.1"]).config
    again = config_from_dict(TrainConfig, json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg and again.model.visual.feature_layers == (0, 2) and again.optim.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): optim.momentum"):
        config_from_dict(TrainConfig, {"optim": {"momentum": 0.9}})


def test_schedule_warms_up_linearly_then_decays_by_half_cosine():
    s = Schedule(peak_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=12)
    assert [s.lr(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr(4) == 1.0
    assert s.lr(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr(12) == pytest.approx(0.1)
    assert Schedule(1.0, 0.0, 0, 3).lr(0) == 1.0


def test_only_trainable_tensors_are_optimized_and_1d_ones_get_no_decay():
    model = load_model("tiny", adapter_config=LlamaAdapterConfig(prompt_len=2, n_layers=2))
    decay, no_decay = param_groups(model, 0.02)
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
    message = "LlamaAdapterConfig.n_layers=30 exceeds the model's n_layers=4 (set with --model.llama_adapter.n_layers)"
    assert message in err
    assert not out.exists()


def test_flag_names_are_added_once_per_field():
    message = "VisualConfig.proj_hidden must be positive; LlamaAdapterConfig.n_layers and LlamaAdapterConfig.n_layers"
    assert with_flag_names(message).endswith("(set with --model.visual.proj_hidden, --model.llama_adapter.n_layers)")
    assert with_flag_names("no field here") == "no field here"

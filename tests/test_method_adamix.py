"""model/methods/adamix.py: one routed down / up expert pair per step in training, the same on every process; the
experts' average in inference, made permanent by merge(); the documented init; the settings' errors; torchrun with
two processes gives the run of one. (Save / load, cache, padding, gradients and the image:
tests/test_method_contract.py.)"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from model import load_model, save_adapter
from model.methods.adamix import AdaMix, AdaMixConfig, step_route
from model.methods.houlsby import HoulsbyConfig
from tests import test_train_ddp
from tests.test_train_ddp import REPO, args, records

TOKENS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
BOTH = ("attention", "feed_forward")
data = test_train_ddp.data  # the fixture: a synthetic ScienceQA set and its tokenizer, once per module


def mixed(**settings):
    """The tiny preset with an AdaMix of 3 experts in both projections (unless ``settings`` say otherwise) after
    both sublayers of every layer, experts moved off their init."""
    config = AdaMixConfig(**{"n_experts": 3, "bottleneck": 8, "sublayers": BOTH, "shared": "none", **settings})
    model = load_model("tiny", adapter_config=config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def houlsby_with(model, pick):
    """A Houlsby model on the same base whose adapters hold ``pick(stacked tensor, layer, sublayer, kind)``."""
    houlsby = load_model("tiny", adapter_config=HoulsbyConfig(bottleneck=8, activation="gelu"))
    with torch.no_grad():
        for i, (ours, theirs) in enumerate(zip(model.layers, houlsby.layers, strict=True)):
            for s in BOTH:
                for kind in ("down", "down_bias", "up", "up_bias"):
                    stacked = getattr(getattr(ours, f"adapter_{s}"), kind)
                    getattr(getattr(theirs, f"adapter_{s}"), kind).copy_(pick(stacked, i, s, kind))
    return houlsby


def test_a_step_route_depends_on_seed_and_step_only():
    assert step_route(7, 3, 4, 3) == step_route(7, 3, 4, 3)
    assert step_route(7, 3, 4, 3, forward=1) != step_route(7, 3, 4, 3)  # the consistency loss's second pass
    routes = {str(step_route(seed, step, 4, 3)) for seed in (0, 1) for step in range(4)}
    assert len(routes) == 8
    route = torch.tensor(step_route(0, 0, 32, 4))  # (layers, sublayers, down / up)
    assert route.shape == (32, 2, 2) and set(route.flatten().tolist()) == {0, 1, 2, 3}
    assert (route[..., 0] != route[..., 1]).any()  # down and up are drawn independently


def test_training_goes_through_the_routed_down_and_up_expert_and_trains_only_them():
    model = mixed().train()
    model.method.begin_step(5, 11)
    route = step_route(11, 5, 4, 3)
    expected = houlsby_with(
        model, lambda t, i, s, kind: t[route[i][BOTH.index(s)][0 if kind.startswith("down") else 1]]
    ).train()
    logits = model(TOKENS)
    with torch.no_grad():
        assert torch.equal(logits, expected(TOKENS))

    F.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
    for i, block in enumerate(model.layers):
        for s in BOTH:
            down, up = route[i][BOTH.index(s)]
            experts = getattr(block, f"adapter_{s}")
            for kind, chosen in (("down", down), ("down_bias", down), ("up", up), ("up_bias", up)):
                grad = getattr(experts, kind).grad  # (3, ...): zero for the two unrouted experts
                assert [bool(grad[e].any()) for e in range(3)] == [e == chosen for e in range(3)], (i, s, kind)


def test_inference_averages_the_experts_and_merge_keeps_one_expert_with_the_average(tmp_path):
    model = mixed().eval()
    settings = model.config.method
    expected = houlsby_with(model, lambda t, i, s, kind: t.mean(0)).eval()
    with torch.no_grad():
        before = model(TOKENS)
        assert torch.equal(before, expected(TOKENS))
        means = {n: p.mean(0, keepdim=True) for n, p in model.adapter_state_dict().items()}
        model.method.merge(model)
        assert torch.equal(model(TOKENS), before)

    assert model.config.method == dataclasses.replace(settings, n_experts=1) and settings.n_experts == 3
    assert model.method.config is model.config.method
    merged = model.adapter_state_dict()
    assert merged.keys() == means.keys() and all(torch.equal(merged[n], means[n]) for n in means)
    save_adapter(model, tmp_path, base="tiny")
    assert json.loads((tmp_path / "adapter.json").read_text())["model_config"]["method_config"]["n_experts"] == 1
    loaded = load_model("tiny", tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), before)
    assert loaded.describe_trainable() == "8,768 trainable values (experts 8,768)"  # 8 points x (8*64*2 + 8 + 64)


def test_every_expert_starts_from_its_own_near_identity_draw():
    model = load_model("tiny", adapter_config=AdaMixConfig(n_experts=3, bottleneck=8, shared="none"))
    names = [n for n, _ in model.trainable_parameters()]
    assert names == [
        f"layers.{i}.adapter_feed_forward.{k}" for i in range(4) for k in ("down", "down_bias", "up", "up_bias")
    ]
    for block in model.layers:
        experts = block.adapter_feed_forward
        for w in (experts.down, experts.up):
            assert w.abs().max() <= 0.02 and w.std() > 0.005  # truncated N(0, 1e-2)
            assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
        assert not experts.down_bias.any() and not experts.up_bias.any()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(n_experts=0), "AdaMixConfig.n_experts must be positive, got 0"),
        (
            dict(sublayers="feed_forward"),
            "AdaMixConfig.sublayers must be a list of names, got the string 'feed_forward'",
        ),
        (
            dict(sublayers=["ffn"]),
            "AdaMixConfig.sublayers must be distinct names among attention, feed_forward, got ['ffn']",
        ),
        (dict(sublayers=[]), "AdaMixConfig.sublayers must be distinct names among attention, feed_forward, got []"),
        (dict(bottleneck=-1), "AdaMixConfig.bottleneck must be positive, got -1"),
        (dict(activation="tanh"), "AdaMixConfig.activation must be one of relu, gelu, silu, got 'tanh'"),
    ],
)
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError) as e:
        AdaMixConfig(**settings)
    assert str(e.value) == message


def test_the_7b_defaults_count():
    model = load_model("7B", adapter_config=AdaMixConfig(), device="meta")
    # 32 FFN points x (4 down experts x (4096*16 + 16) + one shared up-projection 16*4096 + 4096)
    assert model.describe_trainable() == (
        "10,618,880 trainable values (experts 8,390,656, shared up-projections 2,228,224)"
    )
    unshared = load_model("7B", adapter_config=AdaMixConfig(shared="none"), device="meta")
    # 32 FFN points x 4 experts x (4096*16 + 16 + 16*4096 + 4096); merged: a quarter
    assert unshared.describe_trainable() == "17,303,552 trainable values (experts 17,303,552)"


def test_two_processes_match_one_with_the_same_global_batch_and_routes_change_every_step(data, tmp_path, monkeypatch):
    adamix = ["--model.method", "adamix", "--model.adamix.n_experts", "3", "--model.adamix.bottleneck", "4",
              "--model.adamix.sublayers", "[attention, feed_forward]", "--model.adamix.shared", "none",
              "--model.adamix.freeze_unrouted", "true", "--run.seed", "5"]  # fmt: skip
    steps = []
    begin_step = AdaMix.begin_step
    monkeypatch.setattr(
        AdaMix, "begin_step", lambda self, step, seed: (steps.append((step, seed)), begin_step(self, step, seed))
    )
    single, double = tmp_path / "single", tmp_path / "double"
    assert train.main([*args(data, single, batch_size=4), *adamix]) == 0
    assert steps == [(0, 0)] + [(step, 5) for step in range(16)]  # the constructor's, then one per optimizer step

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, str(REPO / "train.py"), *args(data, double, batch_size=2), *adamix],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = records(single), records(double)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 17))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=0
    )
    a, b = load_file(single / "adapter.safetensors"), load_file(double / "adapter.safetensors")
    assert a.keys() == b.keys() and a["layers.0.adapter_attention.down"].shape == (3, 4, 64)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)

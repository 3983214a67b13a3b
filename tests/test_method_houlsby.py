"""model/methods/houlsby.py: a bottleneck after each sublayer before the residual addition, the two documented inits,
the adapted layers, the settings' errors and the 7B size. (Identity at init, save / load, cache, padding, gradients
and the image: tests/test_method_contract.py.)"""

import pytest
import torch
import torch.nn.functional as F

from model import load_model
from model.llama import AttentionContext
from model.methods import Method
from model.methods.houlsby import Houlsby, HoulsbyConfig


def randomize(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def reference_adapter(out, adapter, activation):
    """W_up f(W_down out + b_down) + b_up written out with matmuls."""
    h = activation(out @ adapter.down.T + adapter.down_bias)  # (B, T, m)
    return h @ adapter.up.T + adapter.up_bias  # (B, T, dim)


@pytest.mark.parametrize(("name", "activation"), [("silu", F.silu), ("relu", F.relu), ("gelu", F.gelu)])
def test_a_bottleneck_follows_each_sublayer_before_the_residual_addition(name, activation):
    model = load_model("tiny", adapter_config=HoulsbyConfig(bottleneck=8, activation=name, n_layers=2))
    randomize(model)
    block, x = model.layers[3], torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    rope_cos, rope_sin = model.rope(x.device)
    cos, sin = rope_cos[:5][None, :, None], rope_sin[:5][None, :, None]
    plain = AttentionContext(cos, sin, None, True, None, Method(None, model.config.llama), None)
    with torch.no_grad():
        a = block.attention(block.attention_norm(x), plain)
        h = x + a + reference_adapter(a, block.adapter_attention, activation)
        f = block.feed_forward(block.ffn_norm(h))
        expected = h + f + reference_adapter(f, block.adapter_feed_forward, activation)
        ours = block(x, AttentionContext(cos, sin, None, True, None, model.method, None))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_only_the_top_n_layers_carry_adapters_of_the_set_width():
    model = load_model("tiny", adapter_config=HoulsbyConfig(bottleneck=8, n_layers=2))
    shapes = {n: tuple(p.shape) for n, p in model.trainable_parameters()}
    assert shapes == {
        f"layers.{i}.adapter_{s}.{t}": shape
        for i in (2, 3)
        for s in ("attention", "feed_forward")
        for t, shape in (("down", (8, 64)), ("down_bias", (8,)), ("up", (64, 8)), ("up_bias", (64,)))
    }
    assert model.describe_trainable() == (
        "4,384 trainable values (attention adapters 2,192, FFN adapters 2,192)"  # per kind: 2 x (8*64*2 + 8 + 64)
    )


def test_zero_init_is_truncated_normal_down_and_zero_up_and_the_near_identity_init_draws_up_too():
    zero = load_model("tiny", adapter_config=HoulsbyConfig(), seed=3)
    near = load_model("tiny", adapter_config=HoulsbyConfig(zero_init=False), seed=3)
    for model in (zero, near):
        for block in model.layers:
            for adapter in (block.adapter_attention, block.adapter_feed_forward):
                assert adapter.down.abs().max() <= 0.02 and adapter.down.std() > 0.005  # N(0, 1e-2), cut at 2 std
                assert not adapter.down_bias.any() and not adapter.up_bias.any()
    assert not any(b.adapter_attention.up.any() or b.adapter_feed_forward.up.any() for b in zero.layers)
    for block in near.layers:
        for up in (block.adapter_attention.up, block.adapter_feed_forward.up):
            assert up.abs().max() <= 0.02 and up.std() > 0.005
    assert torch.equal(zero.layers[0].adapter_attention.down, near.layers[0].adapter_attention.down)  # same seed

    tokens = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (near(tokens) - zero(tokens)).abs().max().item()
    assert 0 < diff < 0.05  # near-identity: a small random term at start


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(bottleneck=0), "HoulsbyConfig.bottleneck must be positive, got 0"),
        (dict(activation="tanh"), "HoulsbyConfig.activation must be one of relu, gelu, silu, got 'tanh'"),
        (dict(n_layers=0), "HoulsbyConfig.n_layers must be positive or None (all layers), got 0"),
        (dict(visual_layers=-1), "HoulsbyConfig.visual_layers must be an integer >= 0, got -1"),
    ],
)
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError) as e:
        HoulsbyConfig(**settings)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(n_layers=5), "HoulsbyConfig.n_layers=5 exceeds the model's n_layers=4"),
        (dict(visual_layers=5), "HoulsbyConfig.visual_layers=5 exceeds the model's n_layers=4"),
    ],
)
def test_layers_beyond_the_model_are_refused(settings, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        load_model("tiny", adapter_config=HoulsbyConfig(**settings))


def test_the_adapters_do_not_fold_and_the_7b_defaults_count():
    assert Houlsby.merge is Method.merge  # a nonlinearity between the projections: nothing to fold
    model = load_model("7B", adapter_config=HoulsbyConfig(), device="meta")
    # 64 adapters x (4096*64 + 64 + 64*4096 + 4096), biases included
    assert model.describe_trainable() == (
        "33,820,672 trainable values (attention adapters 16,910,336, FFN adapters 16,910,336)"
    )


def block_by_hand(block, x, cos, sin, model, *, sublayers, parallel, scale, activation=F.silu):
    """One block with bottlenecks written out: serial out + s * A(out), parallel out + s * A(norm(x))."""
    plain = AttentionContext(cos, sin, None, True, None, Method(None, model.config.llama), None)

    def adapted(name, z_in, out):
        if name not in sublayers:
            return out
        z = z_in if parallel else out
        return out + scale * reference_adapter(z, getattr(block, f"adapter_{name}"), activation)

    a_in = block.attention_norm(x)
    h = x + adapted("attention", a_in, block.attention(a_in, plain))
    f_in = block.ffn_norm(h)
    return h + adapted("feed_forward", f_in, block.feed_forward(f_in))


@pytest.mark.parametrize(
    ("settings", "sublayers", "parallel", "scale"),
    [
        (dict(sublayers=("feed_forward",)), ("feed_forward",), False, 1.0),  # Pfeiffer: after the FFN only
        (dict(placement="parallel"), ("attention", "feed_forward"), True, 4.0),  # He et al.: s = 4
        (dict(placement="parallel", sublayers=("feed_forward",), scaling=2.5), ("feed_forward",), True, 2.5),
        (dict(scaling=0.5), ("attention", "feed_forward"), False, 0.5),
    ],
)
def test_pfeiffer_and_parallel_placements_follow_their_formulas(settings, sublayers, parallel, scale):
    model = load_model("tiny", adapter_config=HoulsbyConfig(bottleneck=8, n_layers=2, **settings))
    randomize(model)
    assert {n.split(".")[2] for n, _ in model.trainable_parameters()} == {f"adapter_{s}" for s in sublayers}
    block, x = model.layers[3], torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    rope_cos, rope_sin = model.rope(x.device)
    cos, sin = rope_cos[:5][None, :, None], rope_sin[:5][None, :, None]
    with torch.no_grad():
        expected = block_by_hand(block, x, cos, sin, model, sublayers=sublayers, parallel=parallel, scale=scale)
        ours = block(x, AttentionContext(cos, sin, None, True, None, model.method, None))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_trained_norms_start_as_the_base_weights_and_replace_them():
    model = load_model("tiny", adapter_config=HoulsbyConfig(bottleneck=8, n_layers=2, train_norms=True), seed=1)
    names = {n for n, _ in model.trainable_parameters() if "norm" in n}
    assert names == {f"layers.{i}.{k}.adapter_norm_weight" for i in (2, 3) for k in ("attention_norm", "ffn_norm")} | {
        "norm.adapter_norm_weight"
    }
    norm = model.layers[2].ffn_norm
    assert torch.equal(norm.adapter_norm_weight, norm.weight) and not norm.weight.requires_grad
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        norm.adapter_norm_weight.mul_(2.0)
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        torch.testing.assert_close(norm(x), x_hat * 2 * norm.weight, atol=1e-6, rtol=0)  # used in place of w
    assert model.describe_trainable() == (
        "4,704 trainable values (norm weights 320, attention adapters 2,192, FFN adapters 2,192)"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(sublayers=("ffn",)), "HoulsbyConfig.sublayers must be distinct names among attention, feed_forward"),
        (dict(sublayers="feed_forward"), "HoulsbyConfig.sublayers must be a list of names, got the string"),
        (dict(placement="beside"), "HoulsbyConfig.placement must be 'serial' or 'parallel', got 'beside'"),
        (dict(scaling="4"), "HoulsbyConfig.scaling must be a number or None, got '4'"),
        (dict(train_norms=1), "HoulsbyConfig.train_norms must be true or false, got 1"),
    ],
)
def test_bad_placement_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        HoulsbyConfig(**settings)

"""model/methods/llama_adapter_v2.py: LLaMA-Adapter V2 on the shipped tiny base, as the official V2 code defines it:
identity at init, the bias / scale formula of the official code, the norm scales, merge, and early / late image
entry."""

import pytest
import torch

from model import ModelConfig, load_model, save_adapter
from model.checkpoint import open_base
from model.llama import Transformer
from model.methods.llama_adapter_v2 import AdapterV2Config, V2Linear
from tests.test_method_contract import TINY_BASE, images, perturb, tokens_of

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
PROMPT = "Question: What color is the ball?\nAnswer:"


def make(*, images: bool = True, **settings) -> Transformer:
    """The tiny base (4 layers) with a fresh V2 adapter on its top 3 layers, every linear tuned by default."""
    config = AdapterV2Config(prompt_len=4, n_layers=3, **{"bias_targets": ALL_LINEARS, **settings})
    return load_model(TINY_BASE, adapter_config=config, clip="tiny" if images else None).eval()


def plain_base(model: Transformer) -> Transformer:
    """The tiny base without any method, for ``model``'s architecture."""
    base = Transformer(ModelConfig(llama=model.config.llama, method=None)).eval()
    open_base(TINY_BASE).load_into(base, dtype=None, device=torch.device("cpu"))
    return base


@pytest.mark.parametrize("entry", ["early", "late"])
def test_a_fresh_adapter_with_an_image_is_exactly_the_base_model(entry):
    model = make(visual_entry=entry)
    tokens = tokens_of(model, PROMPT)
    with torch.no_grad():
        assert torch.equal(model(tokens, images(1)), plain_base(model)(tokens))
    linear = model.layers[0].feed_forward.w2
    assert torch.equal(linear.adapter_bias, torch.zeros(64)) and torch.equal(linear.adapter_scale, torch.ones(176))
    assert torch.equal(model.norm.adapter_norm_scale, torch.ones(64))


def test_every_linear_and_norm_is_tuned_and_the_frozen_weights_keep_their_meta_names():
    model = make(images=False)
    trainable = {n for n, _ in model.trainable_parameters()}
    assert len(trainable) == 4 * 7 * 2 + (4 * 2 + 1) + 3 * 2  # bias+scale per linear, norm scales, prompts+gates
    assert {"layers.0.attention.wk.adapter_scale", "layers.3.feed_forward.w2.adapter_bias"} <= trainable
    assert {"layers.2.ffn_norm.adapter_norm_scale", "norm.adapter_norm_scale"} <= trainable
    assert "layers.0.attention.adapter_prompt" not in trainable  # prompts on the top 3 of 4 layers only
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"layers.0.attention.wk.weight", "layers.1.attention_norm.weight", "norm.weight"} <= frozen


def test_the_default_targets_are_the_v2_multimodal_releases_biased_linears():
    model = load_model(TINY_BASE, adapter_config=AdapterV2Config(prompt_len=4, n_layers=3))
    assert AdapterV2Config().n_layers == 31  # query_layer=31 of the release
    tuned = {n.rsplit(".", 2)[-2] for n, _ in model.trainable_parameters() if n.endswith(".adapter_bias")}
    assert tuned == {"wq", "wo", "w1", "w2", "w3"}  # no bias on wk / wv in llama_adapter_v2_multimodal7b


def test_seven_b_trainable_count_on_meta_device():
    model = load_model("7B", adapter_config=AdapterV2Config(), device="meta")
    assert model.describe_trainable() == (
        "3,511,264 trainable values (scales 876,544, biases 1,097,728, norm scales 266,240, prompts 1,269,760, "
        "gates 992)"
    )


def test_a_linear_follows_the_official_code_scale_before_bias_after():
    """chat65b's forward_linear_with_scale_and_bias: y = W (s * x) + b (the paper's s * (W x + b) differs)."""
    linear = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]))
    tuned = V2Linear(linear, bias=True, scale=True, lora_rank=0)
    assert tuned.weight is linear.weight
    with torch.no_grad():
        tuned.adapter_scale.copy_(torch.tensor([2.0, 0.5, -1.0]))
        tuned.adapter_bias.copy_(torch.tensor([0.5, -0.25]))
        y = tuned(torch.tensor([[1.0, 2.0, 3.0]]))
    assert y.tolist() == [[4.5, -10.25]]  # W @ [2, 1, -3] = [4, -10], plus b


def test_a_norm_scale_multiplies_the_frozen_norm_weight():
    model = make(images=False)
    norm = model.layers[1].ffn_norm
    norm.eps = 0.0
    x = torch.tensor([2.0, -2.0] * 32)[None, None]  # (1, 1, 64): normalises to +-1 exactly
    with torch.no_grad():
        norm.weight.copy_(torch.arange(64.0))
        norm.adapter_norm_scale.copy_(torch.full((64,), 0.5))
        out = norm(x)
    assert out.flatten().tolist() == [i * 0.5 * (-1) ** i for i in range(64)]


def test_prompt_keys_and_values_go_through_the_tuned_wk_and_wv():
    """As chat65b: the prompts (plus the image) pass the same scale and bias as the tokens."""
    model = make()
    perturb(model)
    attention, visual = model.layers[3].attention, torch.randn(2, 1, 64)
    k, v = model.method.prompt_kv(attention, visual)  # (2, nkv, K, hd)
    prompts = attention.adapter_prompt[None] + visual  # (2, K, dim)
    for got, linear in ((k, attention.wk), (v, attention.wv)):
        expected = (prompts * linear.adapter_scale) @ linear.weight.T + linear.adapter_bias  # (2, K, nkv * hd)
        assert torch.allclose(got.transpose(1, 2).flatten(2), expected, atol=1e-6)


def test_merge_folds_the_scales_keeps_the_biases_and_the_logits():
    model = make()
    perturb(model)
    tokens, pixels = tokens_of(model, PROMPT), images(1)
    w1, bias = model.layers[2].feed_forward.w1, model.layers[2].feed_forward.w1.adapter_bias.clone()
    expected_w1 = w1.weight * w1.adapter_scale[None, :]
    with torch.no_grad():
        before = model(tokens, pixels)
        model.method.merge(model)
        after = model(tokens, pixels)
    assert (before - after).abs().max().item() <= 1e-5
    assert torch.equal(w1.weight, expected_w1) and torch.equal(w1.adapter_bias, bias)
    scales = [p for n, p in model.trainable_parameters() if n.endswith("scale")]
    assert len(scales) == 4 * 7 + 9 and all(torch.equal(s, torch.ones_like(s)) for s in scales)


def test_merge_refuses_a_non_float_base_and_changes_nothing():
    model = make(images=False)
    perturb(model)
    wq = model.layers[0].attention.wq
    wq.weight = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.int8), requires_grad=False)
    scale = wq.adapter_scale.clone()
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.weight \(torch\.int8\)"):
        model.method.merge(model)
    assert torch.equal(wq.adapter_scale, scale) and torch.equal(wq.weight, torch.ones(64, 64, dtype=torch.int8))


def test_early_and_late_entry_both_let_the_image_change_the_output():
    tokens, pixels = tokens_of(make(images=False), PROMPT), images(1)
    outputs = {}
    for entry in ("early", "late"):
        model = make(visual_entry=entry)
        perturb(model)  # open gates: the prompts, and the image added to them, now count
        with torch.no_grad():
            outputs[entry] = model(tokens, pixels)
            assert (outputs[entry] - model(tokens)).abs().max().item() > 1e-3
            # early: only the lowest adapted layer's prompts (layer 1) carry the image
            state = model.method.sequence_state(model, model.visual_prompt(pixels))
            text_only = model.method.sequence_state(model, None)
        carry_image = [i for i in (1, 2, 3) if not torch.equal(state[i][0], text_only[i][0])]
        assert carry_image == ([1] if entry == "early" else [1, 2, 3])
    assert (outputs["early"] - outputs["late"]).abs().max().item() > 1e-3


def test_save_and_load_keep_the_settings(tmp_path):
    model = make(bias_targets=("wk", "w2"), visual_entry="early", early_layers=2)
    perturb(model)
    save_adapter(model, tmp_path, base=TINY_BASE)
    loaded = load_model(TINY_BASE, tmp_path)
    assert loaded.config.method == model.config.method
    assert loaded.config.method.bias_targets == ("wk", "w2")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(bias_targets=("wq", "lm_head")), r"AdapterV2Config\.bias_targets=\['wq', 'lm_head'\]"),
        (dict(bias_targets=("wq", "wq")), r"AdapterV2Config\.bias_targets=\['wq', 'wq'\]: .* each at most once"),
        (dict(visual_entry="middle"), r"AdapterV2Config\.visual_entry must be 'early' or 'late', got 'middle'"),
        (dict(visual_entry="early", early_layers=4), r"AdapterV2Config\.early_layers=4 exceeds n_layers=3"),
        (dict(early_layers=0), r"AdapterV2Config\.early_layers must be >= 1, got 0"),
        (dict(prompt_len=0), r"AdapterV2Config\.prompt_len must be positive, got 0"),
    ],
)
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        AdapterV2Config(**{"n_layers": 3, **settings})


def test_too_many_adapted_layers_for_the_base_name_the_field():
    with pytest.raises(ValueError, match=r"AdapterV2Config\.n_layers=31 exceeds the model's n_layers=4"):
        load_model(TINY_BASE, adapter_config=AdapterV2Config())

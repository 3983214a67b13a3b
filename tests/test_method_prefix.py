"""model/methods/prefix.py: PEFT PREFIX_TUNING parity (GQA, keys in transformers' order, tokens at positions from
P), merge() to the prefixes alone and what is saved then, the image in the prefixes, the documented init, settings
and their 7B counts."""

import json
import math

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from model import CheckpointError, load_model, save_adapter
from model.methods.prefix import PrefixConfig
from tests.test_checkpoint import LAYERS, VOCAB, make_hf_model

TOL = dict(atol=1e-4, rtol=0)
# PEFT 0.21 calls transformers 5 API that is deprecated; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),  # PEFT passes them so
]
TOKENS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def peft_prefix(tmp_path_factory):
    """The tiny GQA LlamaForCausalLM saved as a base, and a PEFT prefix-tuning model on it (P=5 through a width-16
    MLP) with random weights, saved; with the base's and PEFT's logits."""
    root = tmp_path_factory.mktemp("prefix")
    hf = make_hf_model()
    hf.save_pretrained(root / "hf")
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16
    )
    peft_model = get_peft_model(make_hf_model(), config).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
        base_logits, peft_logits = hf(TOKENS).logits, peft_model(TOKENS).logits
    peft_model.save_pretrained(root / "peft")
    return root, base_logits, peft_logits


def test_peft_prefix_tuning_gives_the_peft_logits(peft_prefix):
    root, base_logits, expected = peft_prefix
    model = load_model(root / "hf", adapter=root / "peft")
    assert model.config.method == PrefixConfig(prefix_len=5, reparameterize=False)  # PEFT saves only the prefixes
    kv_dim = model.config.llama.n_kv_heads * model.config.llama.head_dim
    assert {n: tuple(t.shape) for n, t in model.adapter_state_dict().items()} == {
        f"layers.{i}.attention.adapter_prefix_{kind}": (5, kv_dim) for i in range(LAYERS) for kind in ("key", "value")
    }
    with torch.no_grad():
        logits = model(TOKENS)
    torch.testing.assert_close(logits, expected, **TOL)
    assert (logits - base_logits).abs().max() > 1e-1  # the prefixes really change the output


def test_peft_directory_for_another_base_or_of_another_shape_is_refused(peft_prefix, tmp_path):
    root = peft_prefix[0]
    peft_config = json.loads((root / "peft" / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**peft_config, "num_layers": 2}))
    save_file(load_file(root / "peft" / "adapter_model.safetensors"), tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter_config.json: num_layers=2; this base needs 3"):
        load_model(root / "hf", adapter=tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**peft_config, "num_virtual_tokens": 4}))
    with pytest.raises(
        CheckpointError, match=r"adapter_model.safetensors: prompt_embeddings has shape \(5, 192\); exp"
    ):
        load_model(root / "hf", adapter=tmp_path)


def trained(config: PrefixConfig, *, clip: str | None = "tiny") -> torch.nn.Module:
    """The tiny preset with a prefix adapter whose tensors moved away from their init (as training would)."""
    model = load_model("tiny", adapter_config=config, clip=clip)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_merge_keeps_the_outputs_and_then_only_the_prefixes_are_saved(tmp_path):
    model = trained(PrefixConfig(prefix_len=4, n_layers=2, mlp_hidden=16))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = TOKENS % model.config.llama.vocab_size
    save_adapter(model, tmp_path / "training", base="tiny")  # the training form saves its prefixes, not its MLP
    saved_in_training = load_file(tmp_path / "training" / "adapter.safetensors")
    with torch.no_grad():
        before = model(tokens, pixels)
        model.method.merge(model)
        after = model(tokens, pixels)
    assert (after - before).abs().max().item() <= 1e-5
    assert model.config.method == PrefixConfig(prefix_len=4, n_layers=2, mlp_hidden=16, reparameterize=False)
    assert not any("adapter_mlp" in n or "adapter_embedding" in n for n, _ in model.named_parameters())

    save_adapter(model, tmp_path / "merged", base="tiny")
    saved = load_file(tmp_path / "merged" / "adapter.safetensors")
    assert saved.keys() == saved_in_training.keys() and all(torch.equal(saved[n], saved_in_training[n]) for n in saved)
    assert {n for n in saved if not n.startswith("visual.")} == {
        f"layers.{i}.attention.adapter_prefix_{kind}" for i in (2, 3) for kind in ("key", "value")
    }  # the top 2 of 4 layers; the visual projection beside them
    loaded = load_model("tiny", tmp_path / "merged")
    assert loaded.config.method.reparameterize is False
    with torch.no_grad():
        assert torch.equal(loaded(tokens, pixels), after)


def test_the_image_enters_every_prefix_and_text_only_items_add_nothing():
    model = trained(PrefixConfig(prefix_len=3, mlp_hidden=8)).eval()
    tokens = TOKENS[:1].repeat(2, 1) % model.config.llama.vocab_size  # the same text twice
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text_only = model(tokens)
        mixed = model(tokens, pixels, image_mask=torch.tensor([True, False]))
        state = model.method.sequence_state(model, model.visual_prompt(pixels))
    assert torch.equal(mixed[1], text_only[1])  # a zero visual row adds exactly nothing
    assert (mixed[0] - text_only[0]).abs().max() > 1e-3
    visual = model.visual_prompt(pixels)
    attention, (_, v) = model.layers[1].attention, model.method.prefixes(model)[1]
    expected = (v[None] + attention.wv(visual)[:, None]).view(2, 3, 2, -1).transpose(1, 2)  # (B, nkv, P, hd)
    torch.testing.assert_close(state[1][1], expected, rtol=0, atol=1e-6)  # I_p through wv, on every prefix value


def test_a_fresh_adapter_has_the_documented_init():
    model = load_model("tiny", adapter_config=PrefixConfig(prefix_len=4, mlp_hidden=16), seed=5)
    method = model.method
    g = torch.Generator().manual_seed(5)
    assert torch.equal(method.adapter_embedding, torch.randn(4, model.config.llama.dim, generator=g))  # N(0, 1)
    for linear in (method.adapter_mlp[0], method.adapter_mlp[2]):
        bound = 1 / math.sqrt(linear.in_features)  # nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PEFT
        for p in (linear.weight, linear.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    direct = load_model("tiny", adapter_config=PrefixConfig(prefix_len=4, reparameterize=False), seed=5)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(direct.layers[0].attention.adapter_prefix_key, torch.randn(4, 32, generator=g))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(prefix_len=0), "PrefixConfig.prefix_len must be positive, got 0"),
        (dict(n_layers=0), r"PrefixConfig.n_layers must be positive or None \(every layer\), got 0"),
        (dict(mlp_hidden=-1), "PrefixConfig.mlp_hidden must be positive, got -1"),
    ],
)
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        PrefixConfig(**settings)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(n_layers=5), "PrefixConfig.n_layers=5 exceeds the model's n_layers=4"),
        (dict(prefix_len=1024), "PrefixConfig.prefix_len=1024 must be below max_seq_len=512"),
    ],
)
def test_settings_that_do_not_fit_the_base_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        load_model("tiny", adapter_config=PrefixConfig(**settings), device="meta")


def test_trainable_values_at_7b():
    """README figures: P=10 on every layer; the MLP of width 128 while training, the prefixes alone after merge."""
    training = load_model("7B", adapter_config=PrefixConfig(), device="meta")
    assert (
        training.describe_trainable() == "34,381,952 trainable values (prefix embedding 40,960, prefix MLP 34,340,992)"
    )
    merged = load_model("7B", adapter_config=PrefixConfig(reparameterize=False), device="meta")
    assert merged.describe_trainable() == "2,621,440 trainable values (prefixes 2,621,440)"

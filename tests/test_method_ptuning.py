"""model/methods/ptuning.py: PEFT parity of the imported soft tokens and of our prompt encoders (MLP, LSTM) with
PEFT's PromptEncoder, merge() keeping only the encoder's output, the init, config errors, the 7B count. The
registry-wide contract is tests/test_method_contract.py; the soft-token backbone hook is tested with prompt tuning
(tests/test_method_prompt.py)."""

import json
import math

import pytest
import torch
from peft import PromptEncoderConfig, get_peft_model
from safetensors.torch import load_file

from model import load_model, save_adapter
from model.methods.ptuning import PTuningConfig
from tests.test_checkpoint import make_hf_model
from tests.test_method_contract import TINY_BASE, images, perturb
from tests.test_method_prompt import TOKENS, TOL, peft_parity

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_peft_ptuning_gives_the_peft_logits(tmp_path, encoder):
    peft_config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16, encoder_reparameterization_type=encoder
    )
    model, expected = peft_parity(peft_config, tmp_path)
    assert model.config.method == PTuningConfig(n_tokens=5, encoder="none")  # PEFT saved the encoder's output
    assert [n for n, _ in model.trainable_parameters()] == ["method.adapter_soft_tokens"]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected, **TOL)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_our_encoder_with_peft_weights_gives_peft_soft_tokens(encoder):
    """The same module layout as PEFT's PromptEncoder: its weights under our names give its output."""
    peft_config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        encoder_hidden_size=16,
        encoder_reparameterization_type=encoder.upper(),
    )
    peft_model = get_peft_model(make_hf_model(), peft_config).eval()
    peft_encoder = peft_model.prompt_encoder["default"]
    ours = {"embedding.weight": "adapter_encoder_input", "lstm_head.": "adapter_lstm.", "mlp_head.": "adapter_mlp."}
    state = {}
    for name, value in peft_encoder.state_dict().items():
        key = next(k for k in ours if name.startswith(k))
        state[name.replace(key, ours[key], 1)] = value
    model = load_model(TINY_BASE, adapter_config=PTuningConfig(n_tokens=5, encoder=encoder, encoder_hidden=16))
    model.method.load_state_dict(state)  # strict: every tensor has its counterpart
    with torch.no_grad():
        expected = peft_encoder(torch.arange(5)[None])[0]  # (P, dim)
        torch.testing.assert_close(model.method.encode(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_merge_keeps_only_the_encoder_output_and_the_logits(tmp_path, encoder):
    settings = dict(n_tokens=4, encoder=encoder, encoder_hidden=16)
    model = load_model(TINY_BASE, adapter_config=PTuningConfig(**settings), clip="tiny").eval()
    perturb(model)
    pixels = images(1)
    tokens = TOKENS[:1]
    with torch.no_grad():
        before, soft = model(tokens, pixels), model.method.encode().clone()
        model.method.merge(model)
        torch.testing.assert_close(model(tokens, pixels), before, atol=1e-5, rtol=0)
    assert model.config.method == model.method.config == PTuningConfig(n_tokens=4, encoder="none", encoder_hidden=16)
    assert torch.equal(model.method.adapter_soft_tokens, soft)
    assert {n for n, _ in model.trainable_parameters() if not n.startswith("visual.")} == {"method.adapter_soft_tokens"}
    save_adapter(model, tmp_path, base=TINY_BASE)
    saved = load_file(tmp_path / "adapter.safetensors")
    assert saved.keys() == {"method.adapter_soft_tokens", *(n for n in saved if n.startswith("visual."))}
    assert json.loads((tmp_path / "adapter.json").read_text())["model_config"]["method_config"]["encoder"] == "none"
    with torch.no_grad():
        assert torch.equal(load_model(TINY_BASE, tmp_path)(tokens, pixels), model(tokens, pixels))


def test_init_is_peft_s():
    model = load_model(TINY_BASE, adapter_config=PTuningConfig(n_tokens=3, encoder_hidden=16), seed=4)
    method = model.method
    assert torch.equal(method.adapter_encoder_input, torch.randn(3, 64, generator=torch.Generator().manual_seed(4)))
    for linear in method.adapter_mlp[::2]:
        bound = 1 / math.sqrt(linear.in_features)
        for p in (linear.weight, linear.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert [type(m).__name__ for m in method.adapter_mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    lstm = load_model(TINY_BASE, adapter_config=PTuningConfig(n_tokens=3, encoder="lstm", encoder_hidden=16)).method
    assert all(p.abs().max() <= 1 / 4 for p in lstm.adapter_lstm.parameters())  # U(-1/sqrt(h), 1/sqrt(h))
    assert lstm.adapter_lstm.bidirectional and lstm.adapter_lstm.num_layers == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(n_tokens=-1), "PTuningConfig.n_tokens must be positive, got -1"),
        (dict(encoder="gru"), "PTuningConfig.encoder must be 'mlp', 'lstm' or 'none', got 'gru'"),
        (dict(encoder_hidden=0), "PTuningConfig.encoder_hidden must be positive, got 0"),
    ],
)
def test_config_errors_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        PTuningConfig(**settings)


def test_seven_b_trainable_counts_on_the_meta_device():
    counts = {}
    for encoder in ("mlp", "lstm", "none"):
        model = load_model("7B", adapter_config=PTuningConfig(encoder=encoder), device="meta")
        counts[encoder] = model.describe_trainable()
    inputs, h = 20 * 4096, 256
    mlp = 4096 * h + h + h * h + h + h * 4096 + 4096
    assert counts["mlp"] == f"{inputs + mlp:,} trainable values (encoder inputs {inputs:,}, encoder {mlp:,})"
    assert counts["none"] == "81,920 trainable values (soft tokens 81,920)"
    lstm = 2 * (4 * h * (4096 + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)  # 2 layers x 2 directions
    head = 2 * h * 2 * h + 2 * h + 2 * h * 4096 + 4096
    assert counts["lstm"] == f"{inputs + lstm + head:,} trainable values (encoder inputs {inputs:,}, encoder " + (
        f"{lstm + head:,})"
    )

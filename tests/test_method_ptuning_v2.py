"""model/methods/ptuning_v2.py: PEFT PREFIX_TUNING without its projection imports as P-tuning v2 and gives PEFT's
logits, the defaults (prefixes trained directly, N(0, 1)), the optional MLP, the settings' errors and the 7B count.
(Identity, save / load, cache and gradients: tests/test_method_contract.py.)"""

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

from model import load_model
from model.methods.prefix import PrefixConfig
from model.methods.ptuning_v2 import PTuningV2Config
from tests.test_checkpoint import LAYERS, make_hf_model
from tests.test_method_prefix import TOKENS

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]


def test_peft_prefix_tuning_without_projection_is_ptuning_v2_with_the_peft_logits(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=False)
    peft_model = get_peft_model(make_hf_model(), config).eval()
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        expected, base_logits = peft_model(TOKENS).logits, hf(TOKENS).logits
    peft_model.save_pretrained(tmp_path / "peft")

    model = load_model(tmp_path / "hf", adapter=tmp_path / "peft")
    assert model.method.name == "ptuning_v2" and model.config.method == PTuningV2Config(prefix_len=4)
    assert len(list(model.trainable_parameters())) == 2 * LAYERS  # a key and a value prefix per layer
    with torch.no_grad():
        logits = model(TOKENS)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert (logits - base_logits).abs().max() > 1e-1


def test_defaults_train_the_prefixes_directly_and_the_mlp_is_optional():
    model = load_model("tiny", adapter_config=PTuningV2Config(prefix_len=4), seed=5)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(model.layers[0].attention.adapter_prefix_key, torch.randn(4, 32, generator=g))  # N(0, 1)
    assert model.method.describe() == "P-tuning v2: key/value prefixes P=4 in the top 4 of 4 layers, trained directly"
    mlp = load_model("tiny", adapter_config=PTuningV2Config(prefix_len=4, reparameterize=True, mlp_hidden=16))
    assert {n.split(".")[1] for n, _ in mlp.trainable_parameters()} == {"adapter_embedding", "adapter_mlp"}
    assert type(PTuningV2Config()) is not PrefixConfig and PrefixConfig().reparameterize  # prefix keeps its MLP


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(prefix_len=0), "PTuningV2Config.prefix_len must be positive, got 0"),
        (dict(n_layers=0), r"PTuningV2Config.n_layers must be positive or None \(every layer\), got 0"),
    ],
)
def test_bad_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        PTuningV2Config(**settings)


def test_trainable_values_at_7b():
    model = load_model("7B", adapter_config=PTuningV2Config(), device="meta")
    assert model.describe_trainable() == "2,621,440 trainable values (prefixes 2,621,440)"  # 32 x 2 x 10 x 4096

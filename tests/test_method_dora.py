"""model/methods/dora.py: PEFT parity of a use_dora directory on a tiny GQA LlamaForCausalLM, one DoraLinear against
PEFT's DoRA layer in training (dropout, gradients: the detached norm), refusals by name, hostile files, the init on
a quantized base, the 7B count. The registry-wide contract (identity, save / load, merge, cache, padding) is
tests/test_method_contract.py."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from model import CheckpointError, load_model
from model.methods.dora import DoraConfig, DoraLinear
from model.methods.lora import LoraConfig
from tests.test_checkpoint import VOCAB, make_hf_model
from tests.test_method_contract import TINY_BASE
from tests.test_method_lora import HF_LINEARS, TOKENS

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
WEIGHTS = "adapter_model.safetensors"


def randomise(peft_model: nn.Module, seed: int = 7) -> None:
    """lora_A / lora_B drawn at random, magnitudes moved off the weight norms (0.5x .. 1.5x): a non-identity DoRA."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def peft_dora(folder, **settings) -> torch.Tensor:
    """Save a random PEFT DoRA adapter on the tiny HF model; return PEFT's logits."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": HF_LINEARS, "use_dora": True} | settings
    peft_model = get_peft_model(make_hf_model(), PeftLoraConfig(**settings)).eval()
    randomise(peft_model)
    with torch.no_grad():
        logits = peft_model(TOKENS).logits
    peft_model.save_pretrained(folder)
    return logits


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, DoraConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), visual_layers=0)),
        (
            {"r": 2, "lora_alpha": 3, "target_modules": ["q_proj", "k_proj", "down_proj"], "use_rslora": True,
             "layers_to_transform": [1, 2]},
            DoraConfig(rank=2, alpha=3, targets=("wq", "wk", "w2"), n_layers=2, rslora=True, visual_layers=0),
        ),
    ],
    ids=["every linear", "top layers, rslora"],
)  # fmt: skip
def test_peft_dora_gives_the_peft_logits(tmp_path, hf_dir, settings, expected):
    """The magnitudes of q_proj / k_proj come in HF's row order: without un-permuting them the logits differ."""
    peft_logits = peft_dora(tmp_path, **settings)
    model = load_model(hf_dir, adapter=tmp_path)
    assert model.method.name == "dora" and model.config.method == expected
    with torch.no_grad():
        logits = model(TOKENS)
        assert (logits - peft_logits).abs().max().item() <= 1e-4
        assert (logits - load_model(hf_dir)(TOKENS)).abs().max().item() > 1e-2  # the adapter really acts


def test_one_linear_matches_peft_in_training_dropout_and_gradients_included():
    """PEFT's DoRA layer with dropout 0.5 in training mode, the same dropout mask: the same output, and the same
    gradients for A, B and m (the norm is detached in both)."""

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(12, 6, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    torch.manual_seed(0)
    peft_model = get_peft_model(One(), PeftLoraConfig(r=3, lora_alpha=6, target_modules=["lin"], use_dora=True,
                                                      lora_dropout=0.5))  # fmt: skip
    randomise(peft_model)
    peft_lin = peft_model.base_model.model.lin
    ours = DoraLinear(nn.Linear(12, 6, bias=False), rank=3, scale=2.0, dropout=0.5)
    ours.weight = nn.Parameter(peft_lin.base_layer.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        ours.adapter_lora_a.copy_(peft_lin.lora_A["default"].weight)
        ours.adapter_lora_b.copy_(peft_lin.lora_B["default"].weight)
        ours.adapter_dora_magnitude.copy_(peft_lin.lora_magnitude_vector["default"].weight)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    outputs = []
    for module in (peft_model.train(), ours.train()):
        torch.manual_seed(3)
        out = module(x)
        (out * torch.arange(6.0)).sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    pairs = [(ours.adapter_lora_a, peft_lin.lora_A["default"].weight),
             (ours.adapter_lora_b, peft_lin.lora_B["default"].weight),
             (ours.adapter_dora_magnitude, peft_lin.lora_magnitude_vector["default"].weight)]  # fmt: skip
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-6)
    torch.manual_seed(3)
    assert not torch.equal(ours.eval()(x), outputs[1])  # dropout acted in training


@pytest.fixture(scope="module")
def dora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft-dora")
    peft_dora(folder, target_modules=["q_proj", "v_proj"])
    return folder


def test_a_plain_lora_directory_stays_lora_and_use_dora_without_magnitudes_is_named(tmp_path, hf_dir, dora_dir):
    shutil.copytree(dora_dir, tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / WEIGHTS)
    save_file({k: v for k, v in state.items() if "magnitude" not in k}, tmp_path / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"missing keys:\n    layers\.0\.attention\.wq\.adapter_dora_magnitude"):
        load_model(hf_dir, adapter=tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": False}))
    assert type(load_model(hf_dir, adapter=tmp_path).config.method) is LoraConfig


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank_pattern": {"q_proj": 2}}, r"rank_pattern=\{'q_proj': 2\} \(ranks that differ per module\) is not "
                                          r"supported; only plain DoRA is"),
        ({"fan_in_fan_out": True}, r"fan_in_fan_out=True \(transposed"),
        ({"lora_alpha": None}, r"invalid DoRA config"),
    ],
)  # fmt: skip
def test_peft_settings_we_cannot_reproduce_are_refused_by_name(tmp_path, hf_dir, dora_dir, change, message):
    shutil.copytree(dora_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | change))
    with pytest.raises(CheckpointError, match=message):
        load_model(hf_dir, adapter=tmp_path)


KEY = "base_model.model.model.layers.2.self_attn.q_proj.lora_magnitude_vector"


@pytest.mark.parametrize(
    "value, message",
    [
        (torch.full((64,), float("nan")), f"{KEY} holds 64 non-finite values"),
        (torch.ones(64, dtype=torch.int64), f"{KEY} is torch.int64; adapter tensors must be floating point"),
        (torch.ones(63), r"layers\.2\.attention\.wq\.adapter_dora_magnitude: \(63,\) vs \(64,\)"),
    ],
    ids=["nan", "int", "shape"],
)
def test_hostile_magnitudes_are_refused_naming_the_tensor(tmp_path, hf_dir, dora_dir, value, message):
    shutil.copytree(dora_dir, tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / WEIGHTS)
    assert KEY in state
    save_file(state | {KEY: value}, tmp_path / WEIGHTS)
    with pytest.raises(CheckpointError, match=message):
        load_model(hf_dir, adapter=tmp_path)


def test_a_fresh_adapter_on_an_nf4_base_is_exactly_that_base():
    """The magnitudes are the quantized weights' row norms (load_model quantizes before the adapter's init)."""
    tokens = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dora = load_model(TINY_BASE, adapter_config=DoraConfig(rank=2, targets=("wk", "w2")), quantize="nf4")
        assert torch.equal(dora(tokens), load_model(TINY_BASE, quantize="nf4")(tokens))


def test_config_errors_name_dora_and_the_seven_b_count():
    with pytest.raises(ValueError, match=r"DoraConfig\.rank must be positive, got 0"):
        DoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"DoraConfig\.n_layers=5 exceeds the model's n_layers=4"):
        load_model("tiny", adapter_config=DoraConfig(n_layers=5))
    model = load_model("7B", adapter_config=DoraConfig(), device="meta")
    # LoRA's 4,194,304 (r=8 on wq, wv of 32 layers) + one magnitude per output row: 32 x (4096 + 4096)
    assert model.describe_trainable() == (
        "4,456,448 trainable values (lora A 2,097,152, lora B 2,097,152, dora magnitude 262,144)"
    )

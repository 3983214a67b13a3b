"""model/methods/ia3.py: PEFT parity of IA3 directories on a tiny GQA LlamaForCausalLM (PEFT's LLaMA default and
chosen input / output targets), refusals by name, hostile files, merge, config errors, the 7B count. The
registry-wide contract (identity, save / load, merge, cache, padding) is tests/test_method_contract.py."""

import json
import shutil

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from model import CheckpointError, load_model
from model.methods.ia3 import IA3Config, IA3Linear
from tests.test_checkpoint import FFN, HIDDEN, make_hf_model
from tests.test_method_lora import TOKENS

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
WEIGHTS = "adapter_model.safetensors"


def peft_ia3(folder, **settings) -> torch.Tensor:
    """Save a PEFT IA3 adapter on the tiny HF model, its vectors drawn from 0.5 .. 1.5; return PEFT's logits."""
    peft_model = get_peft_model(make_hf_model(), PeftIA3Config(**settings)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        logits = peft_model(TOKENS).logits
    peft_model.save_pretrained(folder)
    return logits


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, IA3Config(visual_layers=0)),  # PEFT's LLaMA default: k_proj, v_proj (output), down_proj (input)
        (
            {"target_modules": ["q_proj", "o_proj", "up_proj"], "feedforward_modules": ["o_proj"]},
            IA3Config(targets=("wq", "wo", "w3"), feedforward=("wo",), visual_layers=0),
        ),
    ],
    ids=["peft default", "q output, o input"],
)
def test_peft_ia3_gives_the_peft_logits(tmp_path, hf_dir, settings, expected):
    """Output vectors of q_proj / k_proj come in HF's rotate-half row order: without un-permuting them the logits
    differ."""
    peft_logits = peft_ia3(tmp_path, **settings)
    model = load_model(hf_dir, adapter=tmp_path)
    assert model.method.name == "ia3" and model.config.method == expected
    with torch.no_grad():
        logits = model(TOKENS)
        assert (logits - peft_logits).abs().max().item() <= 1e-4
        assert (logits - load_model(hf_dir)(TOKENS)).abs().max().item() > 1e-2  # the adapter really acts


@pytest.fixture(scope="module")
def ia3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft-ia3")
    peft_ia3(folder)
    return folder


def copy_with(folder, target, config_changes=None, tensors=None) -> None:
    shutil.copytree(folder, target, dirs_exist_ok=True)
    if config_changes:
        config = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps(config | config_changes))
    if tensors:
        save_file(load_file(target / WEIGHTS) | tensors, target / WEIGHTS)


KEY = "base_model.model.model.layers.1.mlp.down_proj.ia3_l"


@pytest.mark.parametrize(
    "config_changes, tensors, message",
    [
        ({"fan_in_fan_out": True}, None, r"fan_in_fan_out=True \(transposed .*\) is not supported by \(IA\)\^3"),
        ({"modules_to_save": ["lm_head"]}, None, r"modules_to_save=\['lm_head'\] \(fully trained copies"),
        (None, {KEY: torch.full((1, FFN), float("inf"))}, f"{KEY} holds {FFN} non-finite values"),
        (None, {KEY: torch.ones(1, FFN, dtype=torch.bool)}, f"{KEY} is torch.bool; adapter tensors must be floating"),
        (None, {KEY: torch.ones(1, FFN - 1)}, rf"layers\.1\.feed_forward\.w2\.adapter_ia3_scale: \({FFN - 1},\) vs "
                                              rf"\({FFN},\)"),
        (None, {KEY: torch.ones(HIDDEN, 1)}, r"\['w2'\] scales the input in some layers and the output in others"),
    ],
    ids=["fan_in_fan_out", "modules_to_save", "inf", "bool", "shape", "mixed"],
)  # fmt: skip
def test_what_we_cannot_reproduce_or_read_is_refused_by_name(tmp_path, hf_dir, ia3_dir, config_changes, tensors,
                                                             message):  # fmt: skip
    copy_with(ia3_dir, tmp_path, config_changes, tensors)
    with pytest.raises(CheckpointError, match=message):
        load_model(hf_dir, adapter=tmp_path)


def test_vectors_scale_the_input_or_output_and_merge_folds_them():
    model = load_model("tiny", adapter_config=IA3Config(targets=("wq", "w2"), feedforward=("w2",))).eval()
    wq, w2 = model.layers[0].attention.wq, model.layers[0].feed_forward.w2
    assert isinstance(wq, IA3Linear) and isinstance(w2, IA3Linear) and not wq.on_input and w2.on_input
    assert wq.adapter_ia3_scale.shape == (wq.out_features,) and w2.adapter_ia3_scale.shape == (w2.in_features,)
    assert all(torch.equal(lin.adapter_ia3_scale, torch.ones_like(lin.adapter_ia3_scale)) for lin in (wq, w2))
    x = torch.randn(3, w2.in_features)
    with torch.no_grad():
        w2.adapter_ia3_scale.copy_(torch.linspace(0, 2, w2.in_features))
        expected = (x * torch.linspace(0, 2, w2.in_features)) @ w2.weight.T
        torch.testing.assert_close(w2(x), expected, rtol=0, atol=1e-6)
        w2.merge()
        torch.testing.assert_close(w2(x), expected, rtol=0, atol=1e-6)
    assert torch.equal(w2.adapter_ia3_scale, torch.ones(w2.in_features))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"targets": ("wk", "wx")}, r"IA3Config\.targets must be distinct names among wq, wk, .*, got \['wk', 'wx'\]"),
        ({"targets": "wk"}, r"IA3Config\.targets must be a list of linear names, got the string 'wk'"),
        ({"targets": ("wk",), "feedforward": ("w2",)}, r"IA3Config\.feedforward must be distinct names among the "
                                                       r"targets \['wk'\], got \['w2'\]"),
        ({"n_layers": 0}, r"IA3Config\.n_layers must be positive or None"),
        ({"visual_layers": -1}, r"IA3Config\.visual_layers must be an integer >= 0, got -1"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        IA3Config(**settings)


def test_settings_beyond_the_model_and_the_seven_b_count():
    with pytest.raises(ValueError, match=r"IA3Config\.n_layers=5 exceeds the model's n_layers=4"):
        load_model("tiny", adapter_config=IA3Config(n_layers=5))
    model = load_model("7B", adapter_config=IA3Config(), device="meta")
    # 32 layers x (wk 4096 + wv 4096 outputs + w2's 11008 inputs): PEFT's 0.009% of LLaMA-7B
    assert model.describe_trainable() == "614,400 trainable values (ia3 scales 614,400)"

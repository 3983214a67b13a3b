"""training/phases.py: ``--recipe v2``, the V2 release's two phases as one command on the CPU (the tiny demo base
and the demo mix, the recipe's 7B shapes overridden to tiny ones): pretrain updates only gates, prompts and the
visual path on captions, finetune only biases and norms on the mix, starting from pretrain's adapter; a run stopped
in its first phase continues with ``--resume`` to the same result."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from data.synthetic_mix import ensure_mix
from training.config import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO_BASE = REPO_ROOT / "assets" / "tiny-demo-base"
TINY_V2 = [
    "--base", str(DEMO_BASE),
    "--model.llama_adapter_v2.n_layers", "3", "--model.llama_adapter_v2.prompt_len", "4",
    "--model.visual.clip_model", "tiny", "--model.visual.query_len", "4", "--model.visual.query_width", "32",
    "--model.visual.query_blocks", "1", "--model.visual.query_heads", "4",
    "--optim.max_steps", "3", "--optim.batch_size", "4", "--data.max_len", "128",
    "--run.eval", "false", "--run.progress", "false", "--run.tensorboard", "false", "--run.save_every", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> Path:
    return ensure_mix(tmp_path_factory.mktemp("mix") / "mix")


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter.safetensors")


def kinds(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    held = {"pretrain": ("adapter_gate", "adapter_prompt", "visual."), "finetune": ("adapter_bias", "adapter_norm")}
    return {phase: [n for n in tensors if any(p in n for p in parts)] for phase, parts in held.items()}


def test_the_v2_recipe_pretrains_then_finetunes_each_its_own_tensors(mix, tmp_path):
    out = tmp_path / "v2"
    assert train.main(["--recipe", "v2", "--data", str(mix), "--run.out", str(out), *TINY_V2]) == 0
    assert (out / "phases.json").is_file() and (out / "config.json").is_file()
    pre, fine = adapter(out / "pretrain"), adapter(out / "finetune")
    assert pre.keys() == fine.keys()
    groups = kinds(pre)
    assert len(groups["pretrain"]) > 5 and len(groups["finetune"]) > 5 and not any("adapter_scale" in n for n in pre)
    # pretrain moved its tensors and held the rest at their fresh values: biases 0, norm weights the base's
    assert all(not pre[n].any() for n in groups["finetune"] if n.endswith("adapter_bias"))
    base = torch.load(DEMO_BASE / "consolidated.00.pth", weights_only=True)
    assert torch.equal(pre["norm.adapter_norm_weight"], base["norm.weight"].float())
    assert any(pre[n].abs().max() > 0 for n in groups["pretrain"] if n.endswith("adapter_gate"))  # gates opened
    # finetune started from pretrain's adapter and moved only the biases and norms
    assert all(torch.equal(fine[n], pre[n]) for n in groups["pretrain"])
    assert all(not torch.equal(fine[n], pre[n]) for n in groups["finetune"] if n.endswith("adapter_bias"))
    assert not torch.equal(fine["norm.adapter_norm_weight"], pre["norm.adapter_norm_weight"])


def test_a_v2_run_stopped_in_its_first_phase_resumes_to_the_same_adapter(mix, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(["--recipe", "v2", "--data", str(mix), "--run.out", str(whole), *TINY_V2]) == 0
    argv = ["--recipe", "v2", "--data", str(mix), "--run.out", str(parts), *TINY_V2, "--run.stop_after", "2"]
    assert train.main(argv) == 0
    assert not (parts / "phases.json").exists() and not (parts / "finetune").exists()
    assert train.main(["--resume", str(parts)]) == 0
    for phase in ("pretrain", "finetune"):
        a, b = adapter(whole / phase), adapter(parts / phase)
        assert all(torch.equal(a[n], b[n]) for n in a), phase


def test_init_from_and_trainable_name_what_does_not_fit(mix, tmp_path, capsys):
    from model import load_model, save_adapter
    from model.methods import method_class

    lora = load_model(DEMO_BASE, adapter_config=method_class("lora").config_class(rank=2), clip="tiny")
    save_adapter(lora, tmp_path / "lora", base=DEMO_BASE)
    common = ["--recipe", "demo", "--data", str(mix), "--optim.max_steps", "1", "--run.eval", "false"]
    assert train.main([*common, "--model.init_from", str(tmp_path / "lora"), "--run.out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "adapter tensors to start from do not match the model" in err and "adapter_lora_a" in err
    assert train.main([*common, "--optim.trainable", "adapter_bias", "--run.out", str(tmp_path / "b")]) == 1
    assert (
        "--optim.trainable ['adapter_bias']: no trainable tensor's name contains any of them" in capsys.readouterr().err
    )
    assert (
        not (tmp_path / "a" / "adapter.safetensors").exists() and not (tmp_path / "b" / "adapter.safetensors").exists()
    )

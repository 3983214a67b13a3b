"""torchrun: two CPU processes (gloo, DDP over the trainable tensors, DistributedSampler) give the loss curve and the
adapter of one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer

REPO = Path(train.__file__).resolve().parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_scienceqa(root / "scienceqa", n_train=32, n_val=4, n_test=4)
    train_tokenizer(synthetic_corpus(seed=0, n=400), root / "tokenizer.model")
    return root


def args(data, out, batch_size: int) -> list[str]:
    return [
        "--recipe", "scienceqa", "--base", "tiny", "--tokenizer", str(data / "tokenizer.model"),
        "--data", str(data / "scienceqa"), "--clip", "tiny", "--model.llama_adapter.n_layers", "2",
        "--model.llama_adapter.prompt_len", "3", "--optim.batch_size", str(batch_size), "--epochs", "2",
        "--optim.warmup_epochs", "1", "--run.device", "cpu", "--out", str(out), "--run.progress", "false",
        "--run.tensorboard", "false", "--run.log_every", "1", "--run.eval", "false",
    ]  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(data, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert train.main(args(data, single, batch_size=4)) == 0
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, str(REPO / "train.py"), *args(data, double, batch_size=2)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2" in done.stdout  # the run header: base ... on cpu x 2 processes

    one, two = records(single), records(double)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 17))
    assert [r["lr"] for r in one] == [r["lr"] for r in two]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=0
    )
    a, b = load_file(single / "adapter.safetensors"), load_file(double / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("visual.adapter_proj") for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    state = torch.load(double / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 16


def test_a_non_finite_loss_stops_every_process_with_one_message(data, tmp_path):
    """The NaN check is shared (all-reduced), so every rank stops at the same step, and each exits with status 1
    and the error, not an abort."""
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, str(REPO / "train.py"), *args(data, out, batch_size=2), "--optim.max_steps", "6",
         "--optim.lr", "1e30"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: the loss is nan at optimizer step 2" in done.stderr
    assert "[rank 1] error: the loss is nan at optimizer step 2" in done.stderr
    assert "terminate called" not in done.stderr and "SIGABRT" not in done.stderr
    assert [r["step"] for r in records(out)] == [1] and not (out / "state.pt").exists()

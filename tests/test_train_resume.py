"""Stopping and resuming train.py: run.stop_after, a real SIGKILL at an arbitrary moment, and Ctrl-C (SIGINT) all
continue to the adapter of the uninterrupted run, bit for bit on the CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer

REPO = Path(train.__file__).resolve().parent
QUIET = ["--run.progress", "false", "--run.tensorboard", "false", "--run.log_every", "1", "--run.eval", "false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_scienceqa(root / "scienceqa", n_train=24, n_val=4, n_test=4)
    train_tokenizer(synthetic_corpus(seed=0, n=400), root / "tokenizer.model")
    return root


def run_args(data, out, *extra: str) -> list[str]:
    return [
        "--recipe", "scienceqa", "--base", "tiny", "--tokenizer", str(data / "tokenizer.model"),
        "--data", str(data / "scienceqa"), "--clip", "tiny", "--model.adapter.n_layers", "2",
        "--model.adapter.prompt_len", "3", "--optim.batch_size", "4", "--epochs", "3", "--optim.warmup_epochs", "1",
        "--run.device", "cpu", "--run.save_every", "1", "--out", str(out), *QUIET, *extra,
    ]  # fmt: skip


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def state_step(run_dir: Path) -> int:
    return torch.load(run_dir / "state.pt", weights_only=True)["step"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: 3 epochs of 6 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(run_args(data, out)) == 0
    assert state_step(out) == 18
    return out


def test_stop_after_then_resume_is_bit_identical(data, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(run_args(data, out, "--run.stop_after", "7")) == 0  # stops mid-epoch 2
    assert "run.stop_after reached at step 7/18" in capsys.readouterr().out
    assert state_step(out) == 7 and losses(out) == losses(reference)[:7]
    assert train.main(["--resume", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert losses(out) == losses(reference)
    assert_same_adapter(out, reference)
    # Resuming a finished run changes nothing.
    assert train.main(["--resume", str(out)]) == 0
    assert losses(out) == losses(reference)
    assert_same_adapter(out, reference)


def start(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads: the same sums
    log = (tmp_path / "stdout.txt").open("w")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(train.read_metrics(run_dir / "metrics.jsonl")) >= step:  # tolerates a line being written
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended (status {proc.returncode}) before step {step}: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout_s} s")


def test_sigkill_at_any_moment_then_resume_is_bit_identical(data, reference, tmp_path):
    """A real SIGKILL while the run is saving every step: the files left are complete, and resuming ends exactly
    where the uninterrupted run ends."""
    out = tmp_path / "run"
    proc = start(run_args(data, out), tmp_path)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = state_step(out)  # state.pt is whole: it loads
    # A step logs its metrics line, then saves: the kill may land between the two, so state.pt may be a step behind
    # the log (resuming truncates the log to it).
    assert 2 <= killed_at < 18, "the run finished before it was killed"
    load_file(out / "adapter.safetensors")  # so is the adapter
    assert train.main(["--resume", str(out)]) == 0
    assert losses(out) == losses(reference)
    assert_same_adapter(out, reference)


def test_ctrl_c_saves_the_state_and_exits_cleanly(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = start(run_args(data, out), tmp_path)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "SIGINT: finishing this step and saving the state (Ctrl-C again aborts)" in err
    assert "Traceback" not in err
    stdout = (tmp_path / "stdout.txt").read_text()
    stopped_at = state_step(out)
    assert (
        f"interrupted at step {stopped_at}/18" in stdout and f"continue with: python train.py --resume {out}" in stdout
    )
    assert losses(out)[-1][0] == stopped_at  # the last logged step is the saved one
    assert train.main(["--resume", str(out)]) == 0
    assert_same_adapter(out, reference)


def test_resume_refuses_a_corrupt_state(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(run_args(data, out, "--run.stop_after", "2")) == 0
    (out / "state.pt").write_bytes((out / "state.pt").read_bytes()[:100])
    assert train.main(["--resume", str(out)]) == 1
    assert f"error: {out / 'state.pt'}: cannot read the saved state" in capsys.readouterr().err

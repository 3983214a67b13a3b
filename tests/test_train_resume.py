"""Stopping and resuming train.py: run.stop_after, a real SIGKILL at an arbitrary moment, and Ctrl-C (SIGINT) all
continue to the adapter of the uninterrupted run, bit for bit on the CPU."""

import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model.checkpoint.adapter
import train
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer
from model import LlamaAdapterConfig, load_run
from training.metrics import read_metrics
from training.optim import Schedule

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
        "--data", str(data / "scienceqa"), "--clip", "tiny", "--model.llama_adapter.n_layers", "2",
        "--model.llama_adapter.prompt_len", "3", "--optim.batch_size", "4", "--epochs", "3",
        "--optim.warmup_epochs", "1", "--run.device", "cpu", "--run.save_every", "1", "--out", str(out), *QUIET, *extra,
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


def test_a_run_recorded_with_the_old_adapter_section_resumes_bit_identical(data, reference, tmp_path):
    """config.json as written while LLaMA-Adapter V1's settings were model.adapter (training/migration.py)."""
    out = tmp_path / "run"
    assert train.main(run_args(data, out, "--run.stop_after", "7")) == 0
    values = json.loads((out / "config.json").read_text())
    values["model"]["adapter"] = values["model"].pop("llama_adapter")
    (out / "config.json").write_text(json.dumps(values))
    assert load_run(out).config.method == LlamaAdapterConfig(prompt_len=3, n_layers=2)  # its adapter.json
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
        if len(read_metrics(run_dir / "metrics.jsonl")) >= step:  # tolerates a line being written
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


def test_sigterm_saves_the_state_and_stops_within_a_step(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = start(run_args(data, out), tmp_path)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    logged_when_sent = len(read_metrics(out / "metrics.jsonl"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: finishing this step and saving the state" in err and "Traceback" not in err
    stopped_at = state_step(out)
    # The step under way when the signal came ends the run (or the next one, if the signal came after this step
    # shared its stop flag with the other processes).
    assert logged_when_sent <= stopped_at <= logged_when_sent + 2 < 18
    assert f"terminated at step {stopped_at}/18" in (tmp_path / "stdout.txt").read_text()
    assert losses(out)[-1][0] == stopped_at
    assert train.main(["--resume", str(out)]) == 0
    assert_same_adapter(out, reference)


def test_resume_onto_a_smaller_training_set_is_refused_or_continues_at_the_next_epoch(data, tmp_path, capsys):
    """The saved position (epoch 2, sample 20 of 24) is past the end of a 16-example set: the resume used to spin
    forever; it is refused by name, and --allow-changes goes on from the next epoch over the new set."""
    sqa = tmp_path / "sqa"
    make_scienceqa(sqa, n_train=24, n_val=4, n_test=4)
    out = tmp_path / "run"
    assert train.main(run_args(data, out, "--data", str(sqa), "--run.stop_after", "11")) == 0
    shutil.rmtree(sqa)
    make_scienceqa(sqa, n_train=16, n_val=4, n_test=4)  # the same folder, a smaller train split
    capsys.readouterr()

    assert train.main(["--resume", str(out)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"error: {out}: the saved data position (epoch 2, sample 20) is in a training set of 24 examples, but {sqa} "
        "now gives 16 (train split, up to data.max_len=512 tokens). Resume with the data the run had, start a new "
        f"run (--out), or continue on this set from the next epoch boundary with: python train.py --resume {out} "
        "--allow-changes"
    ) in err
    assert state_step(out) == 11 and "changes" not in json.loads((out / "config.json").read_text())

    assert train.main(["--resume", str(out), "--allow-changes"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["changes"] == [{"step": 11, "train_examples": [24, 16]}]
    state = torch.load(out / "state.pt", weights_only=True)
    # 16 examples: 4 steps per epoch, 12 in all; step 12 is the first of epoch 3 (index 2), 4 samples into it.
    assert (state["step"], state["epoch"], state["sample"], state["examples"]) == (12, 2, 4, 16)
    assert [step for step, _ in losses(out)] == list(range(1, 13))


def test_an_accepted_change_applies_from_the_saved_step_and_is_recorded(data, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(run_args(data, out, "--run.stop_after", "7")) == 0
    changed = ["--optim.lr", "0.001", "--optim.weight_decay", "0.5"]
    assert train.main(["--resume", str(out), *changed, "--allow-changes"]) == 0
    assert "from step 7 on: --optim.lr none -> 0.001, --optim.weight_decay 0.02 -> 0.5" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["optim"]["lr"], config["optim"]["weight_decay"]) == (0.001, 0.5)
    assert config["changes"] == [
        {"step": 7, "settings": {"optim.lr": [None, 0.001], "optim.weight_decay": [0.02, 0.5]}}
    ]
    records = read_metrics(out / "metrics.jsonl")
    assert losses(out)[:7] == losses(reference)[:7]
    assert [r["lr"] for r in records[7:]] == [Schedule(0.001, 0.0, 6, 18).lr(step) for step in range(7, 18)]
    groups = torch.load(out / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]  # not the saved optimizer's 0.02
    # The changed settings are now the run's: a plain resume continues with them.
    assert train.main(["--resume", str(out)]) == 0
    assert len(json.loads((out / "config.json").read_text())["changes"]) == 1


def test_an_accepted_change_of_shape_names_the_tensors_and_both_shapes(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(run_args(data, out, "--run.stop_after", "2")) == 0
    assert train.main(["--resume", str(out), "--model.llama_adapter.prompt_len", "5", "--allow-changes"]) == 1
    err = capsys.readouterr().err
    assert (
        f"error: {out / 'state.pt'}: adapter tensors do not match the model\n"
        "  mis-shaped keys (file shape vs model shape):\n"
        "    layers.2.attention.adapter_prompt: (3, 64) vs (5, 64)\n"
        "    layers.3.attention.adapter_prompt: (3, 64) vs (5, 64)\n"
        "(the model settings differ from those the state was saved with)"
    ) in err
    assert state_step(out) == 2 and "changes" not in json.loads((out / "config.json").read_text())


def fails_on_call(real, n: int, when):
    """``real``, except that its n-th call (of those ``when`` picks) raises ENOSPC: a disk filling up."""
    calls = []

    def write(*args, **kwargs):
        if when(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return write


def any_call(*args, **kwargs) -> bool:
    return True


def metrics_append(file, mode="r", *args, **kwargs) -> bool:
    return isinstance(file, (str, Path)) and Path(file).name == "metrics.jsonl" and mode == "a"


@pytest.mark.parametrize(
    "target, name, kept, saved_step",
    [
        ((torch, "save", any_call), "state.pt", "the previous file is unchanged", 4),
        ((model.checkpoint.adapter, "save_file", any_call), "adapter.safetensors", "the previous file is unchanged", 5),
        ((builtins, "open", metrics_append), "metrics.jsonl", "earlier records are kept", 4),
    ],
)
def test_a_full_disk_stops_with_one_error_naming_the_file_and_the_run_resumes(
    data, reference, tmp_path, capsys, monkeypatch, target, name, kept, saved_step
):
    """The write of step 5 fails: one message, status 1, the last complete state kept; resuming (once there is
    room) ends where the uninterrupted run ends."""
    owner, attr, when = target
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(owner, attr, fails_on_call(getattr(owner, attr), 5, when))
        assert train.main(run_args(data, out)) == 1
    err = capsys.readouterr().err
    assert err == (
        f"\nerror: {out / name}: cannot write (No space left on device); {kept}\n"
        f"(the run stopped; {out} keeps its last saved state: make room, then continue with: python train.py "
        f"--resume {out})\n"
    )
    assert state_step(out) == saved_step and not list(out.glob(".*.tmp"))
    assert train.main(["--resume", str(out)]) == 0
    assert f"resuming {out} at step {saved_step}/18" in capsys.readouterr().out
    assert losses(out) == losses(reference)
    assert_same_adapter(out, reference)
    assert json.loads((out / "adapter.json").read_text())["extra"]["step"] == 18

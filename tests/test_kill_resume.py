"""kill -9 at 16 chosen points of train.py, ``--recipe v2`` and ``python -m bench methods``, then a resume (or the same
command again): each ends exactly where the uninterrupted run ends (adapter, losses, evaluation, bit for bit on the
CPU), or is refused by one error naming the file. Also SIGTERM during ``bench methods``, a real full disk (a 2 MiB
tmpfs) under a resume, and read-only run folders for resume, evaluation and export.

How a kill point is reached: the run goes on in a forked copy of this process (everything is imported already, so
a case costs its training steps only) in which ``os.fsync`` / ``os.replace`` (every write of model.checkpoint.files
goes through them) or a named function count their calls; at the chosen one the copy SIGKILLs itself, after cutting
the file being written when the case asks for a half-written file.
"""

import contextlib
import copy
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from data.synthetic import make_scienceqa, synthetic_corpus, train_tokenizer
from model import CheckpointError, load_model
from model.checkpoint import atomic_write
from training.cli import parse_args
from training.metrics import CURVE_FILE, read_metrics
from training.phases import is_phased, run_phases
from training.run import run
from training.state import Resume, read_run_config

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc/self/fd"),
]

QUIET = ["--run.progress", "false", "--run.tensorboard", "false", "--run.log_every", "1"]
EVAL = ["--run.eval_batch_size", "1", "--run.eval_max_new_tokens", "4"]
PNG = b"\x89PNG\r\n\x1a\n"


def stand_in_curve(run_dir: Path) -> None:
    atomic_write(run_dir / CURVE_FILE, lambda tmp: tmp.write_bytes(PNG))


@pytest.fixture(scope="module", autouse=True)
def cheap_loss_curve():
    """loss_curve.png drawn by matplotlib costs more than a run's steps here; a stand-in is written the same way
    (model.checkpoint.atomic_write), so the kill point at its write stays."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("training.run.plot_loss_curve", stand_in_curve)
        yield


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def parsed(argv: list[str], start: Callable = run) -> Callable[..., Callable[[], int]]:
    """``argv`` parsed once (jsonargparse costs more than a run here); per output folder (and ``run.*`` settings),
    a fresh run of it by ``start(cfg, None)``."""
    config = parse_args(argv).config

    def fresh_run(out: Path, **run_settings) -> Callable[[], int]:
        cfg = copy.deepcopy(config)
        cfg.run.out = str(out)
        for name, value in run_settings.items():
            setattr(cfg.run, name, value)
        return lambda: start(cfg, None)

    return fresh_run


def resume(out: Path) -> int:
    """What ``python train.py --resume OUT`` runs, without its command-line parser (tests/test_train_resume.py and
    the tests below that check messages use the command)."""
    cfg = read_run_config(out)
    cfg.run.out = str(out)
    return (run_phases if is_phased(cfg) else run)(cfg, Resume(out))


# ==== killing a forked copy of this process at a write ===============================================================
@dataclass(frozen=True)
class Point:
    """Where the copy stops: at the n-th event of ``kind`` on the file ``name`` (or the function ``name``).

    temp: the temporary file of an atomic write of ``name``, written and about to be synced (``half``: cut to half
    its size first: a write under way); append: an append to ``name`` about to be synced (``half``: its last 5
    bytes dropped: a line cut); renamed: just after the temporary file replaced ``name``; call: on entering the
    function ``module:attribute``.
    """

    kind: str
    name: str
    n: int = 1
    half: bool = False


_TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def _arm(point: Point, action: signal.Signals) -> None:
    """In the copy: send ``action`` to itself at ``point``."""
    seen = [0]

    def hit(cut=None) -> None:
        seen[0] += 1
        if seen[0] == point.n:
            if point.half and cut is not None:
                cut()
            os.kill(os.getpid(), action)

    if point.kind == "call":
        module, attr = point.name.split(":")
        owner = __import__(module, fromlist=[attr])
        real = getattr(owner, attr)

        def call(*args, **kwargs):
            hit()
            return real(*args, **kwargs)

        setattr(owner, attr, call)
        return
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        temp = _TEMP.fullmatch(path.name)
        if point.kind == "temp" and temp and temp[1] == point.name:
            hit(lambda: os.ftruncate(fd, os.fstat(fd).st_size // 2))
        elif point.kind == "append" and path.name == point.name:
            hit(lambda: os.ftruncate(fd, os.fstat(fd).st_size - 5))
        return real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        if point.kind == "renamed" and Path(dst).name == point.name:
            hit()

    os.fsync, os.replace = fsync, replace


def run_copy(point: Point, main: Callable[[], int], tmp_path: Path, action=signal.SIGKILL) -> int | None:
    """``main()`` in a forked copy armed at ``point``; the status it exited with (None: killed, as it must be for
    SIGKILL). Its output goes to tmp_path/copy.out and copy.err."""
    out, err = tmp_path / "copy.out", tmp_path / "copy.err"
    pid = os.fork()
    if pid == 0:  # the copy: never returns into pytest
        status = 3
        try:
            sys.stdout, sys.stderr = out.open("w", buffering=1), err.open("w", buffering=1)
            os.dup2(sys.stdout.fileno(), 1)
            os.dup2(sys.stderr.fileno(), 2)
            _arm(point, action)
            status = main()
        finally:
            os._exit(status if isinstance(status, int) else 3)
    _, status = os.waitpid(pid, 0)
    if action == signal.SIGKILL:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"{point} never came (status {status}): {err.read_text()[-2000:]}"
        )
        return None
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status)


# ==== a plain run: 2 epochs of 2 steps, saved every step, evaluated on 2 test items ==================================
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_scienceqa(root / "scienceqa", n_train=8, n_val=2, n_test=2)
    train_tokenizer(synthetic_corpus(seed=0, n=400), root / "tokenizer.model")
    return root


def train_flags(data: Path) -> list[str]:
    """The scienceqa recipe on the tiny preset base and the data above."""
    return [
        "--base", "tiny", "--tokenizer", str(data / "tokenizer.model"), "--data", str(data / "scienceqa"),
        "--clip", "tiny", "--model.llama_adapter.n_layers", "2", "--model.llama_adapter.prompt_len", "3",
        "--optim.batch_size", "4", "--epochs", "2", "--optim.warmup_epochs", "1", "--run.device", "cpu", *EVAL,
    ]  # fmt: skip


def run_args(data: Path, out: Path) -> list[str]:
    return ["--recipe", "scienceqa", *train_flags(data), "--run.save_every", "1", "--out", str(out), *QUIET]


def outcome(run_dir: Path) -> dict:
    """What must equal the uninterrupted run's: the saved step, adapter, logged losses and the evaluation."""
    generations = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    return {
        "step": torch.load(run_dir / "state.pt", weights_only=True)["step"],
        "adapter": {n: t.tolist() for n, t in load_file(run_dir / "adapter.safetensors").items()},
        "losses": [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run_dir / "metrics.jsonl")],
        "generations": generations[1:],  # after the header (which names the run directory)
        "predictions": json.loads((run_dir / "predictions.json").read_text()),
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "curve": (run_dir / CURVE_FILE).read_bytes(),
    }


@pytest.fixture(scope="module")
def fresh(data) -> Callable[[Path], Callable[[], int]]:
    return parsed(run_args(data, Path("unset")))


@pytest.fixture(scope="module")
def reference(fresh, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert fresh(out)() == 0
    result = outcome(out)
    assert result["step"] == 4 and len(result["losses"]) == 4 and len(result["generations"]) == 2
    return result


# (point, what the kill left: a check on the run directory before it resumes)
def no_state(out: Path) -> None:
    assert (out / "config.json").is_file() and not (out / "state.pt").exists()


def state_at(step: int):
    def check(out: Path) -> None:
        assert torch.load(out / "state.pt", weights_only=True)["step"] == step

    return check


def adapter_behind_state(out: Path) -> None:
    assert json.loads((out / "adapter.json").read_text())["extra"]["step"] == 1
    state_at(2)(out)


def mismatched_adapter_pair(out: Path) -> None:
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: does not hold the tensors adapter\.json was"):
        load_model("tiny", out)


def line_cut(out: Path) -> None:
    assert not (out / "metrics.jsonl").read_text().endswith("\n") and len(read_metrics(out / "metrics.jsonl")) == 2
    state_at(2)(out)


def trained_not_evaluated(out: Path) -> None:
    state_at(4)(out)
    assert not (out / "metrics.json").exists()


def one_answer_logged(out: Path) -> None:
    assert len((out / "generations.jsonl").read_text().splitlines()) == 2  # the header and the first answer


PLAIN_POINTS = {
    "state.pt, first, half-written": (Point("temp", "state.pt", 1, half=True), no_state),
    "state.pt, second, half-written": (Point("temp", "state.pt", 2, half=True), state_at(1)),
    "after state.pt, before the adapter": (Point("renamed", "state.pt", 2), adapter_behind_state),
    "adapter.safetensors half-written": (Point("temp", "adapter.safetensors", 2, half=True), state_at(2)),
    "between the adapter's two files": (Point("renamed", "adapter.safetensors", 2), mismatched_adapter_pair),
    "metrics.jsonl line cut": (Point("append", "metrics.jsonl", 3, half=True), line_cut),
    "loss_curve.png half-written": (Point("temp", "loss_curve.png", 1, half=True), trained_not_evaluated),
    "evaluation: generations.jsonl header cut": (Point("append", "generations.jsonl", 1, half=True),
                                                 trained_not_evaluated),
    "evaluation: after the first answer": (Point("call", "model.generate:generate", 2), one_answer_logged),
    "evaluation: predictions.json half-written": (Point("temp", "predictions.json", 1, half=True),
                                                  trained_not_evaluated),
}  # fmt: skip


@pytest.mark.parametrize("case", PLAIN_POINTS)
def test_a_run_killed_at_a_write_resumes_to_the_uninterrupted_result(fresh, reference, tmp_path, case):
    point, left = PLAIN_POINTS[case]
    out = tmp_path / "run"
    run_copy(point, fresh(out), tmp_path)
    left(out)
    assert resume(out) == 0
    assert outcome(out) == reference
    assert not list(out.glob(".*.tmp"))  # the killed write's temporary file is removed on resume


def test_killed_before_anything_was_saved_the_resume_is_refused_and_the_same_command_runs(
    data, fresh, reference, tmp_path, capsys
):
    out = tmp_path / "run"
    run_copy(Point("temp", "config.json", 1, half=True), fresh(out), tmp_path)
    assert not (out / "config.json").exists()
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(out)])
    assert stop.value.code == 2
    assert f"{out / 'config.json'}: not found; --resume takes a run directory written by train.py" in (
        capsys.readouterr().err
    )
    assert train.main(run_args(data, out)) == 0
    assert outcome(out) == reference


def test_a_resume_killed_while_it_rewrites_config_json_then_metrics_jsonl_resumes_again(fresh, reference, tmp_path):
    out = tmp_path / "run"
    assert fresh(out, stop_after=2)() == 0
    run_copy(Point("temp", "config.json", 1, half=True), functools.partial(resume, out), tmp_path)
    run_copy(Point("temp", "metrics.jsonl", 1, half=True), functools.partial(resume, out), tmp_path)
    state_at(2)(out)
    assert resume(out) == 0
    assert outcome(out) == reference


def test_killed_while_generating_the_synthetic_data_leaves_no_partial_dataset(tmp_path):
    """The tiny recipe generates its data (data.synthetic) into a hidden sibling renamed into place when complete:
    a kill leaves no dataset at data.path, so the next run generates it whole."""
    root, out = tmp_path / "synthetic", tmp_path / "run"
    cfg = parse_args(["--recipe", "tiny", "--run.out", str(out), *QUIET]).config
    cfg.data.path = str(root)  # the command line accepts only the recipe's own folder
    run_copy(Point("call", "data.synthetic.scienceqa:png_bytes", 3), lambda: run(cfg), tmp_path)
    assert not root.exists() and not (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".synthetic.")] != []  # the unfinished sibling


# ==== --recipe v2: killed between its phases =========================================================================
@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    from data.synthetic_mix import ensure_mix
    from tests.test_train_phases import TINY_V2

    mix = ensure_mix(tmp_path_factory.mktemp("mix") / "mix")
    fresh_run = parsed(["--recipe", "v2", "--data", str(mix), *TINY_V2, "--optim.max_steps", "2"], run_phases)
    whole = tmp_path_factory.mktemp("v2") / "whole"
    assert fresh_run(whole)() == 0
    return fresh_run, {phase: load_file(whole / phase / "adapter.safetensors") for phase in ("pretrain", "finetune")}


def test_a_v2_run_killed_between_its_phases_resumes_to_the_same_adapters(v2, tmp_path):
    """Killed while phases.json records the first phase (its state at the last step, the second not started)."""
    fresh_run, adapters = v2
    out = tmp_path / "v2"
    run_copy(Point("temp", "phases.json", 1, half=True), fresh_run(out), tmp_path)
    assert not (out / "phases.json").exists() and not (out / "finetune").exists()
    assert resume(out) == 0
    assert json.loads((out / "phases.json").read_text()) == {"finished": ["pretrain", "finetune"]}
    assert not list(out.glob(".*.tmp"))
    for phase, tensors in adapters.items():
        found = load_file(out / phase / "adapter.safetensors")
        assert found.keys() == tensors.keys() and all(torch.equal(found[n], tensors[n]) for n in tensors), phase


# ==== python -m bench methods: killed, out of disk space, terminated =================================================
def test_bench_methods_killed_full_disk_and_sigterm_each_resume_to_the_same_scores(data, tmp_path, monkeypatch, capsys):
    """kill -9 while a unit's result is written, then a full disk at the next unit's result, then SIGTERM during
    the last unit's training: each leaves the finished units' results whole and no truncated file, and the command
    run again does only what is left (that a redone unit repeats its scores exactly: tests/test_bench_compare.py)."""
    from tests.test_bench_compare import invoke

    # What costs most here and is not under test: a full garbage collection before each unit, the picture.
    monkeypatch.setattr("bench.compare_measure.release_memory", lambda device: None)
    monkeypatch.setattr("bench.compare.plot", lambda report, scorer, path: None)
    out = tmp_path / "out"
    units = ["--recipe", "scienceqa", "--steps", "2", "--lr-sweep", "1", "--lr-widen", "0", "--seeds", "1",
             "--visual-entry", "native", "--methods", "llama_adapter"]  # fmt: skip
    args = [*units, "--out", str(out), "--", *train_flags(data)]

    run_copy(Point("temp", "llama_adapter-native-lr1.json", 1, half=True), lambda: invoke(*args), tmp_path)
    assert not list((out / "results").glob("*.json"))  # only the cut temporary file

    real_write_text = Path.write_text

    def disk_full(path, *a, **k):
        if path.name.startswith(".llama_adapter-native-chosen.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # simulated: the write of that one result
        return real_write_text(path, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", disk_full)
        assert invoke(*args) == 1
    err = capsys.readouterr().err
    chosen = out / "results" / "llama_adapter-native-chosen.json"
    assert f"error: {chosen}: cannot write (No space left on device); no file was written" in err
    assert names(out / "results") == ["llama_adapter-native-lr1.json"]

    status = run_copy(Point("call", "training.state:save_state", 1), lambda: invoke(*args), tmp_path, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM
    err = (tmp_path / "copy.err").read_text()
    assert f"terminated (SIGTERM): the same command continues from the finished runs in {out}" in err
    assert "Traceback" not in err and names(out / "results") == [
        "llama_adapter-native-chosen.json",
        "llama_adapter-native-lr1.json",
    ]

    assert invoke(*args) == 0
    report = json.loads((out / "methods.json").read_text())
    assert report["settings"]["trained_by_this_invocation"] == 1  # the control, stopped by SIGTERM
    assert report["methods"]["llama_adapter"]["native"]["error"] is None and len(list((out / "results").iterdir())) == 3


# ==== a real full disk and read-only folders =========================================================================
@contextlib.contextmanager
def mounted(folder: Path, *options: str):
    """``folder`` as a tmpfs (``mount -t tmpfs -o OPTIONS``) or a read-only bind mount of itself (``bind-ro``; for a
    user other than root, whom permission bits stop, mode 0555 instead); skipped where this process may not mount
    (not root, or a container without CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    if options == ("bind-ro",) and os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if options == ("bind-ro",):
        commands = [["mount", "--bind", str(folder), str(folder)], ["mount", "-o", "remount,ro,bind", str(folder)]]
    else:
        commands = [["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)]]
    done = 0
    try:
        for command in commands:
            if shutil.which("mount") is None or subprocess.run(command, capture_output=True).returncode != 0:
                pytest.skip(f"cannot run {' '.join(command)} here")
            done += 1
        yield folder
    finally:
        if done:
            subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write zeros into folder/filler until the disk is full."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


def test_a_full_disk_under_a_resume_is_one_error_and_the_saved_state_stays(fresh, reference, tmp_path, capsys):
    """A real ENOSPC: the run folder on a 2 MiB tmpfs, filled to the last byte before the resume."""
    with mounted(tmp_path / "disk", "size=2m") as disk:
        out = disk / "run"
        assert fresh(out, stop_after=2)() == 0
        saved = {name: (out / name).read_bytes() for name in ("state.pt", "adapter.safetensors", "adapter.json")}
        filler = fill(disk)
        capsys.readouterr()
        assert train.main(["--resume", str(out)]) == 1
        err = capsys.readouterr().err
        failed = out / "adapter.safetensors"
        assert f"error: {failed}: cannot write (No space left on device); the previous file is unchanged" in err
        assert f"keeps its last saved state: make room, then continue with: python train.py --resume {out}" in err
        assert {name: (out / name).read_bytes() for name in saved} == saved and not list(out.glob(".*.tmp"))
        filler.unlink()
        assert train.main(["--resume", str(out)]) == 0
        assert outcome(out) == reference


def test_a_read_only_run_folder_is_refused_by_name_before_any_work(data, fresh, tmp_path, capsys, monkeypatch):
    from eval import scienceqa
    from model import export

    out = tmp_path / "run"
    assert fresh(out, stop_after=2, eval=False)() == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for where in ("training.run.build_model", "eval.common.load_run_for_eval", "model.load_checkpoint"):
        monkeypatch.setattr(where, lambda *a, **k: pytest.fail("work started before the folder was checked"))
    capsys.readouterr()
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    with mounted(out, "bind-ro"):
        assert train.main(["--resume", str(out)]) == 1
        assert capsys.readouterr().err == (
            f"\nerror: {out}: cannot write into this folder ({reason}); --resume writes the run's state, adapter "
            "and logs there: make it writable, or copy the run folder elsewhere and resume the copy\n"
        )
        inside = out / "eval-val"
        sqa = ["--checkpoint", str(out), "--data", str(data / "scienceqa"), "--split", "val", "--output", str(inside)]
        assert scienceqa.main(sqa) == 1
        assert capsys.readouterr().err == (
            f"error: {inside}: cannot write into this folder ({reason}); the evaluation writes its files there: "
            "pick another --output\n"
        )
        assert export.main([str(out), "--to", "release", str(out / "release.pth")]) == 2
        assert capsys.readouterr().err == (
            f"python -m model.export: {out}: cannot write into this folder ({reason}); {out / 'release.pth'} cannot "
            "be written there: pick another FILE\n"
        )
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        monkeypatch.undo()  # reading a read-only run is fine: evaluated into another folder
        assert scienceqa.main([*sqa[:-1], str(tmp_path / "eval-val")]) == 0
        assert json.loads((tmp_path / "eval-val" / "metrics.json").read_text())["counts"]["Avg"]["total"] == 2

"""README.md's commands as written. Every command of its ```bash blocks is either run, in this process, on tiny
stand-ins of the files it names (the evaluations, loading the demo, train.py's --help and --print_config, make's
dry run), or, when it needs what a test cannot have (LLaMA-7B, a GPU, minutes of training, a server left running),
parsed by the program it calls with the same arguments. A command of a program this file does not know fails the
test, naming the command: a new kind of command needs its case here. The ```python blocks must compile."""

import contextlib
import importlib
import io
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from shutil import which

import pytest

from data.synthetic import make_coco, make_scienceqa
from tests.conftest import make_tiny_run
from training.config import config_to_dict, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
OUTPUT_FLAGS = {"--output", "--out", "--run.out"}
"""Flags whose value is written, not read: a missing one is no reason to only parse the command."""


def readme_blocks(language: str) -> list[str]:
    """The contents of README.md's fenced blocks of ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def readme_commands() -> list[str]:
    """Every shell command of README.md's bash blocks: continued lines joined, comments dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                commands.append(" ".join(re.sub(r"(^|\s)#.*", "", line).split()))
    return commands


@dataclass
class World:
    """Tiny stand-ins of what the README's commands name, and what the commands did with them."""

    tmp: Path
    stand_ins: dict[str, Path]
    ran: list[str] = field(default_factory=list)
    parsed: list[str] = field(default_factory=list)

    def substitute(self, token: str) -> str:
        """``token`` with a README placeholder (a path it names) replaced by its stand-in."""
        if token in self.stand_ins:
            return str(self.stand_ins[token])
        if token.startswith("out/"):  # what an evaluation writes: here, not in the repository
            return str(self.tmp / token)
        return token

    def inputs_exist(self, argv: list[str], command: str) -> bool:
        """Whether every path the arguments read exists here (else the command needs files a test cannot have). A
        file it reads from what earlier README commands write (``out/...``) must be there."""
        for i, token in enumerate(argv):
            flag = argv[i - 1] if i else ""
            if token.startswith("-") or flag in OUTPUT_FLAGS:
                continue
            if ("/" in token or re.search(r"\.(json|pth|pt|safetensors|yaml)$", token)) and not Path(token).exists():
                if Path(token).is_relative_to(self.tmp):
                    pytest.fail(f"README command {command!r} reads {token}, which no README command before it wrote")
                return False
        return True


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("readme")
    run = make_tiny_run(tmp / "runs" / "demo")
    recorded = load_recipe("tiny")
    recorded.run.out = str(run)
    (run / "config.json").write_text(json.dumps(config_to_dict(recorded)))  # what --resume reads
    sqa = make_scienceqa(tmp / "scienceqa", n_train=4, n_val=2, n_test=4)
    coco = make_coco(tmp / "coco", n_train=2, n_restval=0, n_val=1, n_test=2)
    stand_ins = {
        "runs/<name>": run,
        "runs/demo": run,
        "/data/scienceqa": sqa,
        "/data/coco": coco,
        "dataset_coco.json": coco / "dataset_coco.json",
        "/data/coco/dataset_coco.json": coco / "dataset_coco.json",
        "my.yaml": tmp / "my.yaml",
    }
    return World(tmp, stand_ins)


def train_py(argv: list[str], world: World, command: str, redirect: Path | None, *, record: bool = True) -> None:
    """train.py: --help and --print_config run (printing and exiting 0); any other command line is parsed and
    checked, settings and paths, as train.py does before it trains. ``record``: list it as a README command."""
    from training.cli import parse_args

    if "--help" in argv or "--print_config" in argv:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 0, command
        assert "--model.base" in out.getvalue() or "model:\n  base:" in out.getvalue(), command
        if redirect is not None:
            redirect.write_text(out.getvalue())
        if record:
            world.ran.append(command)
        return
    parse_args(argv)  # a usage error exits with status 2, failing the test
    if record:
        world.parsed.append(command)


def python_module(module: str, argv: list[str], world: World, command: str) -> None:
    """``python -m module``: run when every file it reads has a stand-in, else parsed by the module's parser."""
    from eval.common import parse_cli

    cheap = world.inputs_exist(argv, command)
    if module in ("eval.scienceqa", "eval.coco"):
        evaluation = importlib.import_module(module)
        score_option = "predictions" if module == "eval.scienceqa" else "results"
        args = parse_cli(evaluation.build_parser(), argv, score_option=score_option)
        if cheap:
            with pytest.MonkeyPatch.context() as mp:  # Java's PTB tokenizer and METEOR: tests/test_eval_coco.py
                mp.setattr("shutil.which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k))
                assert evaluation.main(argv) == 0, command
            if args.output:
                assert (Path(args.output) / "metrics.json").is_file(), command
    elif module == "app":
        from app.__main__ import build_parser, load_engine

        args = build_parser().parse_args(argv)
        if cheap:  # loaded as `python -m app` loads it; serving would wait for Ctrl-C
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("app.__main__.RUNS_DIR", world.stand_ins["runs/demo"].parent)
                engine = load_engine(args)
            assert engine.name == "run demo", command
    elif module == "model.export":
        from model.export import build_parser

        build_parser().parse_args(argv)
        cheap = False  # a V2 run of the query path to export is more than a stand-in
    elif module == "bench":
        from bench.__main__ import build_parser

        build_parser().parse_args(argv)
        cheap = False  # minutes of measuring, or a 7B model's meta build
    else:
        pytest.fail(f"README command {command!r}: no case for python -m {module} in {__file__}")
    (world.ran if cheap else world.parsed).append(command)


def make(argv: list[str], world: World, command: str) -> None:
    """make TARGET: a dry run (`make -n`) that knows the target; the train.py command it would run is parsed."""
    dry = subprocess.run(["make", "-n", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, (command, dry.stderr)
    for train_args in re.findall(r"train\.py ([^;\n]*)", dry.stdout):
        if "--resume" not in train_args:  # the fresh run's command line (the resumed one reads its config.json)
            train_py(shlex.split(train_args), world, f"{command}: train.py {train_args}", None, record=False)
    world.ran.append(command)


def check(command: str, world: World) -> None:
    argv = [world.substitute(token) for token in shlex.split(command, comments=True)]
    redirect = None
    if ">" in argv:
        at = argv.index(">")
        argv, redirect = argv[:at], Path(argv[at + 1])
    program, *args = argv
    if program == "make":
        make(args, world, command)
    elif program == ".venv/bin/python" and args[0] == "train.py":
        train_py(args[1:], world, command, redirect)
    elif program == ".venv/bin/python" and args[0] == "-m":
        python_module(args[1], args[2:], world, command)
    elif program == ".venv/bin/torchrun":
        from torch.distributed.run import get_args_parser

        launched = get_args_parser().parse_args(args)
        assert launched.training_script == "train.py", command
        train_py(launched.training_script_args, world, command, None)
    elif program == ".venv/bin/hf":  # huggingface_hub's CLI (a login): its subcommand must exist
        known = subprocess.run([program, *args, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert known.returncode == 0, (command, known.stderr)
        world.parsed.append(command)
    else:
        pytest.fail(f"README command {command!r}: no case for {program} in {__file__}")


def test_every_readme_command_runs_or_parses_as_written(world, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's relative paths (.venv, runs/, app/assets) are the repository's
    commands = readme_commands()
    for command in commands:
        check(command, world)
    assert sorted(world.ran + world.parsed) == sorted(commands)
    ran = set(world.ran)
    # the evaluations and their score-only forms, on what the first wrote (a wrong file name fails above)
    assert {
        c for c in commands if c.startswith(".venv/bin/python -m eval.") and ("runs/<name>" in c or "out/" in c)
    } <= ran
    assert any(c.startswith(".venv/bin/python -m app --checkpoint runs/demo") for c in ran)
    assert any(c.startswith("make train") for c in ran) and any(c.startswith("make test") for c in ran)


def test_make_venv_torch_cpu_installs_pytorchs_cpu_wheels_of_the_same_versions():
    """`make venv TORCH=cpu` (README, "The first five minutes"): the pinned pair from PyTorch's CPU index; the
    default takes the registry's; another value is refused."""

    def dry(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", "-B", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)

    pins = "torch==2.14.1 torchvision==0.29.1"
    assert "`make venv TORCH=cpu`" in README.read_text()
    cpu, default = dry("venv", "TORCH=cpu").stdout, dry("venv").stdout
    assert f"pip install -q {pins} --index-url https://download.pytorch.org/whl/cpu\n" in cpu
    assert f"pip install -q {pins} \n" in default and "index-url" not in default
    refused = dry("venv", "TORCH=gpu")
    assert refused.returncode != 0 and "TORCH=gpu: choose cuda" in refused.stderr


def test_the_readmes_python_blocks_compile():
    blocks = readme_blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, str(README), "exec")

"""training/cli.py: recipes as defaults, --section.field flags and short flags, --config / --print_config, --resume,
one-line usage errors and unknown-flag suggestions."""

import json

import pytest
import yaml

from model import LlamaAdapterConfig
from training import config as settings
from training.cli import SHORT_FLAGS, parse_args
from training.config import TrainConfig, config_to_dict, load_recipe, recipe_names
from training.state import RESUME_FREE, Resume


def resolved(*argv: str) -> TrainConfig:
    return parse_args(list(argv)).config


def usage_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The one error line of a refused command line (exit status 2, like argparse)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("train.py: error: ")
    return line.removeprefix("train.py: error: ")


def write_run_config(run_dir, cfg: TrainConfig) -> None:
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg)))


def test_the_recipes_are_the_shipped_files_the_default_first():
    assert recipe_names() == ["tiny", "alpaca", "coco", "demo", "scenes", "scienceqa", "v2"]
    for name in recipe_names():
        assert load_recipe(name).recipe == name


def test_no_arguments_is_the_tiny_recipe():
    cfg = resolved()
    assert cfg == load_recipe("tiny")
    assert cfg.recipe == "tiny" and cfg.data.task == "scienceqa" and cfg.data.synthetic and cfg.uses_images
    assert cfg.model.visual.clip_model == "tiny" and cfg.run.device == "cpu"
    assert cfg.model.base == str(settings.TINY_BASE)
    assert cfg.data.path == str(settings.REPO_ROOT / ".data" / "scienceqa-synthetic")


def test_the_demo_recipe_is_what_make_train_runs_the_mix_on_the_demo_base():
    cfg = resolved("--recipe", "demo")
    assert cfg.data.task == "mix" and cfg.data.synthetic and not cfg.data.group_by_length and cfg.uses_images
    assert cfg.model.base == str(settings.REPO_ROOT / "assets" / "tiny-demo-base")
    assert cfg.data.path == str(settings.REPO_ROOT / ".data" / "demo-mix")
    assert "train.py --recipe demo" in (settings.REPO_ROOT / "Makefile").read_text()


def test_paper_recipes_keep_the_official_defaults():
    base = ["--base", "/llama/7B", "--data", "/data/x", "--clip-weights", "/clip/ViT-L-14.safetensors"]
    for recipe in ("scienceqa", "coco", "alpaca"):
        cfg = resolved("--recipe", recipe, *base)
        assert cfg.model.llama_adapter == LlamaAdapterConfig(prompt_len=10, n_layers=30, gate_fn="tanh")
        assert (cfg.optim.blr, cfg.optim.weight_decay, cfg.optim.betas) == (9e-3, 0.02, (0.9, 0.95))
        assert (cfg.optim.batch_size, cfg.optim.warmup_epochs, cfg.optim.lr) == (4, 2.0, None)
        assert cfg.data.task == recipe
    assert resolved("--recipe", "alpaca", *base).optim.epochs == 5
    assert resolved("--recipe", "scienceqa", *base).model.visual.clip_model == "ViT-L-14-quickgelu"
    assert not resolved("--recipe", "alpaca", *base).uses_images
    # The recipe sets the defaults wherever it stands; the flags override it.
    assert resolved("--lr", "0.5", "--recipe", "coco", *base).optim.lr == 0.5


def test_every_setting_can_be_overridden_by_dotted_name_or_short_flag():
    cfg = resolved(
        "--optim.lr", "1e-3",
        "--epochs", "3",
        "--model.llama_adapter.prompt_len", "4",
        "--model.visual.feature_layers", "0,1",
        "--optim.betas", "0.8,0.99",
        "--clip", "ViT-B-32",
        "--run.eval", "false",
        "--run.progress",
        "--optim.grad_clip", "none",
        "--no-images",
        "--data", "/somewhere",
        "--data.synthetic", "false",
        "--seed=7",
        "--model.clip_weights", "null",
    )  # fmt: skip
    assert cfg.optim.lr == 1e-3 and cfg.optim.epochs == 3 and cfg.model.llama_adapter.prompt_len == 4
    assert cfg.model.visual.feature_layers == (0, 1) and cfg.optim.betas == (0.8, 0.99)
    assert cfg.model.visual.clip_model == "ViT-B-32" and cfg.run.eval is False and cfg.run.progress is True
    assert cfg.optim.grad_clip is None and cfg.data.images is False and not cfg.uses_images
    assert cfg.data.path == "/somewhere" and cfg.run.seed == 7 and cfg.model.clip_weights is None
    # Untouched settings keep the recipe's values.
    assert cfg.optim.batch_size == load_recipe("tiny").optim.batch_size
    # The value forms of jsonargparse work too, and "" is the empty list as before.
    assert resolved("--model.visual.feature_layers", "").model.visual.feature_layers == ()
    assert resolved("--model.visual.feature_layers", "[2, 3]").model.visual.feature_layers == (2, 3)
    assert resolved("--optim.betas=[0.5,0.6]", "--optim.grad_clip=null").optim.betas == (0.5, 0.6)
    assert resolved("--model.tokenizer", "none").model.tokenizer is None


def test_help_prints_every_field_doc_with_the_recipe_value(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--recipe", "alpaca", "--help"], description="Train it.")
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the formatter wraps lines
    assert out.count("Train it. Defaults below: recipe 'alpaca'.") == 1
    for path in (
        "model.base",
        "model.llama_adapter.prompt_len",
        "model.visual.feature_layers",
        "data.max_len",
        "optim.betas",
        "run.eval_limit",
    ):
        assert f"--{path} " in out
    assert (
        "Base learning rate: lr = blr * effective_batch / 256 (the official V1 scaling rule). (type: float, default:"
        in out
    )
    assert "K: learnable prompt vectors per adapted layer. (type: int, default: 10)" in out
    assert "Passes over the training split. Short: --epochs. (type: int, default: 5)" in out
    assert "Short: --no-images (false). (type: bool, default: False)" in out
    for flag in ("--recipe", "--config", "--print_config", "--resume", "--allow-changes"):
        assert f"{flag} " in out
    assert "--print-config" not in out  # one way to print the settings: jsonargparse's YAML
    assert "--data CONFIG" not in out  # --data is short for --data.path, not jsonargparse's section file


def test_every_short_flag_sets_its_setting():
    for flag, path in SHORT_FLAGS.items():
        value = {"optim.lr": "0.25", "optim.epochs": "2", "run.seed": "5"}.get(path, "/x")
        section, *rest = path.split(".")
        got = getattr(resolved(flag, value, "--no-images", "--data.synthetic", "false"), section)
        for part in rest:
            got = getattr(got, part)
        assert str(got) == value, flag


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim.batch_size", "0"], "optim.batch_size must be >= 1, got 0"),
        (["--optim.lr", "fast"], "argument --optim.lr: 'fast': expected a number or null"),
        (["--lr", "fast"], "argument --optim.lr: 'fast': expected a number or null"),
        (["--optim.epochs", "2.5"], "argument --optim.epochs: '2.5': expected an integer"),
        (["--optim.betas", "0.9"], "argument --optim.betas: '[0.9]': expected 2 comma-separated values, each a number"),
        (["--run.eval", "maybe"], "argument --run.eval: 'maybe': expected true or false"),
        (["--model.dtype", "int8"], "argument --model.dtype: 'int8': expected one of auto, float32, bfloat16, float16"),
        (
            ["--model.llama_adapter.gate_fn", "sigmoid"],
            "argument --model.llama_adapter.gate_fn: 'sigmoid': expected one of tanh, raw",
        ),
        (["--optim.warmup_epochs", "9"], "optim.warmup_epochs must be in [0, epochs=6], got 9.0"),
        (["--model.llama_adapter.prompt_len", "0"], "LlamaAdapterConfig.prompt_len must be positive, got 0"),
        (["--recipe", "imagenet"], "argument --recipe: invalid choice: 'imagenet' (choose from 'tiny', 'alpaca',"),
        (["--optim.lr"], "argument --optim.lr: expected one argument"),
        (["--recipe", "coco", "--base", "/b"], "recipe 'coco' needs --data: the COCO folder holding dataset_coco.json"),
        (["--recipe", "alpaca", "--data", "/a.json"], "recipe 'alpaca' needs --base: a Meta or Hugging Face LLaMA"),
    ],
)
def test_bad_settings_give_one_error_line_naming_the_flag(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--lerning-rate", "1"],
            "unrecognized arguments: --lerning-rate 1; --lerning-rate: did you mean --optim.lr (--lr)?",
        ),
        (["--epoch", "2"], "unrecognized arguments: --epoch 2; --epoch: did you mean --optim.epochs (--epochs)?"),
        (["--optim.epoch", "2"], "--optim.epoch: did you mean --optim.epochs (--epochs)"),
        (["--optim.learning_rate", "1"], "unrecognized arguments: --optim.learning_rate 1"),
        (["--rec", "coco"], "unrecognized arguments: --rec coco; --rec: did you mean --recipe?"),
        (["--batchsize=8"], "--batchsize: did you mean --optim.batch_size or --run.eval_batch_size?"),
    ],
)
def test_unknown_flags_are_refused_with_the_closest_known_one_never_taken_as_abbreviations(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


def test_print_config_fed_back_with_config_gives_the_same_run(tmp_path, capsys):
    argv = ["--recipe", "coco", "--base", "/llama", "--data", "/coco", "--lr", "0.01", "--optim.betas", "0.8,0.9"]
    argv += ["--model.visual.feature_layers", "", "--run.eval_limit", "5", "--no-images"]
    with pytest.raises(SystemExit) as exc:
        parse_args([*argv, "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("recipe: coco\nmodel:\n  base: /llama\n")
    (tmp_path / "run.yaml").write_text(printed)
    assert resolved("--config", str(tmp_path / "run.yaml")) == resolved(*argv)
    # JSON too (YAML's subset), and flags after the file override it.
    (tmp_path / "run.json").write_text(json.dumps(config_to_dict(resolved(*argv))))
    again = resolved("--config", str(tmp_path / "run.json"), "--lr", "0.02")
    assert again.optim.lr == 0.02 and again.recipe == "coco" and again.optim.betas == (0.8, 0.9)
    # A resumed run prints the settings it would continue with.
    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, resolved(*argv))
    with pytest.raises(SystemExit) as exc:
        parse_args(["--resume", str(run), "--print_config"])
    assert exc.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed) | {
        "run": {**yaml.safe_load(printed)["run"], "out": str(run)}
    }


def test_the_json_flag_of_before_is_refused_naming_print_config(capsys):
    assert "--print-config: did you mean --print_config" in usage_error(capsys, "--print-config")


def test_a_partial_config_file_starts_from_the_recipe_it_names(tmp_path):
    (tmp_path / "mine.yaml").write_text("recipe: alpaca\nmodel:\n  base: /llama\ndata:\n  path: /a.json\n")
    cfg = resolved("--config", str(tmp_path / "mine.yaml"))
    assert cfg == resolved("--recipe", "alpaca", "--base", "/llama", "--data", "/a.json")


def test_bad_config_files_name_the_setting_or_the_file(tmp_path, capsys):
    (tmp_path / "unknown.yaml").write_text("optim:\n  momentum: 0.9\n")
    assert "Group 'optim' does not accept option 'momentum'" in usage_error(
        capsys, "--config", str(tmp_path / "unknown.yaml")
    )
    (tmp_path / "value.yaml").write_text("optim:\n  lr: fast\n")
    assert usage_error(capsys, "--config", str(tmp_path / "value.yaml")) == (
        "argument --optim.lr: 'fast': expected a number or null"
    )
    (tmp_path / "range.json").write_text('{"optim": {"epochs": 0}}')
    assert usage_error(capsys, "--config", str(tmp_path / "range.json")) == "optim.epochs must be >= 1, got 0"
    missing = tmp_path / "missing.yaml"
    assert f"File does not exist: '{missing}'" in usage_error(capsys, "--config", str(missing))


def test_resume_reads_the_recorded_config_and_applies_overrides(tmp_path, capsys):
    cfg = resolved("--optim.blr", "0.5", "--run.stop_after", "3")
    write_run_config(tmp_path, cfg)
    again = parse_args(["--resume", str(tmp_path), "--run.log_every", "2"])
    assert again.resume == Resume(tmp_path) and again.config.optim.blr == 0.5 and again.config.run.log_every == 2
    assert again.config.run.stop_after is None  # per invocation: a resumed run goes on
    assert again.config.run.out == str(tmp_path)
    assert "drop --recipe" in usage_error(capsys, "--resume", str(tmp_path), "--recipe", "tiny")
    assert "config.json: not found" in usage_error(capsys, "--resume", str(tmp_path / "nothing"))
    (tmp_path / "config.json").write_text(json.dumps({**config_to_dict(cfg), "optimizer": {}}))
    assert "unknown setting(s): optimizer" in usage_error(capsys, "--resume", str(tmp_path))


def test_resume_refuses_changed_settings_naming_old_and_new_values(tmp_path, capsys):
    cfg = resolved("--optim.lr", "0.01")
    write_run_config(tmp_path, cfg)
    err = usage_error(capsys, "--resume", str(tmp_path), "--lr", "0.02", "--seed", "3", "--run.log_every", "2")
    assert err == (
        f"--resume {tmp_path} continues the run with the settings of {tmp_path / 'config.json'}; these differ: "
        "--optim.lr 0.01 -> 0.02, --run.seed 0 -> 3. Drop them, or add --allow-changes to apply them from the saved "
        "step on (recorded in config.json)"
    )
    # The value it already has, and settings that do not change what is trained, are no change.
    same = parse_args(["--resume", str(tmp_path), "--lr", "0.01", "--optim.batch_size", "8", "--run.eval", "false"])
    assert same.resume == Resume(tmp_path) and same.config.optim.batch_size == 8
    allowed = parse_args(["--resume", str(tmp_path), "--lr", "0.02", "--seed", "3", "--allow-changes"])
    assert allowed.resume == Resume(
        tmp_path, allow_changes=True, changes={"optim.lr": (0.01, 0.02), "run.seed": (0, 3)}
    )
    assert allowed.config.optim.lr == 0.02 and allowed.config.run.seed == 3
    assert usage_error(capsys, "--allow-changes") == "--allow-changes applies to --resume RUN_DIR only"


def test_resume_counts_a_config_file_like_flags(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_config(run_dir, resolved())
    (tmp_path / "more.yaml").write_text("optim:\n  epochs: 9\nrun:\n  save_every: 7\n")
    err = usage_error(capsys, "--resume", str(run_dir), "--config", str(tmp_path / "more.yaml"))
    assert "these differ: --optim.epochs 6 -> 9. Drop them" in err
    allowed = parse_args(["--resume", str(run_dir), "--config", str(tmp_path / "more.yaml"), "--allow-changes"])
    assert allowed.resume.changes == {"optim.epochs": (6, 9)} and allowed.config.run.save_every == 7
    assert "run.save_every" in RESUME_FREE


def test_a_real_clip_tower_without_weights_is_refused_unless_random_is_asked_for(capsys, tmp_path):
    argv = ["--recipe", "scienceqa", "--base", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert usage_error(capsys, *argv) == (
        "CLIP model 'ViT-L-14-quickgelu' needs --clip-weights FILE (a local weights file; nothing is downloaded). "
        "--model.random_clip true trains on a random tower instead (tests and benchmarks only), --no-images "
        "trains without images"
    )
    assert resolved(*argv, "--model.random_clip", "true").model.random_clip
    assert not resolved(*argv, "--no-images").uses_images
    assert list(tmp_path.iterdir()) == []  # nothing written by the refused command


def test_synthetic_data_is_generated_only_where_the_recipe_puts_it(capsys, tmp_path):
    typo = tmp_path / "typo" / "path"
    message = usage_error(capsys, "--data", str(typo))
    assert message.startswith(f"--data {typo}: no such dataset. The tiny recipe generates its synthetic data only at ")
    assert not typo.parent.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    assert resolved("--data", str(existing)).data.path == str(existing)  # an existing folder is read as it is


def test_a_run_that_ran_out_of_memory_resumes_with_checkpointing_on(tmp_path):
    """The memory switches change how a step is computed, not the adapter: a resume may turn them on."""
    write_run_config(tmp_path, resolved())
    flags = ["--train.activation_checkpointing", "true", "--train.loss_chunk", "256", "--train.compile", "true"]
    resumed = parse_args(["--resume", str(tmp_path), *flags])
    assert resumed.resume.changes == {}
    assert resumed.config.train.activation_checkpointing and resumed.config.train.compile
    assert resumed.config.train.loss_chunk == 256

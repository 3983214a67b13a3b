"""training/migration.py: a run's config.json recorded before a section was renamed reads as today's settings, and
the old flag of a renamed section is refused naming the new one."""

import json

import pytest

from model.methods import LlamaAdapterConfig
from training.cli import Resume, parse_args, read_run_config
from training.config import ConfigError, config_to_dict
from training.migration import RENAMED_SECTIONS, check_renamed_flags, migrate_recorded_settings


def old_format(values: dict) -> dict:
    """config.json as train.py wrote it while LLaMA-Adapter V1's settings were the section model.adapter."""
    model = dict(values["model"])
    model["adapter"] = model.pop("llama_adapter")
    return {**values, "model": model}


def test_the_old_adapter_section_resumes_with_the_same_settings(tmp_path):
    cfg = parse_args(["--model.llama_adapter.prompt_len", "4", "--model.llama_adapter.n_layers", "2"]).config
    (tmp_path / "config.json").write_text(json.dumps(old_format(config_to_dict(cfg))))
    recorded = read_run_config(tmp_path)
    assert recorded.model.llama_adapter == LlamaAdapterConfig(prompt_len=4, n_layers=2, gate_fn="tanh")
    assert config_to_dict(recorded) == config_to_dict(cfg)
    again = parse_args(["--resume", str(tmp_path)])
    assert again.resume == Resume(tmp_path)  # no changed setting
    assert again.config.model.llama_adapter == cfg.model.llama_adapter


def test_migration_moves_only_an_old_section_and_keeps_its_values():
    values = {"model": {"method": "llama_adapter", "adapter": {"prompt_len": 7}}, "run": {"seed": 1}}
    migrated = migrate_recorded_settings(json.loads(json.dumps(values)))
    assert migrated == {"model": {"method": "llama_adapter", "llama_adapter": {"prompt_len": 7}}, "run": {"seed": 1}}
    # Both names (a hand-edited file): nothing is guessed, the old one stays and is refused as unknown.
    both = {"model": {"adapter": {}, "llama_adapter": {"prompt_len": 7}}}
    assert migrate_recorded_settings(json.loads(json.dumps(both))) == both
    assert RENAMED_SECTIONS == {"model.adapter": "model.llama_adapter"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model.adapter.len", "4"],
            "--model.adapter.len: the settings --model.adapter.* are now --model.llama_adapter.* (prompt_len, "
            "n_layers, gate_fn)",
        ),
        (
            ["--model.adapter.prompt_len=4"],
            "--model.adapter.prompt_len: the settings --model.adapter.* are now --model.llama_adapter.* (prompt_len, "
            "n_layers, gate_fn); use --model.llama_adapter.prompt_len",
        ),
    ],
)
def test_an_old_adapter_flag_is_refused_naming_the_new_one(capsys, argv, message):
    with pytest.raises(ConfigError) as e:
        check_renamed_flags(argv)
    assert str(e.value) == message
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and f"train.py: error: {message}\n" in capsys.readouterr().err


def test_todays_flags_pass():
    check_renamed_flags(["--model.llama_adapter.prompt_len", "4", "--model.adapters", "--lr", "0.1"])


def test_a_settings_file_with_the_old_section_is_refused_naming_the_file(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("recipe: tiny\nmodel:\n  adapter:\n    prompt_len: 4\n")
    for argv in (["--config", str(old)], [f"--config={old}"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        err = capsys.readouterr().err
        assert f"{old}: the section model.adapter is now model.llama_adapter (prompt_len" in err
    new = tmp_path / "new.yaml"
    new.write_text("recipe: tiny\nmodel:\n  llama_adapter:\n    prompt_len: 4\n")
    assert parse_args(["--config", str(new)]).config.model.llama_adapter.prompt_len == 4

"""Settings recorded by earlier versions, read in today's form: a run's config.json keeps resuming after a section
is renamed or a method gains a field, and the old flag of a renamed section is refused naming the new one."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from model.config import ConfigError
from training.config import TrainConfig

RENAMED_SECTIONS = {"model.adapter": "model.llama_adapter"}
"""Settings sections renamed since runs were first recorded, old dotted path -> new (the same parent section):
LLaMA-Adapter V1's settings were model.adapter until every method's section was named after its method."""


def migrate_recorded_settings(values: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded settings (the values of its config.json) in today's form, changed in place and returned: a
    section under its old name (``RENAMED_SECTIONS``) moved to its new one, then each method section's missing
    fields filled from the method config's ``recorded_defaults``, so a run from before a field existed resumes
    with the behaviour it trained with."""
    for old, new in RENAMED_SECTIONS.items():
        *parents, old_key = old.split(".")
        new_key = new.rsplit(".", 1)[-1]
        parent: Any = values
        for key in parents:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and old_key in parent and new_key not in parent:
            parent[new_key] = parent.pop(old_key)
    _fill_recorded_method_defaults(values)
    return values


def _fill_recorded_method_defaults(values: dict[str, Any]) -> None:
    from model.methods import method_class, method_names
    from model.methods.base import with_recorded_defaults

    model = values.get("model")
    if isinstance(model, dict):
        for name in method_names():
            if isinstance(model.get(name), dict):
                model[name] = with_recorded_defaults(method_class(name).config_class, model[name])


def check_renamed_flags(argv: list[str]) -> None:
    """Refuse a flag of a renamed section (``--model.adapter.prompt_len 4``), or a ``--config FILE`` holding that
    section (``model: adapter: ...``, as --print_config wrote it before), with a ConfigError that names the
    section's new name and its settings."""
    for n, arg in enumerate(argv):
        flag = arg.split("=", 1)[0]
        if flag == "--config":
            _check_config_file(arg.split("=", 1)[1] if "=" in arg else (argv[n + 1] if n + 1 < len(argv) else ""))
        for old, new in RENAMED_SECTIONS.items():
            if flag != f"--{old}" and not flag.startswith(f"--{old}."):
                continue
            fields = _section_fields(new)
            message = f"{flag}: the settings --{old}.* are now --{new}.* ({', '.join(fields)})"
            setting = flag[len(old) + 3 :]
            raise ConfigError(f"{message}; use --{new}.{setting}" if setting in fields else message)


def _check_config_file(path: str) -> None:
    """A settings file naming a renamed section is refused, naming the file (jsonargparse would only say that the
    group has no such option); an unreadable file is left to jsonargparse, which names the problem."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return
    for old, new in RENAMED_SECTIONS.items():
        section: Any = values
        for key in old.split("."):
            section = section.get(key) if isinstance(section, dict) else None
        if section is not None:
            fields = ", ".join(_section_fields(new))
            raise ConfigError(f"{path}: the section {old} is now {new} ({fields}); rename it in the file")


def _section_fields(path: str) -> list[str]:
    """The setting names of the section at dotted ``path`` of TrainConfig."""
    cls: Any = TrainConfig
    for key in path.split("."):
        cls = typing.get_type_hints(cls)[key]
    return [f.name for f in dataclasses.fields(cls)]

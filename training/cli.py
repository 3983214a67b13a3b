"""The command line of train.py: jsonargparse over the dataclasses of ``training.config``.

Every setting is a flag ``--section.field VALUE`` (nested: ``--model.visual.query_len 10``) whose ``--help`` text
is the field's docstring. ``--recipe NAME`` takes the defaults from ``training/recipes/NAME.yaml`` (tiny when
absent), ``--config FILE`` (YAML or JSON, such as the output of ``--print_config``) sets any of them, and later
flags override earlier ones; ``--resume RUN_DIR`` starts from the settings recorded in the run's config.json
instead. A few common settings have a short flag (``--base``, ``--data``, ``--lr`` ...), and the value forms of
the command line before jsonargparse still work: ``none`` for null, ``0.9,0.95`` and ``""`` for a list.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, set_parsing_settings

from training.config import (
    DEFAULT_RECIPE,
    RECIPE_DIR,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_recipe,
    recipe_names,
)
from training.migration import check_renamed_flags
from training.state import CONFIG_FILE, Resume, describe_changes, read_run_config, resume_changes

SECTIONS = ("model", "data", "optim", "train", "dist", "run")

SHORT_FLAGS: dict[str, str] = {
    "--base": "model.base",
    "--method": "model.method",
    "--tokenizer": "model.tokenizer",
    "--clip": "model.visual.clip_model",
    "--clip-weights": "model.clip_weights",
    "--data": "data.path",
    "--lr": "optim.lr",
    "--epochs": "optim.epochs",
    "--out": "run.out",
    "--seed": "run.seed",
}
"""Short flag -> the setting it sets; ``--no-images`` is short for ``--data.images false``."""
SHORT_FLAG_OF = {path: flag for flag, path in SHORT_FLAGS.items()}
"""Setting -> its short flag (SHORT_FLAGS reversed)."""


@dataclass
class Invocation:
    """What the command line asks for: the resolved settings, and whether to resume (``--print_config``, which
    prints them, is jsonargparse's and exits while parsing)."""

    config: TrainConfig
    resume: Resume | None


# ==== the command line ==============================================================================================
def parse_args(argv: list[str] | None = None, description: str | None = None) -> Invocation:
    """Recipe (or the resumed run's config.json), then --config files and flags in command-line order, validated
    together. ``description`` heads ``--help`` (train.py passes its summary and usage examples).

    Exits with status 2 and one ``error:`` line naming the flag or setting for anything unknown or invalid.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argparse.ArgumentParser(prog="train.py", add_help=False, allow_abbrev=False)  # flags that are no setting
    own.add_argument("--resume", type=Path)
    own.add_argument("--allow-changes", action="store_true")
    known, argv = own.parse_known_args(argv)
    types = _setting_types(TrainConfig)
    argv = _expand(argv, types)
    try:
        check_renamed_flags(argv)
        if known.resume is not None:
            if any(arg.split("=")[0] == "--recipe" for arg in argv):
                raise ConfigError("--resume continues a run with its recorded settings; drop --recipe")
            defaults = read_run_config(known.resume)
            defaults.run.out = str(known.resume)
        else:
            defaults = load_recipe(_chosen_recipe(argv))
    except ConfigError as e:
        _fail(str(e))
    parser = _build_parser(defaults, known.resume, description, types)
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        _fail(_one_line(str(e), types))
    values = {key: value for key, value in namespace.as_dict().items() if key in ("recipe", *SECTIONS)}
    if known.resume is not None:
        values["run"]["out"] = str(known.resume)
    try:
        cfg = config_from_dict(TrainConfig, values)
        cfg.check_inputs()
    except ValueError as e:
        _fail(str(e))
    if known.resume is None:
        if known.allow_changes:
            _fail("--allow-changes applies to --resume RUN_DIR only")
        return Invocation(cfg, None)
    changes = resume_changes(defaults, cfg)
    if changes and not known.allow_changes:
        _fail(
            f"--resume {known.resume} continues the run with the settings of {known.resume / CONFIG_FILE}; these "
            f"differ: {describe_changes(changes)}. Drop them, or add --allow-changes to apply them from the saved "
            "step on (recorded in config.json)"
        )
    return Invocation(cfg, Resume(known.resume, known.allow_changes, changes))


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (type and default after each docstring), with train.py's examples kept as laid out."""


def _build_parser(
    defaults: TrainConfig, resume: Path | None, description: str | None, types: dict[str, Any]
) -> ArgumentParser:
    """--recipe, --config, --print_config, the flags of parse_args, and --section.field for every setting (``types``:
    those of _setting_types), with the recipe's (or the resumed run's) values as defaults."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the string under each field is its help
    source = f"the run in {resume}" if resume is not None else f"recipe {defaults.recipe!r}"
    parser = ArgumentParser(
        prog="train.py",
        description=f"{description or ''}\n\nDefaults below: {source}.".strip(),
        formatter_class=_HelpFormatter,
        exit_on_error=False,
        allow_abbrev=False,  # --epoch is not --epochs
    )
    parser.add_argument(
        "--recipe", choices=recipe_names(), help="preset of every setting below; " + _recipe_summaries()
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML or JSON file of settings (the form --print_config writes)"
    )
    # Handled by parse_args before jsonargparse (never part of a printed or loaded configuration): listed for --help.
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=argparse.SUPPRESS,
        help="continue the run in RUN_DIR from its state.pt with the settings of its config.json; a setting that "
        "changes what is trained (anything but the logging, saving and evaluation settings, data.num_workers and "
        "batch_size/grad_accum at the same product) is refused unless --allow-changes",
    )
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        default=argparse.SUPPRESS,
        help="with --resume: apply the settings given that differ from the run's (and a changed training set, "
        "continued from the next epoch boundary); each change is recorded with its step under 'changes' in "
        "config.json",
    )
    parser.add_class_arguments(TrainConfig, nested_key=None, skip={"recipe"}, fail_untyped=True)
    parser.set_defaults(config_to_dict(defaults))
    shorts = SHORT_FLAG_OF | {"data.images": "--no-images (false)"}
    # the sections (--model, --model.visual ...): every proper prefix of a setting's dotted path
    groups = {f"--{path.rsplit('.', n)[0]}" for path in types for n in range(1, path.count(".") + 1)}
    for action in parser._actions:  # noqa: SLF001 (argparse has no public iterator over its actions)
        flag = action.option_strings[0] if action.option_strings else ""
        if flag in groups:  # jsonargparse's "--data CONFIG" per section: --data is short for --data.path here
            action.help = argparse.SUPPRESS
        if getattr(action, "_typehint", None) is bool:
            action.nargs, action.const = "?", True  # "--run.eval" alone means true
        if flag[2:] in shorts:
            action.help = f"{action.help} Short: {shorts[flag[2:]]}."
    return parser


def _recipe_summaries() -> str:
    """'tiny: <first line of tiny.yaml>; ...'"""
    firsts = ((name, (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()[0]) for name in recipe_names())
    return "; ".join(f"{name}: {line.lstrip('# ').rstrip('.')}" for name, line in firsts)


def _chosen_recipe(argv: list[str]) -> str:
    """The recipe whose values are the defaults: the last --recipe NAME or ``recipe:`` of a --config FILE."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--recipe", dest="recipes", action="append")
    pre.add_argument("--config", dest="recipes", action="append", type=_recipe_in_file)
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:  # a flag without its value: jsonargparse reports it
        return DEFAULT_RECIPE
    named = [name for name in known.recipes or [] if name is not None]
    return named[-1] if named and named[-1] in recipe_names() else DEFAULT_RECIPE  # jsonargparse refuses others


def _recipe_in_file(path: str) -> str | None:
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):  # jsonargparse names the file and the problem
        return None
    return values.get("recipe") if isinstance(values, dict) else None


# ==== settings and flags ============================================================================================
def _setting_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> type of every leaf setting of a (nested) dataclass: {'optim.lr': float | None, ...}."""
    types = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            types |= _setting_types(tp, f"{prefix}{name}.")
        elif prefix:  # TrainConfig.recipe is --recipe
            types[f"{prefix}{name}"] = tp
    return types


def _expand(argv: list[str], types: dict[str, Any]) -> list[str]:
    """Short flags -> their dotted names (exact matches only), and the value forms kept from the command line
    before jsonargparse: ``none`` -> null, and ``0.9,0.95`` or ``""`` -> a list, for the settings of those types."""
    out: list[str] = []
    pending: Any = None  # the type of the setting whose value comes next
    for arg in argv:
        if pending is not None:
            out.append(_old_value_form(arg, pending))
            pending = None
            continue
        if arg == "--no-images":
            out.append("--data.images=false")
            continue
        flag, eq, value = arg.partition("=")
        flag = f"--{SHORT_FLAGS[flag]}" if flag in SHORT_FLAGS else flag
        tp = types.get(flag[2:])
        if tp is not None and eq:
            out.append(f"{flag}={_old_value_form(value, tp)}")
        else:
            out.append(flag + eq + value)
            pending = tp if tp is not None and tp is not bool else None
    return out


def _old_value_form(text: str, tp: Any) -> str:
    if type(None) in typing.get_args(tp):
        if text.strip().lower() == "none":
            return "null"
        tp = _without_none(tp)
    if typing.get_origin(tp) is tuple and not text.lstrip().startswith("["):
        return f"[{text}]"
    return text


def _without_none(tp: Any) -> Any:
    """``X`` of the optional type ``X | None``."""
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _expected(tp: Any) -> str:
    """What a value of setting type ``tp`` looks like: 'a number or null', 'one of tanh, raw', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if type(None) in args:
        return f"{_expected(_without_none(tp))} or null"
    if origin is tuple:
        if args[-1] is Ellipsis:
            return f"comma-separated values, each {_expected(args[0])}"
        return f"{len(args)} comma-separated values, each {_expected(args[0])}"
    return _TYPE_NAMES.get(tp, str(tp))


def _one_line(message: str, types: dict[str, Any]) -> str:
    """jsonargparse's message (several lines for a bad value) as one line that names the flag."""
    key = re.match(r'Parser key "([^"]+)"', message)
    given = re.findall(r"(?:Given|Got) value: (.*)", message)
    if key and key[1] in types and given:
        return f"argument --{key[1]}: {given[-1]!r}: expected {_expected(types[key[1]])}"
    if message.startswith("unrecognized arguments:"):
        unknown = [arg.split("=")[0] for arg in message.split()[2:] if arg.startswith("--")]
        hints = [f"{flag}: did you mean {' or '.join(near)}?" for flag in unknown if (near := _near(flag, types))]
        return "; ".join([message, *hints])
    return " ".join(message.split())


def _near(flag: str, types: dict[str, Any]) -> list[str]:
    """Known flags close to an unknown one, by the spelling of the dotted name, its last part or a short flag, or
    by initials (--learning-rate: lr)."""
    word = flag.lstrip("-").replace("-", "_").lower()
    flags = {path: f"--{path}" for path in types} | {path.rsplit(".", 1)[-1]: f"--{path}" for path in types}
    for flag in (*SHORT_FLAGS, "--no-images", "--recipe", "--config", "--print_config", "--resume", "--allow-changes"):
        flags.setdefault(flag[2:].replace("-", "_"), f"--{SHORT_FLAGS[flag]}" if flag in SHORT_FLAGS else flag)
    near = [flags[name] for name in difflib.get_close_matches(word, flags, n=3, cutoff=0.6)]
    initials = "".join(part[0] for part in word.split("_") if part)
    if len(initials) > 1 and initials in flags:
        near.insert(0, flags[initials])
    return [f"{f} ({SHORT_FLAG_OF[f[2:]]})" if f[2:] in SHORT_FLAG_OF else f for f in dict.fromkeys(near)]


def _fail(message: str) -> NoReturn:
    """A usage error as argparse gives one: exit status 2, one line naming what is wrong."""
    sys.stderr.write(
        "usage: train.py [--recipe NAME | --resume RUN_DIR] [--config FILE] [--section.field VALUE ...] (--help: all)\n"
    )
    sys.stderr.write(f"train.py: error: {message}\n")
    raise SystemExit(2)

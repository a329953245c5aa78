"""Command-line options generated from config dataclasses, so that each default lives in its dataclass only.

Every field becomes `--kebab-name` with the field's type and default. Field metadata (see `cli_option`), or
per-call overrides for dataclasses that carry none, add argparse keywords (help, choices, ...) and `flags`,
option strings that replace the generated one (`--lr` for learning_rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

Config = TypeVar("Config")


def cli_option(default: Any, help: str, **argparse_keywords: Any) -> Any:
    """A dataclass field with its command-line help (and optionally flags, choices, ...)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_keywords})


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        if "%(default)" in text:  # argparse.BooleanOptionalAction adds it itself
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _argument_type(annotation: Any) -> tuple[type, dict]:
    """The argparse type of a field's annotation: `X | None` is X (None stays the default), a tuple is nargs="+"."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [member for member in typing.get_args(annotation) if member is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], {"nargs": "+"}
    return annotation, {}


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_class: type,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """One option per field of `config_class` (except `exclude`)."""
    annotations = typing.get_type_hints(config_class)
    for config_field in dataclasses.fields(config_class):
        if config_field.name in exclude:
            continue
        keywords = {**config_field.metadata, **(overrides or {}).get(config_field.name, {})}
        flags = keywords.pop("flags", None)
        if flags is None:
            flags = ("--" + config_field.name.replace("_", "-"),)
        elif "choices" not in keywords:  # --lr LR in the help, not --lr LEARNING_RATE
            keywords.setdefault("metavar", flags[0].lstrip("-").replace("-", "_").upper())
        if config_field.default is dataclasses.MISSING:
            raise TypeError(f"{config_class.__name__}.{config_field.name} needs a default to be an option.")
        kind, shape = _argument_type(annotations[config_field.name])
        if kind is bool:
            keywords["action"] = argparse.BooleanOptionalAction
        else:
            keywords |= {"type": kind, **shape}
        parser.add_argument(*flags, dest=config_field.name, default=config_field.default, **keywords)


def config_from_args(config_class: type[Config], args: argparse.Namespace, **changes: Any) -> Config:
    """The dataclass from the parsed options of `add_config_arguments`; `changes` replace parsed values."""
    values = {}
    for config_field in dataclasses.fields(config_class):
        if hasattr(args, config_field.name):
            value = getattr(args, config_field.name)
            values[config_field.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**(values | changes))


def config_command(config_class: type, config: Any, prefix: str) -> str:
    """`prefix` and the options that give `config` from `add_config_arguments`: its fields that differ from
    their defaults, in field order."""
    words = [prefix]
    for config_field in dataclasses.fields(config_class):
        value = getattr(config, config_field.name)
        if value == config_field.default:
            continue
        flag = (config_field.metadata.get("flags") or ("--" + config_field.name.replace("_", "-"),))[0]
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, tuple):
            words += [flag, *(shlex.quote(str(item)) for item in value)]
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)

"""Typed run configs: the fields every command's settings dataclass is made of, and the checks they share.

Every command's settings are a dataclass whose fields carry their help text (`opt(default, "help")`); the command
line is built from those fields (cli/flags.py), so the `--help` a user reads and the config the code runs on cannot
drift apart. Each field `foo_bar` is the flag `--foo-bar` (`flag_name`); `__post_init__` checks values and raises
`UserError` naming the flag (`check_choice`, `check_positive`). A resolved config is saved as JSON (`to_jsonable`).

This module imports neither torch nor diffusers, so `ft --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

from .errors import UserError

REQUIRED: Any = dataclasses.MISSING


def opt(default: Any, help: str, *, short: str | None = None, panel: str | None = None) -> Any:
    """A config field with its `--help` text. `default` may be a list (copied per instance)."""
    metadata = {"help": help, "short": short, "panel": panel}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    """`dp_degree` -> `--dp-degree`: the spelling errors and docs use."""
    return "--" + field_name.replace("_", "-")


def is_list(tp: Any) -> bool:
    """Whether a field's type is a list (or an optional list): such a flag takes several values."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(is_list(a) for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) is list


def to_jsonable(config: Any) -> dict[str, Any]:
    """The resolved config as plain JSON data, saved beside a run's outputs."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check_choice(value: str, choices: typing.Iterable[str], field_name: str) -> None:
    """Raise a `UserError` naming the flag when `value` is not one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise UserError(f"{flag_name(field_name)} {value!r} is not one of: {', '.join(choices)}.")


def check_positive(value: float, field_name: str, allow_zero: bool = False) -> None:
    """Raise a `UserError` naming the flag when `value` is not > 0 (or >= 0), or not a finite number (nan, inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag_name(field_name)} must be a finite number, got {value}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{flag_name(field_name)} must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


"""The bridge from a config dataclass to command-line flags (typer), and the ways flags reach a command.

The CLI is built from a config's fields (common/config.py), so `--help` and the config cannot drift apart:
- each field `foo_bar` becomes `--foo-bar`; finetrainers' spelling `--foo_bar` is rewritten to it (`kebab_flags`);
- `bool` fields become `--foo/--no-foo`; `list[str]` fields take several values (`--buckets 49x480x720 49x720x480`,
  `expand_multi_value_flags`);
- `--config run.toml` (or .yaml/.json) supplies values (`pop_config_flag`, `read_config_file`); flags on the
  command line override them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from ft.common.config import flag_name, is_list
from ft.common.errors import UserError


def _param_for(field: dataclasses.Field, hints: dict[str, Any]) -> inspect.Parameter:
    import typer

    tp = hints[field.name]
    long = flag_name(field.name)
    names: list[str]
    if tp is bool:
        names = [f"{long}/--no-{long[2:]}"]
    else:
        names = [long]
    if field.metadata.get("short"):
        names.append(field.metadata["short"])
    default = field.default
    if default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        default = ...  # a required flag
    if field.default_factory is not dataclasses.MISSING:  # list fields: None means "the dataclass default"
        default = None
        tp = tp | None if type(None) not in typing.get_args(tp) else tp
    option = typer.Option(*names, help=field.metadata.get("help", ""), rich_help_panel=field.metadata.get("panel"))
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[tp, option])


def list_options(config_cls: type) -> set[str]:
    """The flags of `config_cls` that take several values, in both spellings."""
    hints = typing.get_type_hints(config_cls)
    out = set()
    for f in dataclasses.fields(config_cls):
        if is_list(hints[f.name]):
            out.add(flag_name(f.name))
    return out


def kebab_flags(argv: list[str]) -> list[str]:
    """`--dp_degree 2` -> `--dp-degree 2`: finetrainers' underscore spellings, accepted without cluttering --help."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def make_command(config_cls: type, run: Callable[[Any], Any], doc: str) -> Callable[..., Any]:
    """A function typer can register whose parameters are `config_cls`'s fields; it builds the config and runs."""
    hints = typing.get_type_hints(config_cls)
    params = [_param_for(f, hints) for f in dataclasses.fields(config_cls) if f.init]

    def command(**kwargs: Any) -> Any:
        for f in dataclasses.fields(config_cls):
            if f.default_factory is not dataclasses.MISSING and kwargs.get(f.name) is None:
                kwargs.pop(f.name, None)
        for name, value in kwargs.items():  # typer reads "nan" and "inf" as floats; no ft setting takes them
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{flag_name(name)} {value}: must be a finite number.")
        return run(config_cls(**kwargs))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = config_cls.__name__
    return command


def expand_multi_value_flags(argv: list[str], multi: set[str]) -> list[str]:
    """`--buckets a b --x` -> `--buckets a --buckets b --x`, so list flags read like argparse's nargs='+'.

    `--buckets a,b` is split on commas too.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in multi:
            values = [inline] if eq else []
            i += 1
            while not eq and i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            for value in values:
                for part in value.split(","):
                    if part.strip():
                        out += [name, part.strip()]
            if not values:
                out.append(name)  # let the parser say the value is missing
            continue
        out.append(arg)
        i += 1
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML, YAML or JSON run config into `{field_name: value}` (keys in either spelling)."""
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in read_config_file(path).items()}


def read_config_file(path: str) -> dict[str, Any]:
    """A TOML, YAML or JSON run config's table, keys spelled as in the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file. Pass a .toml, .yaml or .json file of flag values.")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"--config {path}: use a .toml, .yaml or .json file.")
    except UserError:
        raise
    except Exception as e:  # a parse error in the user's file
        raise UserError(f"--config {path} could not be parsed: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a table of flag = value pairs.")
    return data


def check_config_keys(values: dict[str, Any], config_cls: type, path: str) -> None:
    """A key in a config file that is no flag of the command is a typo: say so (a silent default costs a run)."""
    import difflib

    fields = [f.name for f in dataclasses.fields(config_cls)]
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {flag_name(close[0])[2:]!r}?" if close else ""
            raise UserError(f"--config {path}: {key!r} is not a setting of this command{hint}")


def pop_config_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """Take `--config FILE` (or `--config=FILE`) out of argv."""
    out, path = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
            i += 2
            continue
        if argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1]
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out, path

"""The `ft` command table and how a command line runs (typer): the app, `COMMANDS` (each command that runs from a
config dataclass -> its config class and runner, resolved lazily), and `invoke`.

Each command's flags come from its config dataclass (cli/flags.py `make_command`; the fields in common/config.py),
so `--help` is the dataclass's field docs. finetrainers' underscore spellings are accepted (finetrainers.py
translates them), list flags take several values, `--config FILE` supplies values that flags override. The stages
are imported only when a command runs or its config is asked for, so `ft --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import typer

from ft.common.errors import UserError
from ft.common.logs import first_rank, log

from .finetrainers import apply_effects, translate
from .flags import (
    expand_multi_value_flags,
    kebab_flags,
    list_options,
    make_command,
    pop_config_flag,
    read_config_file,
)

app = typer.Typer(help="Fine-tune video diffusion transformers in two stages: precompute, then train.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


# The command table: each command that runs from a config dataclass -> (its config class, its runner), as
# "module:name" references resolved only when asked, so `ft --help` imports no stage.
COMMANDS: dict[str, tuple[str, str]] = {
    "precompute": ("ft.precompute.config:PrecomputeConfig", "ft.precompute.job:run_precompute"),
    "train": ("ft.train.config:TrainConfig", "ft.train.trainer:run_train"),
    "generate": ("ft.train.generate:GenerateConfig", "ft.train.generate:run_generate"),
    "check-data": ("ft.precompute.config:CheckDataConfig", "ft.precompute.check_data:run_check_data"),
    "estimate": ("ft.cli.estimate:EstimateConfig", "ft.cli.estimate:run_estimate"),
    "export": ("ft.train.export:ExportConfig", "ft.train.export:run_export"),
}


def _resolve(reference: str) -> Any:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def command_configs() -> dict[str, type]:
    """Each table command's config class (imports the stages' config modules)."""
    return {name: _resolve(config) for name, (config, _) in COMMANDS.items()}


def _runner(name: str) -> Callable[[object], object]:
    return lambda cfg: _resolve(COMMANDS[name][1])(cfg)


_REGISTERED: list[bool] = []
CONFIG_EPILOG = ("Also: --config FILE (.toml, .yaml or .json) supplies any of these flags, in either spelling; "
                 "flags given on the command line override it. finetrainers' spellings (--train_steps) work too.")


def register_table() -> None:
    """Add the table's commands to `app` (once; after the commands main.py defines, so `ft --help` lists those
    first)."""
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    for name, config_cls in command_configs().items():
        app.command(name, help=config_cls.__doc__, epilog=CONFIG_EPILOG)(
            make_command(config_cls, _runner(name), config_cls.__doc__))


def _parser_only() -> typer.Typer:
    """The table's commands with runners that only build the config: the flags checked, nothing run."""
    checker = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    for name, config_cls in command_configs().items():
        checker.command(name)(make_command(config_cls, lambda cfg: cfg, config_cls.__doc__))
    return checker


def invoke(argv: list[str], standalone: bool = True, check_only: bool = False) -> object:
    """Parse `argv` as the `ft` command line would and run it; returns the command's result when not standalone
    (a list of results when a finetrainers dataset config makes several precompute runs). With `check_only`, the
    flags are read and the config built (its checks run), and nothing runs: the result is the config.

    Not standalone, a parser error is a `UserError` and a Ctrl-C a `KeyboardInterrupt` (typer returns it as the
    exit code 130 there), so a caller running two commands (`ft run`) stops as `ft` would."""
    register_table()
    args, config_path = pop_config_flag(list(argv))
    command = next((a for a in args if not a.startswith("-")), None)
    if command == "run" and "--help" not in args and not check_only:  # both stages in this process (cli/run_both.py)
        from .run_both import run_both

        return run_both([*args[args.index("run") + 1:], *(["--config", config_path] if config_path else [])])
    configs = command_configs()
    if config_path and command not in configs:
        raise UserError(f"--config applies to {', '.join(configs)}; put it after one of those commands.")
    if command not in configs or "--help" in args:
        multi: set[str] = set()
        for cls in configs.values():
            multi |= list_options(cls)
        args = expand_multi_value_flags(kebab_flags(args), multi)
        return app(args=args, prog_name="ft", standalone_mode=standalone)
    at = args.index(command)
    # the merge of N jobs' shard sets needs only --out
    if command == "precompute" and "--finalize" in args and not check_only:
        from ft.precompute.merge import finalize_command_line

        return finalize_command_line(args[at + 1 :])
    values = read_config_file(config_path) if config_path else None
    translation = translate(command, args[at + 1 :], values, configs, config_path or "", before_precompute=check_only)
    for line in translation.info_lines() if first_rank() and not check_only else []:  # said once, on one rank
        log.info(line)
    if not check_only:
        apply_effects(translation.effects)
    target = _parser_only() if check_only else app
    results = []
    for run in translation.runs:  # a finetrainers dataset config with several datasets: one precompute each
        try:
            result = target(args=[*args[: at + 1], *run], prog_name="ft", standalone_mode=standalone)
        except SystemExit as e:  # standalone mode exits after each run; only a failure stops the others
            if e.code not in (0, None):
                raise
            result = None
        except typer.TyperException as e:  # not standalone: the parser's error, as one line
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            raise UserError(f"ft {command}: {message}") from e
        if not standalone and type(result) is int:  # typer's Exit: 130 is a Ctrl-C the command has reported
            raise KeyboardInterrupt if result == 130 else SystemExit(result)
        results.append(result)
    return results[0] if len(results) == 1 else results

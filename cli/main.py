"""The `ft` command line (typer): precompute, check-data, train, export, generate, estimate, demo, inspect, models.

Each command's flags come from its config dataclass (see config.py), so `--help` is the dataclass's field docs.
finetrainers' underscore spellings are accepted, list flags take several values, `--config FILE` supplies values
that flags override. A `UserError` prints its message and exits 2 with no traceback, and so does an environment
fault (a full disk, a read-only folder: common/faults.py) that no command turned into a message of its own.
Heavy libraries (torch, diffusers) are imported only inside the commands, so `ft --help` is instant.

The command line is the top floor (ft.cli): it reaches into precompute and train lazily, through the one
command table `COMMANDS`, and nothing below imports it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ft.common.config import (
    expand_multi_value_flags,
    kebab_flags,
    list_options,
    make_command,
    pop_config_flag,
    read_config_file,
)
from ft.common.errors import UserError
from ft.common.faults import environment_fault, fault_message
from ft.common.logs import log, setup_logging

from .finetrainers import apply_effects, translate

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


CONFIG_EPILOG = ("Also: --config FILE (.toml, .yaml or .json) supplies any of these flags, in either spelling; "
                 "flags given on the command line override it. finetrainers' spellings (--train_steps) work too.")


def _register() -> None:
    for name, config_cls in command_configs().items():
        app.command(name, help=config_cls.__doc__, epilog=CONFIG_EPILOG)(
            make_command(config_cls, _runner(name), config_cls.__doc__))


@app.command("demo")
def demo(
    workdir: Annotated[str, typer.Option("--workdir", help="Where the demo writes its model, data, shards and "
                                                           "outputs.")] = "demo-run",
    steps: Annotated[int, typer.Option("--steps", help="Training steps.")] = 60,
    model: Annotated[str, typer.Option("--model", help="Model family to demo (any of `ft models`).")] = "cogvideox",
) -> None:
    """Run the whole pipeline on a tiny random model and a generated dataset, on a CPU, in minutes."""
    from .demo import run_demo

    run_demo(workdir, steps=steps, model=model)


@app.command("inspect")
def inspect_shards(
    shards: Annotated[str, typer.Argument(help="A shard folder written by `ft precompute`.")],
    verify: Annotated[bool, typer.Option("--verify", help="Also read every shard and check its sha256.")] = False,
) -> None:
    """Print what a shard set holds: samples, buckets, bytes, rejects, the encoders' fingerprint."""
    from .inspect_shards import describe

    typer.echo(describe(shards, verify=verify))


@app.command("models")
def models() -> None:
    """List the model families ft can train."""
    from ft.pipelines.registry import ALIASES, SPECS

    for name, cls in sorted(SPECS.items()):
        aliases = sorted(a for a, target in ALIASES.items() if target == name)
        typer.echo(f"{name:14s} {cls.display_name} ({', '.join(aliases)}): {cls.objective}; LoRA targets "
                   f"{', '.join(cls.default_lora_targets)}; default buckets {', '.join(cls.default_buckets)}")


_register()


def invoke(argv: list[str], standalone: bool = True) -> object:
    """Parse `argv` as the `ft` command line would and run it; returns the command's result when not standalone
    (a list of results when a finetrainers dataset config makes several precompute runs)."""
    args, config_path = pop_config_flag(list(argv))
    command = next((a for a in args if not a.startswith("-")), None)
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
    if command == "precompute" and "--finalize" in args:  # the merge of N jobs' shard sets needs only --out
        from ft.precompute.merge import finalize_command_line

        return finalize_command_line(args[at + 1 :])
    values = read_config_file(config_path) if config_path else None
    translation = translate(command, args[at + 1 :], values, configs, config_path or "")
    for line in translation.info_lines():
        log.info(line)
    apply_effects(translation.effects)
    results = []
    for run in translation.runs:  # a finetrainers dataset config with several datasets: one precompute each
        try:
            results.append(app(args=[*args[: at + 1], *run], prog_name="ft", standalone_mode=standalone))
        except SystemExit as e:  # standalone mode exits after each run; only a failure stops the others
            if e.code not in (0, None):
                raise
            results.append(None)
    return results[0] if len(results) == 1 else results


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `ft ...`."""
    setup_logging()
    try:
        invoke(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        if not getattr(e, "quiet", False):  # under several processes, another rank prints it (train/dist.py)
            log.error(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:  # the command has said what it kept and how to go on
        sys.exit(130)
    except BaseException as e:  # a full disk, a read-only folder: one line, not a traceback (DCP wraps its own)
        fault = environment_fault(e)
        if fault is None or isinstance(e, SystemExit):
            raise
        log.error(f"error: {fault_message(fault)}")
        sys.exit(2)


if __name__ == "__main__":
    main()

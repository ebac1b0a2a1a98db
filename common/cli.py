"""The `ft` command line (typer): precompute, check-data, train, export, generate, estimate, demo, inspect, models.

Each command's flags come from its config dataclass (see config.py), so `--help` is the dataclass's field docs.
finetrainers' underscore spellings are accepted, list flags take several values, `--config FILE` supplies values
that flags override. A `UserError` prints its message and exits 2 with no traceback, and so does an environment
fault (a full disk, a read-only folder: common/faults.py) that no command turned into a message of its own.
Heavy libraries (torch, diffusers) are imported only inside the commands, so `ft --help` is instant.

This module is the composition root: it is the one place in `ft.common` that reaches into precompute and train
(lazily, inside the commands).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .config import (
    expand_multi_value_flags,
    kebab_flags,
    list_options,
    make_command,
    pop_config_flag,
    read_config_file,
)
from .errors import UserError
from .faults import environment_fault, fault_message
from .finetrainers import apply_effects, translate
from .logs import first_rank, log, setup_logging

app = typer.Typer(help="Fine-tune video diffusion transformers in two stages: precompute, then train.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _configs() -> dict[str, type]:
    from ft.pipelines.estimate import EstimateConfig
    from ft.precompute.config import CheckDataConfig, PrecomputeConfig
    from ft.train.config import TrainConfig
    from ft.train.export import ExportConfig
    from ft.train.generate import GenerateConfig

    return {"precompute": PrecomputeConfig, "train": TrainConfig, "generate": GenerateConfig,
            "check-data": CheckDataConfig, "estimate": EstimateConfig, "export": ExportConfig}


def _run_check_data(cfg: object) -> object:
    from ft.precompute.check_data import run_check_data

    return run_check_data(cfg)  # type: ignore[arg-type]


def _run_precompute(cfg: object) -> object:
    from ft.precompute.encode import run_precompute

    return run_precompute(cfg)  # type: ignore[arg-type]


def _run_train(cfg: object) -> object:
    from ft.train.trainer import run_train

    return run_train(cfg)  # type: ignore[arg-type]


def _run_generate(cfg: object) -> object:
    from ft.train.generate import run_generate

    return run_generate(cfg)  # type: ignore[arg-type]


def _run_export(cfg: object) -> object:
    from ft.train.export import run_export

    return run_export(cfg)  # type: ignore[arg-type]


def _run_estimate(cfg: object) -> object:
    from ft.pipelines.estimate import run_estimate

    return run_estimate(cfg)  # type: ignore[arg-type]


CONFIG_EPILOG = ("Also: --config FILE (.toml, .yaml or .json) supplies any of these flags, in either spelling; "
                 "flags given on the command line override it. finetrainers' spellings (--train_steps) work too.")


def _register() -> None:
    runners = {"precompute": _run_precompute, "train": _run_train, "generate": _run_generate,
               "check-data": _run_check_data, "estimate": _run_estimate, "export": _run_export}
    for name, config_cls in _configs().items():
        app.command(name, help=config_cls.__doc__, epilog=CONFIG_EPILOG)(
            make_command(config_cls, runners[name], config_cls.__doc__))


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
    configs = _configs()
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
    for line in translation.info_lines() if first_rank() else []:  # the same notes on every rank: said once
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
        if not getattr(e, "quiet", False):  # under several processes, another rank prints it (common/dist.py)
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

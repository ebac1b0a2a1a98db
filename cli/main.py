"""The `ft` command line's entry point: `main()` (the console script), and the commands that run from no config
dataclass (demo, inspect, models); the rest come from the table in commands.py.

A `UserError` prints its message and exits 2 with no traceback, and so does an environment fault (a full disk, a
read-only folder: common/faults.py) that no command turned into a message of its own. Heavy libraries (torch,
diffusers) are imported only inside the commands, so `ft --help` is instant. `ft run` (run_both.py) runs
precompute and train in one process.

The command line is the top floor (ft.cli): it reaches into precompute and train lazily, through the one command
table `COMMANDS`, and nothing below imports it.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ft.common.errors import UserError
from ft.common.faults import environment_fault, fault_message
from ft.common.logs import log, setup_logging

from .commands import COMMANDS, app, command_configs, invoke, register_table
from .run_both import RUN_HELP

__all__ = ["COMMANDS", "app", "command_configs", "invoke", "main"]


@app.command("demo")
def demo(
    workdir: Annotated[str, typer.Option("--workdir", help="Where the demo writes its model, data, shards and "
                                                           "outputs.")] = "demo-run",
    steps: Annotated[int, typer.Option("--steps", help="Training steps.")] = 60,
    model: Annotated[str, typer.Option("--model", help="Model family to demo (any of `ft models`), or wan2.2-a14b "
                                                       "(two experts, trained one after the other).")] = "cogvideox",
) -> None:
    """Run the whole pipeline on a tiny random model and a generated dataset, on a CPU, in minutes."""
    from .demo import run_demo

    run_demo(workdir, steps=steps, model=model)


@app.command("run", help=RUN_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(ctx: typer.Context) -> object:
    from .run_both import run_both

    return run_both(ctx.args)  # `invoke` runs `ft run` itself; this is its --help and its place in the list


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
        known = [c.display_name.split(" (")[0] + (" (image-to-video)" if c.image_to_video else "")
                 for c in cls.checkpoints]
        if known:
            typer.echo(f"{'':14s} known checkpoints (ft estimate offline): {', '.join(known)}")
        if cls.tiny_variants:
            typer.echo(f"{'':14s} ft demo --model {name}:VARIANT, VARIANT one of: "
                       + "; ".join(f"{v} ({what})" for v, what in cls.tiny_variants.items()))


register_table()


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

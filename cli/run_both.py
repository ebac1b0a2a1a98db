"""`ft run`: a small job's two stages in one process: `ft precompute`, then `ft train`, from one argument list.

ft's stages are separate commands so that precompute can run as its own batch jobs and its shards serve many
experiments. A small job pays for that with a second process that imports torch, diffusers and transformers again
(about 4 s on 2 cores, more than the whole training of a tiny model). `ft run ARGS` runs `ft precompute ARGS` and
then `ft train ARGS` in this process. One argument list already drives both stages (each command keeps its own
flags and names the other stage's once: cli/finetrainers.py), so a finetrainers argument list or a `--config` file
works here as it does for the two commands. The shard folder is train's `--shards` or precompute's `--out` (give
one, or both the same; finetrainers' `--precomputation_dir` too), and is always asked for: a finetrainers
`--dataset_config` writes one shard set per dataset under it. A rerun encodes nothing that is already encoded
(precompute's own rerun rules). `--batch-size` is the training batch, as finetrainers' `--batch_size` is, on the
command line or in the --config file (precompute encodes with its default batch). Train's flags are checked (its
config built, an existing --output-dir checked) before precompute starts, so a typo costs no encoding. A Ctrl-C
stops `ft run` (exit 130) in either stage. Between the stages the encoders are released (collected, and the CUDA
cache emptied) before the transformer is loaded.

One process only: under torchrun it refuses with the two commands to run instead (the shards must be complete
before any rank trains; `ft precompute --num-jobs N` is how precompute spreads over N processes or machines).
"""

from __future__ import annotations

import gc
import os

from ft.common.errors import UserError
from ft.common.launcher import array_task, world_from_env
from ft.common.logs import log

RUN_HELP = ("Precompute, then train, in one process (a small job's quickest start).\n\n"
            # one paragraph, one line: the help reflows it to the terminal's width
            "`ft precompute ARGS` then `ft train ARGS`, without a second start-up (imports, model configs). ARGS are "
            "the flags of both commands (see `ft precompute --help` and `ft train --help`; finetrainers' spellings "
            "and --config FILE work as there); the shard folder is --shards (or precompute's --out); --batch-size is "
            "the training batch (precompute encodes with its default batch). Train's flags are checked before "
            "precompute starts. Run the same command again after an interruption: precompute encodes only what is "
            "missing, and --resume-from-checkpoint latest goes on with the training. One process only: under "
            "torchrun, run `ft precompute` first, then `torchrun ... ft train`.")


def _values(args: list[str], flag: str) -> list[str]:
    """The values of `flag` in `args` (`--flag V...` or `--flag=V`; finetrainers' underscore spelling too)."""
    names = {flag, "--" + flag[2:].replace("-", "_")}
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            if eq:
                return [value]
            end = next((j for j in range(i + 1, len(args)) if args[j].startswith("-")), len(args))
            return args[i + 1:end]
    return []


def _folder(shards: str) -> str:
    """A `--shards` value without its mixing weight (`DIR:0.3` -> `DIR`)."""
    folder, colon, weight = shards.rpartition(":")
    try:
        return folder if colon and float(weight) >= 0 else shards
    except ValueError:
        return shards


def stage_arguments(args: list[str]) -> list[str]:
    """`args` with the shard folder given to both stages: `--shards` for train and `--out` for precompute, from
    whichever of the two the user gave (on the command line or in the --config file). finetrainers'
    `--precomputation_dir` is each stage's own name for it, read by each stage."""
    from .flags import read_config_file

    config = _values(args, "--config")
    values = {k.replace("-", "_"): v for k, v in read_config_file(config[0]).items()} if config else {}
    out = (_values(args, "--out") or [values.get("out")])[0]
    given = _values(args, "--shards") or values.get("shards") or []
    given = [given] if isinstance(given, str) else list(given)
    if len(given) > 1:
        raise UserError(f"ft run: --shards names {len(given)} shard sets; ft run precomputes one dataset into one "
                        "folder. To train on a mix, precompute each set, then `ft train --shards A B ...`.")
    shards = _folder(given[0]) if given else None
    if out and shards and os.path.abspath(out) != os.path.abspath(shards):
        raise UserError(f"ft run: --out {out} and --shards {shards} differ; precompute writes the shards train "
                        "reads, so give one folder (--shards) or the same in both.")
    if out and not shards:
        return [*args, "--shards", out]
    if shards and not out:
        return [*args, "--out", shards]
    if not out and not (_values(args, "--precomputation-dir") or values.get("precomputation_dir")):
        raise UserError("ft run needs the shard folder: --shards DIR (precompute writes it, train reads it; a "
                        "finetrainers --dataset_config writes one shard set per dataset under it).")
    return args


def without_flag(args: list[str], flag: str) -> list[str]:
    """`args` without `flag` and its values: `--batch-size` is the training batch in `ft run` (as finetrainers'
    `--batch_size` is), not also precompute's encoding batch, which keeps its default."""
    out, skipping = [], False
    for arg in args:
        if arg == flag or arg.startswith(flag + "="):
            skipping = arg == flag
            continue
        if skipping and not arg.startswith("-"):
            continue
        skipping = False
        out.append(arg)
    return out


def precompute_arguments(args: list[str]) -> list[str]:
    """Precompute's arguments: `--batch-size` is the training batch in `ft run`, on the command line or in the
    --config file (where it is overridden by precompute's default, as a flag overrides a file's key)."""
    import dataclasses

    from .flags import read_config_file

    out = without_flag(args, "--batch-size")
    config = _values(args, "--config")
    if config and "batch-size" in read_config_file(config[0]):  # `batch_size` is left to train by precompute itself
        from ft.precompute.config import PrecomputeConfig

        default = next(f.default for f in dataclasses.fields(PrecomputeConfig) if f.name == "batch_size")
        out += ["--batch-size", str(default)]
    return out


def check_one_job(args: list[str]) -> None:
    """Refuse to precompute one job of several (--num-jobs, a SLURM array task): train would refuse the set it
    leaves incomplete, after precompute had spent its time."""
    from .commands import invoke

    task = array_task()
    if task and task[1] > 1:
        raise UserError(f"ft run precomputes the whole dataset, but this is task {task[0]} of a SLURM array of "
                        f"{task[1]}: run `ft precompute ...` as the array, then `ft train ...` once it is done.")
    configs = invoke(["precompute", *precompute_arguments(args)], standalone=False, check_only=True)
    for cfg in configs if isinstance(configs, list) else [configs]:
        if (cfg.num_jobs or 1) > 1:
            raise UserError(f"ft run precomputes the whole dataset, but --num-jobs {cfg.num_jobs} makes this job "
                            f"{cfg.job_index} of {cfg.num_jobs}: leave --num-jobs out, or run `ft precompute ...` "
                            "as the N jobs, then `ft train ...`.")


def check_train_flags(args: list[str]) -> None:
    """Refuse a bad train flag, a checkpoint to resume that is not there, or an output folder a fresh run may not
    use, before precompute spends its time: train's config is built (its checks run), --resume-from-checkpoint
    resolved, and --output-dir checked as `ft train` checks it."""
    from pathlib import Path

    from .commands import invoke

    cfg = invoke(["train", *args], standalone=False, check_only=True)
    if cfg.resume_from_checkpoint:  # the checkpoint is there now or never: precompute writes none
        from ft.train.checkpoints import resolve_checkpoint

        resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    out = Path(cfg.output_dir)
    if out.is_dir():  # writable, and no earlier run's checkpoints unless resuming
        from ft.train.trainer import prepare_output_dir

        prepare_output_dir(cfg)
        return
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # made by train, after precompute
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"--output-dir {out}: cannot make this folder ({existing} is not a writable folder); pass "
                        "a folder you can write to.")


def run_both(args: list[str]) -> object:
    """`ft precompute args`, then `ft train args`, in this process; returns train's result."""
    from .commands import invoke

    if world_from_env().size > 1:
        raise UserError("ft run is one process; under torchrun the shards must be complete before any rank trains. "
                        "Run `ft precompute ...` first (`--num-jobs N --job-index I` spreads it over N processes), "
                        "then `torchrun ... ft train ...` with the same flags.")
    args = stage_arguments(list(args))
    check_one_job(args)
    check_train_flags(args)
    log.info("ft run: stage 1 of 2, ft precompute")
    invoke(["precompute", *precompute_arguments(args)], standalone=False)
    gc.collect()  # the encoders go before the transformer comes
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("ft run: stage 2 of 2, ft train")
    return invoke(["train", *args], standalone=False)

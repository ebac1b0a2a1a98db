"""Who this process is, as its launcher says: the one reader of the launcher's environment, for both stages.

torchrun and `accelerate launch` set RANK, WORLD_SIZE and LOCAL_RANK (with MASTER_ADDR/MASTER_PORT); a plain `srun`
sets SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, which `export_srun_env` copies into the torch names
(MASTER_ADDR/MASTER_PORT must then be exported by the batch script; see examples/slurm/train.sbatch). A SLURM array
task has SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID (less SLURM_ARRAY_TASK_MIN, so `--array 1-8` works).

`ft train` makes a process group of the `World` (train/dist.py); `ft precompute` makes each process of a world, or
each array task, one job of N (precompute/jobs.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place: rank, world size, rank on its node, and what launched it."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "one process"

    @property
    def main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"the environment variable {name}={env[name]!r} is not a number; the launcher set it "
                        "wrongly (start ft with torchrun, srun or accelerate launch).") from None


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """This process's World from the launcher's environment (torchrun/accelerate first, then a plain srun)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env:
        size, rank = _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1, _int(env, "RANK") if "RANK" in env else 0
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun"
        if size > 1 and "RANK" not in env:
            raise UserError(f"the environment says WORLD_SIZE={size} but sets no RANK: this process's place is "
                            "unknown; start ft with torchrun, srun or accelerate launch, which set both.")
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # a task of `srun` (not the batch script itself)
        size, rank = _int(env, "SLURM_STEP_NUM_TASKS"), _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "srun"
    else:
        return World()
    if size < 1 or not 0 <= rank < size or local < 0:
        raise UserError(f"the launcher says rank {rank} of {size} processes (local rank {local}), which is not a "
                        "place in a world; check how ft was started.")
    return World(rank, size, local, launcher if size > 1 else "one process")


def export_srun_env(world: World, env: dict[str, str] | None = None) -> None:
    """Under a plain srun, give torch's env:// rendezvous the names it reads."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    if world.launcher != "srun":
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing:
        raise UserError(f"started by srun with {world.size} tasks, but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not set: export MASTER_ADDR=$(scontrol show "
                        "hostnames $SLURM_JOB_NODELIST | head -n 1) and MASTER_PORT=29500 in the batch script "
                        "(examples/slurm/train.sbatch does), or launch with torchrun.")
    env.update(RANK=str(world.rank), WORLD_SIZE=str(world.size), LOCAL_RANK=str(world.local_rank))


def array_task(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(task, count) of a SLURM array task, the task counted from 0; None outside an array."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_TASK_COUNT", "") == "" or env.get("SLURM_ARRAY_TASK_ID", "") == "":
        return None
    count, task = _int(env, "SLURM_ARRAY_TASK_COUNT"), _int(env, "SLURM_ARRAY_TASK_ID")
    return task - (_int(env, "SLURM_ARRAY_TASK_MIN") if env.get("SLURM_ARRAY_TASK_MIN", "") else 0), count

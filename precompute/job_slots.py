"""The slots of precompute's N independent jobs: which job this process is, which items it owns, and the lock
of its slot (the job itself, what it does in its slot, is job.py).

Job i of N comes from `--num-jobs/--job-index`, else SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID (less
SLURM_ARRAY_TASK_MIN, so `--array 1-8` works), else the launcher's world (one job per process under torchrun or
srun, each on `cuda:LOCAL_RANK`; common/launcher.py), else 0 of 1. A job owns the items whose stable hash (sha256
of the media path relative to the dataset) falls to it: decided from the dataset listing alone, before any
probing or hashing, so each job reads only its slice, and a grown dataset does not move an item to another job.

Every writer into an `--out` holds the lock of its slot, `jobs/job-000i-of-000N.lock`, made with O_CREAT|O_EXCL
and naming its host, pid and start time: a second writer of the same slot is refused at once with the holder
named. A lock whose process is gone (same host, pid not running, or running but started at another time: a pid
reused) is stale and is taken over: renamed to a name of our own (only one process can win that rename), checked
to be the stale lock we judged, then removed. Holders on another host cannot be checked; the message says how to
remove such a lock by hand. Jobs of different N into one `--out` at once are refused too (their slices overlap).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.common.launcher import array_task, world_from_env
from ft.common.logs import log
from ft.common.shards import JOBS_DIR, job_stem, kill_point
from ft.common.shards.liveness import TORN_AFTER_S, describe_holder
from ft.common.shards.liveness import alive as _alive
from ft.common.shards.liveness import process_start as _process_start
from ft.common.shards.liveness import read_lock as _read_lock

from .datasets import DatasetItem


@dataclass(frozen=True)
class JobSlot:
    """Job `index` of `num_jobs`, and where that came from (flags, SLURM, torchrun, or a single run)."""

    index: int = 0
    num_jobs: int = 1
    source: str = "single run"

    @property
    def stem(self) -> str:
        return job_stem(self.index, self.num_jobs)

    @property
    def prefix(self) -> str:
        """The shard name prefix: `shard` for a single run, `shard-j0003` for job 3."""
        return "shard" if self.num_jobs == 1 else f"shard-j{self.index:04d}"

    def owns(self, identity: str) -> bool:
        return self.num_jobs == 1 or owner(identity, self.num_jobs) == self.index

    def __str__(self) -> str:
        return f"job {self.index} of {self.num_jobs} ({self.source})"


def owner(identity: str, num_jobs: int) -> int:
    """The job that owns an item: a stable hash of its identity, mod N."""
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") % num_jobs


def item_identity(item: DatasetItem, root: Path) -> str:
    """What names an item across runs and machines: its media path relative to the dataset folder (a media file
    taken from a WebDataset tar: the tar and sample it came from)."""
    if item.extracted:
        return item.source
    full, base = os.path.abspath(item.path), os.path.abspath(root)
    return os.path.relpath(full, base) if os.path.commonpath([full, base]) == base else full


def resolve_slot(num_jobs: int | None, job_index: int | None, env: dict[str, str] | None = None) -> JobSlot:
    """This process's job: the flags, else SLURM's array variables, else the launcher's world (torchrun, srun),
    else 0 of 1 (common/launcher.py reads the environment)."""
    if (num_jobs is None) != (job_index is None):
        raise UserError("--num-jobs and --job-index go together: give both (job I of N, I from 0 to N-1), or "
                        "neither (they are then read from SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID or "
                        "WORLD_SIZE/RANK).")
    source = "--num-jobs/--job-index"
    if num_jobs is None:
        task = array_task(env)
        world = world_from_env(env) if task is None else None
        if task is not None:
            (job_index, num_jobs), source = task, "SLURM array"
        elif world is not None and world.size > 1:
            num_jobs, job_index, source = world.size, world.rank, world.launcher
        else:
            return JobSlot()
    assert num_jobs is not None and job_index is not None
    if num_jobs < 1 or not 0 <= job_index < num_jobs:
        raise UserError(f"job index {job_index} of {num_jobs} jobs (from {source}): the index must be from 0 to "
                        f"{num_jobs - 1}, and there must be at least one job.")
    return JobSlot(job_index, num_jobs, source)


def job_device(device: str, env: dict[str, str] | None = None) -> str:
    """Under torchrun (or srun), `--device auto`/`cuda` means this process's GPU, `cuda:LOCAL_RANK`."""
    world = world_from_env(env)
    if world.size == 1 or device not in ("auto", "cuda"):
        return device
    import torch

    return f"cuda:{world.local_rank}" if torch.cuda.is_available() else device


def job_config_path(out: Path, stem: str) -> Path:
    """Where a job saves its resolved config (job.py) and the merge reads job 0's back: `jobs/<stem>.config.json`."""
    return out / JOBS_DIR / f"{stem}.config.json"


# ---------------------------------------------------------------------------------------------- locks


class Lock:
    """An exclusive lock file (see the module docstring). `extra` is recorded in it (num_jobs, index)."""

    def __init__(self, path: Path, what: str, **extra: Any):
        self.path, self.what = path, what
        pid = os.getpid()
        self.info = {"what": what, "host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **extra}
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(int(TORN_AFTER_S * 10) + 50):  # a lock being filled in is waited for until judged torn
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                kill_point("lock-created")  # test hook: killed here, the writer leaves an empty lock file
            except FileExistsError:
                holder = _read_lock(self.path)
                if holder == {}:  # its writer is filling it in
                    time.sleep(0.1)
                    continue
                if holder is not None and _alive(holder):
                    raise UserError(f"{self.path.parent.parent} is being written by {describe_holder(holder)}; "
                                    f"a second writer would corrupt it. Wait for it, or use another --out. If that "
                                    f"process is gone (another host cannot be checked from here), delete "
                                    f"{self.path} and run again.") from None
                if holder is not None:
                    self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.info))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path} (others kept taking it); run again.")

    def _take_over(self, holder: dict[str, Any]) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process took it over first
            return
        taken = _read_lock(aside)
        # a lock made in between (live, or {}: its maker is filling it in this instant): put it back
        if taken is not None and taken != holder and _alive(taken):
            os.rename(aside, self.path)
            return
        aside.unlink(missing_ok=True)
        log.info(f"took over the stale lock of {describe_holder(holder)}: that process is gone")

    def release(self) -> None:
        if self.held and _read_lock(self.path) == self.info:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> Lock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_locks(out: Path) -> list[dict[str, Any]]:
    """The job locks in `out` whose holders may still run."""
    folder = out / JOBS_DIR
    if not folder.is_dir():
        return []
    found = [_read_lock(p) for p in sorted(folder.glob("job-*.lock"))]
    return [h for h in found if h and _alive(h)]


def lock_slot(out: Path, slot: JobSlot) -> Lock:
    """Take this job's slot in `out`, refusing while jobs of another --num-jobs write there."""
    lock = Lock(out / JOBS_DIR / f"{slot.stem}.lock", f"`ft precompute` {slot}", num_jobs=slot.num_jobs,
                index=slot.index)
    lock.acquire()
    others = [h for h in live_locks(out) if h.get("num_jobs") != slot.num_jobs]
    if others:
        lock.release()
        raise UserError(f"{out} is being written by {describe_holder(others[0])}, a run with --num-jobs "
                        f"{others[0].get('num_jobs')}; this is {slot}. Jobs of different --num-jobs own different "
                        "slices, so they cannot write one --out at once: wait for that run, or use its --num-jobs.")
    return lock

"""Which job a process is and which items it owns (flags, SLURM array, torchrun), and the slot lock's rules,
checked in-process with real lock files and real (finished) processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ft.common.errors import UserError
from ft.precompute.job_slots import DatasetItem, JobSlot, Lock, item_identity, lock_slot, owner, resolve_slot


def test_the_slot_comes_from_the_flags_then_slurm_then_torchrun():
    assert resolve_slot(None, None, {}) == JobSlot(0, 1, "single run")
    assert resolve_slot(4, 3, {"RANK": "1", "WORLD_SIZE": "2"}) == JobSlot(3, 4, "--num-jobs/--job-index")
    slurm = {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1",
             "RANK": "0", "WORLD_SIZE": "1"}
    assert resolve_slot(None, None, slurm) == JobSlot(7, 8, "SLURM array")  # --array 1-8: the 8th task is 7
    assert resolve_slot(None, None, {"RANK": "1", "WORLD_SIZE": "2"}) == JobSlot(1, 2, "torchrun")
    with pytest.raises(UserError, match="--num-jobs and --job-index go together"):
        resolve_slot(4, None, {})
    with pytest.raises(UserError, match="index must be from 0 to 3"):
        resolve_slot(4, 4, {})
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID='x' is not a number"):
        resolve_slot(None, None, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "x"})


def test_ownership_is_a_stable_hash_of_the_relative_path_that_a_grown_dataset_keeps(tmp_path):
    root = tmp_path / "data"
    items = [DatasetItem(root / "videos" / f"clip_{i:04d}.mp4", "c") for i in range(2000)]
    owners = [owner(item_identity(it, root), 4) for it in items]
    assert sorted(set(owners)) == [0, 1, 2, 3] and all(400 < owners.count(j) < 600 for j in range(4))
    moved = DatasetItem(tmp_path / "elsewhere" / "data" / "videos" / "clip_0007.mp4", "c")  # the folder moved
    assert owner(item_identity(moved, tmp_path / "elsewhere" / "data"), 4) == owners[7]
    grown = items + [DatasetItem(root / "videos" / f"new_{i}.mp4", "c") for i in range(100)]
    assert [owner(item_identity(it, root), 4) for it in grown[:2000]] == owners
    slot = JobSlot(2, 4)
    assert [it for it in items if slot.owns(item_identity(it, root))] == [it for it, o in zip(items, owners,
                                                                                             strict=True) if o == 2]


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_lock_is_refused_while_held_and_taken_over_when_its_process_is_gone(tmp_path):
    path = tmp_path / "jobs" / "job-0000-of-0001.lock"
    first = Lock(path, "first writer")
    first.acquire()
    with pytest.raises(UserError, match=rf"being written by first writer \(host {socket.gethostname()}, pid "
                                        rf"{os.getpid()}, started .*delete {path}"):
        Lock(path, "second writer").acquire()
    first.release()
    assert not path.exists()
    path.write_text(json.dumps({"what": "a killed run", "host": socket.gethostname(), "pid": dead_pid()}))
    second = Lock(path, "second writer")
    second.acquire()  # the holder is gone: taken over
    assert json.loads(path.read_text())["what"] == "second writer" and not list(path.parent.glob("*.stale-*"))
    second.release()
    # a pid that runs again, but is another process (another start time): stale too
    path.write_text(json.dumps({"what": "old", "host": socket.gethostname(), "pid": os.getpid(),
                                "process_start": "1"}))
    with Lock(path, "third writer"):
        assert json.loads(path.read_text())["what"] == "third writer"
    # a holder on another host cannot be checked from here: refused, with the file to delete by hand
    path.write_text(json.dumps({"what": "a job elsewhere", "host": "node-17", "pid": 1}))
    with pytest.raises(UserError, match="a job elsewhere \\(host node-17, pid 1"):
        Lock(path, "fourth writer").acquire()


def test_jobs_of_another_num_jobs_are_refused_while_they_write(tmp_path):
    out = tmp_path / "out"
    held = lock_slot(out, JobSlot(1, 4))
    try:
        with pytest.raises(UserError, match="a run with --num-jobs 4; this is job 0 of 2"):
            lock_slot(out, JobSlot(0, 2))
        other = lock_slot(out, JobSlot(2, 4))  # another job of the same run: fine
        other.release()
    finally:
        held.release()
    assert not list((out / "jobs").glob("*.lock"))
    assert Path(out / "jobs").is_dir()


def test_a_takeover_puts_back_a_lock_another_process_has_just_made(tmp_path):
    # two processes judge one dead holder's lock stale; the first takes it over and makes its own lock, which the
    # second then renames aside before the first has written it (an empty file): it must be put back, not removed
    path = tmp_path / "jobs" / "job-0000-of-0001.lock"
    path.parent.mkdir()
    dead = {"what": "w", "host": socket.gethostname(), "pid": 0}
    path.write_text("")  # the first process's new lock, made with O_EXCL and not yet filled in
    Lock(path, "second")._take_over(dead)
    assert path.is_file() and path.read_text() == ""
    assert not list(path.parent.glob("*.stale-*"))

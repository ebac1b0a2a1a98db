"""The merge and the locks under real kills and real second processes: a merge SIGKILLed at each of its kill
points is finished by `ft precompute --finalize` (and `ft inspect` tells the truth meanwhile); array tasks that
finish first say which jobs are running, which stopped and which never started; a 0-byte lock left by a writer
killed between creating and filling it is judged stale and taken over."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from ft.cli.inspect_shards import describe
from ft.common.shards import JOBS_DIR, load_manifest
from helpers import BUCKETS, FP32, finish, run_cli, start, stopped

pytestmark = pytest.mark.slow
SAMPLES = 10  # shapes_data: 8 clips and 2 images


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["precompute", "--model", "cogvideox", "--pretrained", str(model), "--dataset", str(data), "--out",
            str(out), *FP32, *BUCKETS, "--shard-samples", "2", *extra]


def job(model: Path, data: Path, out: Path, index: int, jobs: int = 2) -> list[str]:
    return argv(model, data, out, "--num-jobs", str(jobs), "--job-index", str(index))


def assert_merged(out: Path) -> None:
    manifest = load_manifest(out)
    assert manifest.unmerged is None and manifest.complete and manifest.num_samples == SAMPLES
    assert len(manifest.active_keys(out)) == SAMPLES
    assert not [p.name for p in (out / JOBS_DIR).iterdir() if not p.name.endswith(".lock")]


@pytest.fixture(scope="module")
def job_0_done(tiny_cog, shapes_data, tmp_path_factory) -> Path:
    """Job 0 of 2 finished, job 1 not run: the folder each kill test copies."""
    out = tmp_path_factory.mktemp("job-0") / "shards"
    run_cli(job(tiny_cog, shapes_data, out, 0))
    return out


@pytest.mark.parametrize("point", ["empty-caption-moved", "set-index-spilled", "merged", "merge-state-removed:1",
                                   "merge-files-removed:1"])
def test_a_merge_killed_at_any_point_is_finished_by_finalize(tiny_cog, shapes_data, job_0_done, tmp_path, point):
    out = tmp_path / "shards"
    shutil.copytree(job_0_done, out)
    code, err = finish(start(job(tiny_cog, shapes_data, out, 1), FT_TEST_KILL_AT=point))  # the last job merges
    assert code == -signal.SIGKILL, err[-3000:]
    shown = describe(str(out))
    assert "has not run" not in shown and "have not run" not in shown
    manifest = load_manifest(out)
    if manifest.unmerged is None:  # the manifest was written: inspect and train see the whole set already
        assert manifest.complete and manifest.num_samples == SAMPLES and len(manifest.active_keys(out)) == SAMPLES
    else:  # killed before the manifest: every job finished, and the message names the merge
        assert "NOT MERGED" in shown and "ft precompute --finalize" in shown
    run_cli(["precompute", "--finalize", "--out", out])
    assert_merged(out)
    assert "NOT MERGED" not in describe(str(out))
    assert not [p.name for p in out.rglob(".*") if "lock" not in p.name]  # no partial index, spill or temp file


def test_array_tasks_that_finish_first_say_which_run_which_stopped_and_which_never_started(
        tiny_cog, shapes_data, tmp_path):
    out = tmp_path / "shards"
    running = start(job(tiny_cog, shapes_data, out, 1, 3), FT_TEST_KILL_AT="started", FT_TEST_KILL_SIGNAL="STOP")
    try:
        deadline = time.time() + 120
        while not stopped(running.pid):  # job 1 holds its lock, its state saved as not finished
            assert time.time() < deadline and running.poll() is None, running.stderr.read()[-3000:]
            time.sleep(0.2)
        code, err = finish(start(job(tiny_cog, shapes_data, out, 0, 3)))
        assert code == 0, err[-3000:]
        assert f"job(s) 1 of 3 are still running (job 1: host {os.uname().nodename}, pid {running.pid}): wait " \
               "for them" in err
        assert "job(s) 0 of 3 finished" in err and "job(s) 2 of 3 have not run" in err
        assert "stopped before finishing" not in err and "rerun" not in err
    finally:
        running.kill()
        running.wait()
    status = load_manifest(out).describe_completeness()  # killed now: its lock names a process that is gone
    assert "job(s) 1 of 3 stopped before finishing: rerun each (job 1: `ft precompute --config" in status
    assert "still running" not in status


def test_a_zero_byte_lock_of_a_writer_killed_while_making_it_is_taken_over(tiny_cog, shapes_data, tmp_path,
                                                                           caplog):
    out = tmp_path / "shards"
    code, err = finish(start(argv(tiny_cog, shapes_data, out), FT_TEST_KILL_AT="lock-created"))
    assert code == -signal.SIGKILL, err[-3000:]
    lock = out / JOBS_DIR / "job-0000-of-0001.lock"
    assert lock.stat().st_size == 0
    aged = time.time() - 60  # as the next run finds it a minute later (one younger is waited for: being filled)
    os.utime(lock, (aged, aged))
    with caplog.at_level(logging.INFO, logger="ft"):
        run_cli(argv(tiny_cog, shapes_data, out))
    assert "took over the stale lock of an empty lock file, left by a writer killed while creating it" in caplog.text
    assert "pid 0" not in caplog.text and not lock.exists()
    assert load_manifest(out).complete

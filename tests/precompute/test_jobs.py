"""Precompute as N jobs into one --out, as real processes: 2 jobs give exactly the samples of 1 (keys and tensor
bytes); a job killed with SIGKILL and rerun gives the same; a second writer is refused while the first runs, and
the lock of a dead one is taken over; `ft train` refuses a set that is not merged, naming the command that merges
it; `ft inspect` shows the jobs."""

from __future__ import annotations

import logging
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from ft.cli.inspect_shards import describe
from ft.common.errors import UserError
from ft.common.shards import ACTIVE_KEYS_NAME, EMPTY_CAPTION_NAME, JOBS_DIR, iter_shard, load_manifest, open_shard_set  # noqa: E501
from helpers import BUCKETS, FP32, finish, run_cli, start, stopped

pytestmark = pytest.mark.slow
FLAGS = [*FP32, *BUCKETS, "--shard-samples", "2"]


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["precompute", "--model", "cogvideox", "--pretrained", str(model), "--dataset", str(data),
            "--out", str(out), *FLAGS, *extra]


def tensors(out: Path) -> dict[str, dict[str, bytes]]:
    """Every trained sample's tensors as bytes, by key (each key once)."""
    manifest, paths = open_shard_set(out)
    active = manifest.active_keys(out)
    found: dict[str, dict[str, bytes]] = {}
    for path in paths:
        for s in iter_shard(path):
            if s.key in active:
                found[s.key] = {f"{g}/{n}": t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                for g, named in s.tensors.items() for n, t in named.items()}
    return found


@pytest.fixture(scope="module")
def one_job(tiny_cog, shapes_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-job") / "shards"
    run_cli(argv(tiny_cog, shapes_data, out))
    return out


def assert_same_samples(out: Path, reference: Path) -> None:
    manifest = load_manifest(out)
    assert manifest.complete and manifest.unmerged is None and not manifest.missing
    assert set((out / ACTIVE_KEYS_NAME).read_text().split()) == set((reference / ACTIVE_KEYS_NAME).read_text().split())
    assert tensors(out) == tensors(reference)
    assert not list((out / JOBS_DIR).glob("*.json")) and not list(out.glob("*.tmp"))


def test_two_jobs_as_two_processes_give_the_samples_of_one(tiny_cog, shapes_data, tmp_path, one_job):
    out = tmp_path / "shards"
    procs = [start(argv(tiny_cog, shapes_data, out, "--num-jobs", "2", "--job-index", str(i))) for i in (0, 1)]
    for proc in procs:
        code, err = finish(proc)
        assert code == 0, err[-3000:]
    assert_same_samples(out, one_job)
    manifest = load_manifest(out)
    assert {s.name.split("-")[1] for s in manifest.shards} == {"j0000", "j0001"}
    assert [(j["index"], j["num_jobs"], j["complete"]) for j in manifest.jobs] == [(0, 2, True), (1, 2, True)]
    assert sum(j["written"] for j in manifest.jobs) == manifest.num_samples
    shown = describe(str(out))
    assert "jobs           2" in shown and "job 1 of 2:" in shown
    assert manifest.empty_caption["file"] == EMPTY_CAPTION_NAME and (out / EMPTY_CAPTION_NAME).is_file()


def test_a_job_killed_and_rerun_gives_the_same(tiny_cog, shapes_data, tmp_path, one_job):
    out = tmp_path / "shards"
    killed = start(argv(tiny_cog, shapes_data, out, "--num-jobs", "2", "--job-index", "1"),
                   FT_TEST_KILL_AT="shard-renamed:1")
    other = start(argv(tiny_cog, shapes_data, out, "--num-jobs", "2", "--job-index", "0"))
    assert finish(killed)[0] == -signal.SIGKILL
    code, err = finish(other)
    assert code == 0, err[-3000:]
    manifest = load_manifest(out)  # job 0 finished, job 1 did not: the set says so and what to run
    assert manifest.unmerged is not None and not manifest.complete
    status = manifest.describe_completeness()
    assert "job(s) 1 of 2 stopped before finishing: rerun" in status and "ft precompute --config" in status
    with pytest.raises(UserError, match="INCOMPLETE.*job-0001-of-0002.config.json"):
        run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--shards", out,
                 "--output-dir", tmp_path / "train", "--rank", "4", "--train-steps", "1"])
    rerun = manifest.resume_command.split()  # job 1's saved config: it redoes only what it had not finished
    assert rerun[:3] == ["ft", "precompute", "--config"]
    code, err = finish(start(rerun[1:]))
    assert code == 0, err[-3000:]
    assert "adopting" in err or "already in" in err
    assert_same_samples(out, one_job)


def test_train_refuses_an_unmerged_set_with_the_command_that_merges_it(tiny_cog, shapes_data, tmp_path, one_job):
    out = tmp_path / "shards"
    code, _ = finish(start(argv(tiny_cog, shapes_data, out), FT_TEST_KILL_AT="job-complete"))
    assert code == -signal.SIGKILL
    with pytest.raises(UserError, match=r"NOT MERGED.*`ft precompute --finalize --out .*shards`"):
        run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--shards", out,
                 "--output-dir", tmp_path / "train", "--rank", "4", "--train-steps", "1", "--allow-incomplete"])
    assert "NOT MERGED" in describe(str(out))
    run_cli(["precompute", "--finalize", "--out", out])
    assert_same_samples(out, one_job)


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tiny_cog, shapes_data, tmp_path,
                                                                         one_job, caplog):
    out = tmp_path / "shards"
    first = start(argv(tiny_cog, shapes_data, out), FT_TEST_KILL_AT="started", FT_TEST_KILL_SIGNAL="STOP")
    try:
        deadline = time.time() + 120
        while not stopped(first.pid):  # paused by its own hook, holding the lock
            assert time.time() < deadline and first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.2)
        with pytest.raises(UserError, match=rf"being written by .*host {socket.gethostname()}, pid {first.pid}, "
                                            r"started .*Wait for it, or use another --out"):
            run_cli(argv(tiny_cog, shapes_data, out))
    finally:
        first.kill()  # SIGKILL: its lock stays behind, the lock of a dead process
        first.wait()
    assert (out / JOBS_DIR / "job-0000-of-0001.lock").is_file()
    with caplog.at_level(logging.INFO, logger="ft"):
        run_cli(argv(tiny_cog, shapes_data, out))
    assert f"took over the stale lock of `ft precompute` job 0 of 1 (single run) (host {socket.gethostname()}, pid " \
           f"{first.pid}" in caplog.text
    assert_same_samples(out, one_job)
    assert not (out / JOBS_DIR / "job-0000-of-0001.lock").exists()


def test_a_merge_killed_after_moving_the_empty_caption_is_merged_again(tiny_cog, shapes_data, tmp_path, one_job):
    # the merge moves job 0's empty caption into place before it writes the manifest: killed in between, the
    # next merge finds it moved already
    out = tmp_path / "shards"
    code, _ = finish(start(argv(tiny_cog, shapes_data, out), FT_TEST_KILL_AT="empty-caption-moved"))
    assert code == -signal.SIGKILL
    assert (out / EMPTY_CAPTION_NAME).is_file() and not list((out / JOBS_DIR).glob("*.empty_caption.*"))
    run_cli(["precompute", "--finalize", "--out", out])
    assert_same_samples(out, one_job)
    manifest = load_manifest(out)
    assert manifest.empty_caption["file"] == EMPTY_CAPTION_NAME
    assert open_shard_set(out)[0].empty_caption["sha256"] == load_manifest(one_job).empty_caption["sha256"]


def test_a_job_finishing_while_another_merges_waits_and_merges(tiny_cog, shapes_data, tmp_path, one_job):
    # two jobs finishing at once: A takes the merge lock and reads B's state before B saved it complete, so A
    # finds the set not ready; B, complete, must not step aside while A holds the lock, or nobody merges
    import json
    import threading

    from ft.precompute.job_slots import JobSlot, Lock
    from ft.precompute.merge import finalize

    out = tmp_path / "shards"
    code, _ = finish(start(argv(tiny_cog, shapes_data, out), FT_TEST_KILL_AT="job-complete"))
    assert code == -signal.SIGKILL
    other = Lock(out / JOBS_DIR / "merge.lock", "a merge of the jobs")
    other.acquire()  # job A, merging (held by a live process: this one)
    threading.Timer(1.0, other.release).start()  # A finds the set not ready and lets go
    merged = finalize(out, own=JobSlot())
    assert merged is not None and merged.unmerged is None, json.dumps(merged.unmerged if merged else None)
    assert_same_samples(out, one_job)


def test_finalize_of_a_folder_that_is_not_a_shard_set_touches_nothing(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "videos.txt").write_text("a.mp4\n")
    with pytest.raises(UserError, match="not a shard set written by `ft precompute`"):
        run_cli(["precompute", "--finalize", "--out", folder])
    assert sorted(p.name for p in folder.iterdir()) == ["videos.txt"]  # no jobs/ folder, no lock left behind

"""The jobs of one shard set agree on their encoding, or nothing merges: a job resubmitted with other flags is
refused when it starts (naming each differing flag and the command that makes it agree), and two jobs that started
at once with different flags are refused at the merge; the command named in either message then merges the set."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from ft.common.errors import UserError
from ft.common.shards import JOBS_DIR, iter_shard, load_manifest, open_shard_set
from helpers import BUCKETS, FP32, finish, run_cli, start, stopped


def argv(model: Path, data: Path, out: Path, index: int, *extra: str) -> list[str]:
    return ["precompute", "--model", "cogvideox", "--pretrained", str(model), "--dataset", str(data), "--out",
            str(out), *FP32, "--num-jobs", "2", "--job-index", str(index), *extra]


def command_in(message: str) -> list[str]:
    """The `ft precompute ...` command a message names, as arguments after `ft`."""
    found = re.search(r"`ft (precompute --config [^`]+)`", message)
    assert found, message
    return found.group(1).split()


def captions(out: Path) -> set[str]:
    manifest, paths = open_shard_set(out)
    active = manifest.active_keys(out)
    return {s.meta["caption"] for p in paths for s in iter_shard(p) if s.key in active}


def test_a_job_resubmitted_with_other_flags_is_refused_at_start_and_the_named_command_merges(
        tiny_cog, shapes_data, tmp_path):
    out = tmp_path / "shards"
    run_cli(argv(tiny_cog, shapes_data, out, 0, *BUCKETS))
    with pytest.raises(UserError) as error:
        run_cli(argv(tiny_cog, shapes_data, out, 1, "--id-token", "sks", "--buckets", "9x64x96"))
    message = str(error.value)
    assert "job 1 of 2 would encode with other parameters than job 0 of 2" in message
    assert "--buckets 9x64x96 against 9x32x32 9x32x64 1x32x32" in message
    assert "--id-token sks against (none)" in message and "--resize-mode" not in message
    assert not list(out.glob("shard-j0001-*")) and not (out / JOBS_DIR / "job-0001-of-0002.json").exists()
    run_cli(command_in(message))  # job 0's config with this job's index
    manifest = load_manifest(out)
    assert manifest.complete and manifest.unmerged is None
    assert manifest.encoding["captions"] == {"id_token": None, "strip_llm_prefixes": False}
    assert manifest.encoding["buckets"] == [[9, 32, 32], [9, 32, 64], [1, 32, 32]]
    assert not any(c.startswith("sks") for c in captions(out))


@pytest.mark.slow
def test_two_jobs_started_at_once_with_other_flags_are_refused_at_the_merge(tiny_cog, shapes_data, tmp_path):
    out = tmp_path / "shards"
    # job 0 passes its start check and is paused before its state exists; job 1 then starts with other flags
    paused = start(argv(tiny_cog, shapes_data, out, 0, *BUCKETS, "--id-token", "sks"), FT_TEST_KILL_AT="checked",
                   FT_TEST_KILL_SIGNAL="STOP")
    deadline = time.time() + 120
    while not stopped(paused.pid):
        assert time.time() < deadline and paused.poll() is None, paused.stderr.read()[-3000:]
        time.sleep(0.2)
    code, err = finish(start(argv(tiny_cog, shapes_data, out, 1, *BUCKETS)))
    assert code == 0, err[-3000:]  # job 0 still runs: job 1 leaves the merge to it
    paused.send_signal(signal.SIGCONT)
    code, err = finish(paused)
    assert code == 2 and f"{out} cannot be merged: job(s) 0 of 2 encoded with other parameters than job 1" in err
    assert "--id-token sks against (none)" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="--id-token sks against"):
        run_cli(["precompute", "--finalize", "--out", out])
    run_cli(command_in(err))  # job 0 again, with job 1's flags
    manifest = load_manifest(out)
    assert manifest.complete and manifest.unmerged is None and manifest.encoding["captions"]["id_token"] is None
    assert not any(c.startswith("sks") for c in captions(out))

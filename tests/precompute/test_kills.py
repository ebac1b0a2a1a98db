"""Kills are safe everywhere: `ft precompute` run as a real process and SIGKILLed at several points (through the
FT_TEST_KILL_AT hook in common/shards/, which makes the process kill itself exactly at a named point), then
rerun, gives the sample set of an uninterrupted run, each sample once; until then the shard set says it is
incomplete and `ft train` refuses it. A Ctrl-C says what was kept and how to go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ft.common.errors import UserError
from ft.common.shards import ACTIVE_KEYS_NAME, Manifest, open_shard_set, require_complete, shard_keys
from helpers import BUCKETS, FP32, run_cli

FLAGS = [*FP32, *BUCKETS, "--shard-samples", "3"]


def precompute_argv(model: Path, data: Path, out: Path) -> list[str]:
    return ["precompute", "--model", "cogvideox", "--pretrained", str(model), "--dataset", str(data),
            "--out", str(out), *FLAGS]


def run_process(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    # SIGINT back to its default in the child: a test run started as a background job inherits it ignored, and
    # Python then never turns Ctrl-C into KeyboardInterrupt
    return subprocess.run([sys.executable, "-m", "ft.cli.main", *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def active_keys(out: Path) -> set[str]:
    return set((out / ACTIVE_KEYS_NAME).read_text().split())


def listed_keys(out: Path) -> list[str]:
    """Every key of every listed shard, repeats kept."""
    manifest, paths = open_shard_set(out)
    return [k for p in paths for k in shard_keys(p)]


@pytest.fixture(scope="module")
def reference(tiny_cog, shapes_data, tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("uninterrupted") / "shards"
    run_cli(precompute_argv(tiny_cog, shapes_data, out))
    return active_keys(out)


# a kill inside a sample, before a shard's rename, between a shard's rename and its manifest entry (the first
# shard, before the manifest names any; a later one), once the last item is planned (a first run plans while it
# encodes), and after the last shard before the run is marked complete
@pytest.mark.parametrize("point", ["sample-member:4", "shard-written:1", "shard-renamed:1", "shard-renamed:2",
                                   "planned", "encoded"])
def test_a_kill_then_a_rerun_gives_the_uninterrupted_sample_set(point, tiny_cog, shapes_data, tmp_path, reference):
    out = tmp_path / "shards"
    killed = run_process(precompute_argv(tiny_cog, shapes_data, out), FT_TEST_KILL_AT=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    manifest = Manifest.load(out)
    assert manifest.complete is False and manifest.resume_command.startswith("ft precompute --config ")
    with pytest.raises(UserError, match="INCOMPLETE.*ft precompute --config .*--allow-incomplete"):
        require_complete(manifest, out)
    if point == "shard-renamed:2":  # the command the refusal names completes the set
        command = manifest.resume_command.split()
        run_cli(command[1:])
    else:
        run_cli(precompute_argv(tiny_cog, shapes_data, out))
    manifest = Manifest.load(out)
    assert manifest.complete and not manifest.missing
    keys = listed_keys(out)
    assert len(keys) == len(set(keys)), "a sample is listed twice"
    assert active_keys(out) == reference and set(keys) == reference
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(s.name for s in manifest.shards)
    assert not list(out.glob("*.tmp"))
    again = run_cli(precompute_argv(tiny_cog, shapes_data, out))  # nothing left to do: nothing changes
    assert [s.name for s in again.shards] == [s.name for s in manifest.shards]


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(tiny_cog, shapes_data, tmp_path, reference):
    out = tmp_path / "shards"
    result = run_process(precompute_argv(tiny_cog, shapes_data, out), FT_TEST_KILL_AT="shard-renamed:2",
                         FT_TEST_KILL_SIGNAL="INT")
    assert result.returncode == 130, result.stderr[-2000:]
    assert "interrupted: kept 3 new samples" in result.stderr  # the second shard was renamed, not yet recorded
    assert "Run the same command again" in result.stderr and "Traceback" not in result.stderr
    run_cli(precompute_argv(tiny_cog, shapes_data, out))
    keys = listed_keys(out)
    assert len(keys) == len(set(keys)) and set(keys) == reference

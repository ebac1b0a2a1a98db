"""The merge's flat-memory de-duplication (precompute/spill.py) keeps what a dict of every line kept, whether the
lines fit one partition or are spilled into many; a merge killed while spilling, or stopped by a full disk, leaves
no spill or partial file behind, and `--finalize` on a full disk names the set and merges it once there is room."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ft.precompute import merge, spill
from ft.precompute.media_cache import CACHE_DIR, CACHE_NAME, merge_cache_files


@pytest.mark.parametrize("part_bytes", [1 << 20, 64])
def test_keys_each_once_and_the_repeated_ones_named(tmp_path, monkeypatch, part_bytes):
    monkeypatch.setattr(spill, "PART_BYTES", part_bytes)
    rng = random.Random(0)
    files = []
    for j in range(3):
        keys = [f"{rng.randrange(400):032x}" for _ in range(150)]
        keys = list(dict.fromkeys(keys))  # a job drops its own duplicates
        path = tmp_path / f"job{j}.txt"
        path.write_text("".join(k + "\n" for k in keys))
        files.append(path)
    count, repeated = spill.write_unique(files, tmp_path / "active.txt", lambda line: line.strip() or None,
                                         keep_last=False)
    every = [k for f in files for k in f.read_text().split()]
    written = (tmp_path / "active.txt").read_text().split()
    assert sorted(written) == sorted(set(every)) and count == len(written)
    assert set(repeated) == {k for k in every if every.count(k) > 1}
    assert not list(tmp_path.glob(".spill-*"))


@pytest.mark.parametrize("part_bytes", [1 << 20, 200])
def test_the_media_cache_keeps_the_newest_entry_of_each_path(tmp_path, monkeypatch, part_bytes):
    monkeypatch.setattr(spill, "PART_BYTES", part_bytes)
    folder = tmp_path / CACHE_DIR
    folder.mkdir()
    want = {}
    for name, version in ((CACHE_NAME, 0), ("media-job-0000-of-0002.jsonl", 1), ("media-job-0001-of-0002.jsonl", 2)):
        lines = []
        for i in range(version, 40, 2 if version else 1):
            entry = {"path": f"/videos/{i}.mp4", "stat": [i, version, 0], "frames": 9}
            lines.append(json.dumps(entry, separators=(",", ":")))
            want[entry["path"]] = entry
        (folder / name).write_text("\n".join(lines + ["{torn"]) + "\n")
    merge_cache_files(tmp_path)
    got = [json.loads(line) for line in (folder / CACHE_NAME).read_text().splitlines()]
    assert {e["path"]: e for e in got} == want and len(got) == len(want)
    assert sorted(p.name for p in folder.iterdir()) == [CACHE_NAME]


def test_a_merge_killed_while_spilling_leaves_no_spill_files_once_merged_again(tmp_path):
    keys = [f"{i % 300:032x}" for i in range(500)]
    (tmp_path / "job0.txt").write_text("".join(k + "\n" for k in keys))
    code = ("import sys; from pathlib import Path; from ft.precompute import spill; spill.PART_BYTES = 64; "
            "t = Path(sys.argv[1]); spill.write_unique([t / 'job0.txt'], t / 'active.txt', "
            "lambda line: line.strip() or None, keep_last=False)")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "FT_TEST_KILL_AT": "spilled"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list(tmp_path.glob(".spill-*"))  # the killed merge's partitions
    count, _ = spill.write_unique([tmp_path / "job0.txt"], tmp_path / "active.txt", lambda line: line.strip() or None,
                                  keep_last=False)
    assert count == 300 and sorted((tmp_path / "active.txt").read_text().split()) == sorted(set(keys))
    assert not list(tmp_path.glob(".spill-*"))


def test_a_full_disk_leaves_neither_a_partial_file_nor_spill_files_in_a_merge(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        (tmp_path / "job0.txt").write_text("".join(f"{i:032x}\n" for i in range(60000)))  # 2 MB: more than the disk
        for part_bytes in (1 << 30, 64 << 10):  # one partition (the output fills the disk); spilled (the spill does)
            monkeypatch.setattr(spill, "PART_BYTES", part_bytes)
            with pytest.raises(OSError, match="No space left"):
                spill.write_unique([tmp_path / "job0.txt"], disk / "active.txt", lambda line: line.strip() or None,
                                   keep_last=False)
            assert list(disk.iterdir()) == []
        (disk / "job0-warnings.jsonl").symlink_to(tmp_path / "job0.txt")  # the merge's concatenation of job files
        with pytest.raises(OSError, match="No space left"):
            merge._concat(disk, ["job0-warnings.jsonl"], "warnings.jsonl")
        assert [p.name for p in disk.iterdir()] == ["job0-warnings.jsonl"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_finalize_on_a_full_disk_names_the_set_and_leaves_it_to_be_merged_again(tmp_path):
    import importlib.util

    from ft.common.errors import UserError
    from ft.common.shards import load_manifest

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        found = importlib.util.spec_from_file_location("synthetic_set", Path(__file__).parents[2] / "bench" /
                                                       "synthetic_set.py")
        synthetic = importlib.util.module_from_spec(found)
        found.loader.exec_module(synthetic)
        synthetic.write_jobs(disk / "set", samples=200, num_jobs=2)  # two finished jobs, not merged
        with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        with pytest.raises(UserError, match=f"--out {disk / 'set'}: .*no space left.*--finalize"):
            merge.finalize_command_line(["--out", str(disk / "set")])
        (disk / "filler").unlink()
        assert not [p.name for p in (disk / "set").rglob("*.tmp")]
        merge.finalize_command_line(["--out", str(disk / "set")])
        assert load_manifest(disk / "set").num_samples == 200
    finally:
        subprocess.run(["umount", str(disk)], check=True)

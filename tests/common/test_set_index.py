"""The whole-set index (common/shards/set_index.py): written by precompute's merge, built once and saved for an
older set, rebuilt when the manifest or the training view changes, built in a temporary file for a read-only set,
and holding image-to-video rows' image half keys."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest
import torch

from ft.common.errors import UserError
from ft.common.shards import Manifest, ShardWriter, load_manifest, set_index, shard_rows
from ft.common.shards.set_index import INDEX_NAME, SetIndex, open_set_index, source_id
from ft.train.loader import SetStream, ShardSet


def write_set(folder, n=12, image=False):
    writer = ShardWriter(folder, max_samples=5)
    for i in range(n):
        key = f"{i + 1:032x}"
        meta = {"bucket": [1, 8, 8 * (1 + i % 2)], "video_key": f"{i + 100:032x}", "text_key": f"{i + 200:032x}"}
        if image:
            meta["image_key"] = f"{i + 300:032x}"
        writer.write(key, {"latents": {"mean": torch.zeros(1)}}, meta)
    writer.finish_shard()
    Manifest("cogvideox", {}, "", {}, {}, shards=writer.completed).save(folder)
    return folder


def test_a_precompute_run_leaves_the_index_that_training_maps(family_shards):
    out = family_shards("cogvideox")
    manifest = load_manifest(out)
    index = SetIndex(out / INDEX_NAME)
    assert index.header["source"] == source_id(manifest, out)
    assert ShardSet(out).index.header == index.header  # used as it is, not rebuilt
    assert index.active_keys == len(manifest.active_keys(out))
    rows = [r for i, info in enumerate(manifest.shards) for r in index.index_rows(i)]
    assert rows == [r for info in manifest.shards for r in shard_rows(out / info.name, info)]


def test_an_older_set_is_indexed_once_and_again_when_it_changes(tmp_path):
    folder = write_set(tmp_path / "old")
    assert not (folder / INDEX_NAME).exists()
    first = ShardSet(folder).index
    assert (folder / INDEX_NAME).is_file() and first.samples == 12
    written = (folder / INDEX_NAME).stat().st_mtime_ns
    assert ShardSet(folder).index.header == first.header
    assert (folder / INDEX_NAME).stat().st_mtime_ns == written  # read, not rebuilt
    manifest = load_manifest(folder)
    keys = [r.key for s in manifest.shards for r in shard_rows(folder / s.name, s)]
    (folder / "active_keys.txt").write_text("".join(k + "\n" for k in keys[:7]))
    manifest.active = {"keys_file": "active_keys.txt", "samples": 7, "buckets": {}}
    manifest.save(folder)
    index = ShardSet(folder).index
    assert index.active_keys == 7 and index.active.tolist() == [1] * 7 + [0] * 5
    assert index.fingerprint != first.fingerprint


def test_a_read_only_set_builds_its_index_in_a_temporary_file(tmp_path, caplog, monkeypatch):
    folder = write_set(tmp_path / "ro")
    os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):  # root writes anywhere: the folder is then read-only as far as ft can tell
            real = os.access
            monkeypatch.setattr(set_index.os, "access", lambda p, mode: mode != os.W_OK and real(p, mode))
        with caplog.at_level(logging.WARNING):
            index = open_set_index(folder, load_manifest(folder))
        assert index.samples == 12 and not (folder / INDEX_NAME).exists() and not index.path.exists()
        assert "read-only" in caplog.text
    finally:
        os.chmod(folder, 0o755)


def test_image_to_video_rows_keep_their_image_half_key(tmp_path):
    folder = write_set(tmp_path / "i2v", image=True)
    info = load_manifest(folder).shards[0]
    rows = shard_rows(folder / info.name, info)
    assert rows[0].image_key == f"{300:032x}"
    index = ShardSet(folder).index
    assert index.keys(range(12), "image_key") == [f"{i + 300:032x}" for i in range(12)]
    plain = write_set(tmp_path / "t2v")
    assert ShardSet(plain).index.keys(range(3), "image_key") == ["", "", ""]
    assert len((plain / "shard-000000.idx").read_text().splitlines()[1].split(",")) == 6  # rows as before


def test_a_damaged_index_is_rebuilt(tmp_path):
    folder = write_set(tmp_path / "bad")
    assert ShardSet(folder).index.samples == 12
    (folder / INDEX_NAME).write_bytes(b"FTSETIX1" + b"\0" * 100)
    assert ShardSet(folder).index.samples == 12
    shutil.rmtree(folder)


def test_a_build_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import socket
    import sys

    folder = write_set(tmp_path / "locked")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / (INDEX_NAME + ".lock")).write_text(json.dumps({"host": socket.gethostname(),
                                                             "pid": int(gone.stdout)}))
    assert ShardSet(folder).index.samples == 12
    assert not (folder / (INDEX_NAME + ".lock")).exists() and (folder / INDEX_NAME).is_file()


@pytest.mark.parametrize("builder", ["open_set_index", "write_set_index"])  # training's build; the merge's
def test_a_build_killed_after_spilling_leaves_nothing_once_the_next_one_is_done(tmp_path, builder):
    import signal
    import sys

    folder = write_set(tmp_path / "killed")
    code = (f"from pathlib import Path; from ft.common.shards import load_manifest, set_index as s; "
            f"s.{builder}(Path({str(folder)!r}), load_manifest(Path({str(folder)!r})))")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "FT_TEST_KILL_AT": "set-index-spilled"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p for p in folder.iterdir() if p.name.startswith(".")]  # its partial index and its spill files
    getattr(set_index, builder)(folder, load_manifest(folder))
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert SetIndex(folder / INDEX_NAME).samples == 12


def test_an_empty_build_lock_left_long_ago_is_taken_over(tmp_path):
    folder = write_set(tmp_path / "torn")
    lock = folder / (INDEX_NAME + ".lock")
    for text in ("", "{}"):  # killed between creating the lock and filling it in; a lock naming no process
        lock.write_text(text)
        old = time.time() - 60
        os.utime(lock, (old, old))
        (folder / INDEX_NAME).unlink(missing_ok=True)
        assert ShardSet(folder).index.samples == 12
        assert not lock.exists() and (folder / INDEX_NAME).is_file()


def test_a_build_lock_held_on_another_host_is_waited_for_a_bounded_time(tmp_path, caplog):
    folder = write_set(tmp_path / "elsewhere")
    lock = folder / (INDEX_NAME + ".lock")
    lock.write_text(json.dumps({"what": "an index build", "host": "another-host.invalid", "pid": 1}))
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(UserError, match="delete .*lock if no `ft` is building"):
        open_set_index(folder, load_manifest(folder), wait_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert caplog.text.count("waiting for") == 1 and "another-host.invalid" in caplog.text
    assert lock.exists() and not (folder / INDEX_NAME).exists()  # someone else's lock is left alone


def test_a_view_rewritten_with_the_same_size_and_mtime_is_followed(tmp_path):
    folder = write_set(tmp_path / "view")
    manifest = load_manifest(folder)
    keys = [r.key for s in manifest.shards for r in shard_rows(folder / s.name, s)]
    view = folder / "active_keys.txt"
    view.write_text("".join(k + "\n" for k in keys[:6]))
    manifest.active = {"keys_file": "active_keys.txt", "samples": 6, "buckets": {}}
    manifest.save(folder)
    first = ShardSet(folder).index
    assert first.active.tolist() == [1] * 6 + [0] * 6
    before = view.stat()
    view.write_text("".join(k + "\n" for k in keys[6:]))  # `cp -p` / `rsync -a` of another view: same size, old mtime
    os.utime(view, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (view.stat().st_size, view.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    index = ShardSet(folder).index
    assert index.active.tolist() == [0] * 6 + [1] * 6 and index.fingerprint != first.fingerprint
    stream = SetStream(ShardSet(folder), 0, seed=1, batch_size=1)
    trained = []
    for steps in stream.batches(0):
        trained += [k for b in steps for k in b.keys]
        if len(trained) >= 6:
            break
    assert sorted(trained) == keys[6:]


def test_an_index_path_taken_by_a_directory_is_named(tmp_path):
    folder = write_set(tmp_path / "dir")
    (folder / INDEX_NAME).mkdir()
    with pytest.raises(UserError, match=f"{folder / INDEX_NAME} is a directory.*remove it"):
        open_set_index(folder, load_manifest(folder))


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 2 MB tmpfs (root only): a disk that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk, leave_pages=0):
    """Fill `disk` to the last page, then free `leave_pages` of them."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = (disk / "filler").stat().st_size
    os.truncate(disk / "filler", size - size % 4096 - 4096 * leave_pages)


def test_a_full_disk_builds_the_index_in_a_temporary_file(tiny_disk, caplog):
    folder = write_set(tiny_disk / "set")
    for leave_pages in (0, 1):  # no room for the build lock; room for the lock but not the index
        fill(tiny_disk, leave_pages)
        with caplog.at_level(logging.WARNING):
            index = ShardSet(folder).index
        assert index.samples == 12 and index.keys([0]) == [f"{1:032x}"] and not index.path.exists()
        assert "cannot be saved there" in caplog.text and "temporary file" in caplog.text
        assert sorted(p.name for p in folder.iterdir() if "set_index" in p.name) == []  # no lock, no partial index
        caplog.clear()
        (tiny_disk / "filler").unlink()


def test_a_full_disk_and_a_full_temporary_folder_are_named(tiny_disk, monkeypatch):
    folder = write_set(tiny_disk / "set")
    fill(tiny_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(tiny_disk))  # TMPDIR on the same full disk
    with pytest.raises(UserError, match=f"{tiny_disk}/ft-set-index-.*cannot build the index of {folder}.*about 1 MB"):
        open_set_index(folder, load_manifest(folder))
    assert not list(tiny_disk.glob("ft-set-index-*"))


def test_an_index_with_a_malformed_header_or_bucket_ids_past_its_buckets_is_rebuilt(tmp_path):
    folder = write_set(tmp_path / "malformed")
    good = ShardSet(folder).index
    header, buckets, spec = good.header, good.bucket.tolist(), good.header["columns"]["bucket"]
    path = folder / INDEX_NAME
    for bad in (b"[1]", b'{"format": "ft-set-index", "version": 1, "samples": "many"}', b"null"):
        path.unlink()  # a new file: the one mapped above keeps its pages
        path.write_bytes(b"FTSETIX1" + np.array([4096, len(bad)], "<u8").tobytes() + b"\0" * 4072 + bad)
        assert ShardSet(folder).index.header == header
    with open(path, "r+b") as f:  # a bucket id past the two buckets, under a header that matches the set
        f.seek(spec["offset"] + 3)
        f.write(bytes([7]))
    assert SetIndex(path).bucket[3] == 7
    index = ShardSet(folder).index
    assert index.bucket.tolist() == buckets and int(index.bucket.max()) < len(index.buckets)


def test_a_shard_changed_during_training_names_the_index(tmp_path):
    folder = write_set(tmp_path / "changed")
    other = tmp_path / "other"
    writer = ShardWriter(other, max_samples=5)
    for i in range(12):
        writer.write(f"{i + 1001:032x}", {"latents": {"mean": torch.zeros(1)}}, {"bucket": [1, 8, 8 * (1 + i % 2)]})
    writer.finish_shard()
    stream = SetStream(ShardSet(folder), 0, seed=1, batch_size=1)
    steps = stream.batches(0)
    for _ in range(12):  # the first pass reads (and verifies) every shard
        next(steps)
    for ext in ("tar", "idx"):  # another job's shard of the same name and count
        shutil.copy(other / f"shard-000001.{ext}", folder / f"shard-000001.{ext}")
    with pytest.raises(UserError, match=f"planned batches could not be read.*delete {folder / INDEX_NAME}"):
        for _ in range(12):
            next(steps)


def test_the_builder_removes_partial_indexes_of_killed_builders_on_its_host(tmp_path):
    import socket
    import sys

    folder = write_set(tmp_path / "leftovers")
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    host = socket.gethostname()
    dead = folder / f".{INDEX_NAME}.{host}.{gone}.tmp"
    kept = [folder / f".{INDEX_NAME}.{host}.{os.getppid()}.tmp",  # a builder still running
            folder / f".{INDEX_NAME}.another-host.invalid.{gone}.tmp"]  # another host's: cannot be checked
    for path in (dead, *kept):
        path.write_bytes(b"\0" * 4096)
    assert ShardSet(folder).index.samples == 12
    assert not dead.exists() and all(path.exists() for path in kept)


def test_a_build_on_another_host_that_makes_progress_is_waited_for(tmp_path):
    import threading

    folder = write_set(tmp_path / "slow")
    manifest = load_manifest(folder)
    lock = folder / (INDEX_NAME + ".lock")
    lock.write_text(json.dumps({"what": "an index build", "host": "another-host.invalid", "pid": 1}))
    partial = folder / f".{INDEX_NAME}.another-host.invalid.1.tmp"

    def build_elsewhere():  # the other host's builder: its partial index grows for 2 s, then it is put in place
        for _ in range(20):
            with open(partial, "ab") as f:
                f.write(b"\0" * 4096)
            time.sleep(0.1)
        partial.unlink()
        set_index.write_set_index(folder, manifest)
        lock.unlink()

    builder = threading.Thread(target=build_elsewhere)
    started = time.monotonic()
    builder.start()
    index = open_set_index(folder, manifest, wait_s=1.0)  # longer than a pause between writes, not the whole build
    builder.join()
    assert index.samples == 12 and time.monotonic() - started >= 2.0


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads the mapping's resident size from /proc")
def test_released_columns_read_the_same_and_leave_the_process(tmp_path):
    """`SetIndex.release` drops the process's mapping of a column's pages (they stay in the page cache): the column
    reads the same afterwards, and its pages no longer count in the process's resident memory."""
    folder = write_set(tmp_path / "r", n=1200)
    index = ShardSet(folder).index
    keys, buckets = index.columns["key"].copy(), index.bucket.copy()  # 19 KB of keys read in
    resident = _mapped_kb(index.path)
    index.release("key", "bucket")
    assert _mapped_kb(index.path) <= resident - 16
    assert np.array_equal(index.columns["key"], keys) and np.array_equal(index.bucket, buckets)


def _mapped_kb(path) -> int:
    """This process's resident KB of its mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_merge_copies_the_rows_of_the_shards_its_last_index_holds(tmp_path):
    """The index a merge replaces gives the rows of the shards kept (their `.idx` files are not read: here the
    old shards are moved away while the new index is built); the result is byte for byte a build from the shards."""
    from ft.common.shards import PreviousIndex
    from ft.common.shards.set_index_build import build_set_index

    folder = write_set(tmp_path / "grown")
    base = load_manifest(folder)
    keys = [r.key for s in base.shards for r in shard_rows(folder / s.name, s)]
    (folder / "active_keys.txt").write_text("".join(k + "\n" for k in keys[:9]))
    base.active = {"keys_file": "active_keys.txt", "samples": 9, "buckets": {}}
    base.save(folder)
    base = load_manifest(folder)
    set_index.write_set_index(folder, base)
    writer = ShardWriter(folder, max_samples=5)  # a rerun's shards, after the old ones
    for i in range(12, 19):
        writer.write(f"{i + 1:032x}", {"latents": {"mean": torch.zeros(1)}},
                     {"bucket": [1, 16, 8], "video_key": f"{i + 100:032x}", "text_key": ""})
    writer.finish_shard()
    grown = Manifest("cogvideox", {}, "", {}, {}, shards=[*base.shards, *writer.completed])
    grown.active = {"keys_file": "active_keys.txt", "samples": 16, "buckets": {}}
    assert PreviousIndex.open(folder, grown) is None  # an index of other shards is never copied from
    previous = PreviousIndex.open(folder, base)  # as the merge opens it: before it rewrites the view
    assert previous is not None and previous.kept(grown) == len(base.shards)
    (folder / "active_keys.txt").write_text("".join(f"{i + 1:032x}\n" for i in range(3, 19)))
    assert PreviousIndex.open(folder, base) is None  # nor once the view it covers is rewritten
    away = tmp_path / "away"
    away.mkdir()
    for info in base.shards:
        for path in (folder / info.name, folder / info.name.replace(".tar", ".idx")):
            shutil.move(path, away / path.name)
    try:
        set_index.write_set_index(folder, grown, previous)
    finally:
        previous.close()
    for path in away.iterdir():
        shutil.move(path, folder / path.name)
    build_set_index(folder, grown, tmp_path / "whole.bin")
    assert (folder / INDEX_NAME).read_bytes() == (tmp_path / "whole.bin").read_bytes()
    index = SetIndex(folder / INDEX_NAME)
    assert index.samples == 19 and index.active.sum() == 16 and index.buckets == ["1x16x8", "1x8x16", "1x8x8"]

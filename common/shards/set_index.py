"""One index for a whole shard set (`set_index.bin` beside `manifest.json`), memory-mapped by every process.

`ft train` plans an epoch from it with numpy and reads it through `mmap`: nothing is parsed per sample, no
per-sample Python object is made, and the ranks of a node share its pages through the page cache (no process holds
a private copy). Precompute's merge writes it with the manifest (precompute/merge.py); a set written before it
existed (or whose index no longer matches the manifest) has it built once from the shards' `<shard>.idx` files
(or their tar headers) and saved beside the manifest, atomically; a read-only set builds it in a temporary file,
maps it and warns. A plain WebDataset reader ignores it, as it ignores the `.idx` files. The build, in flat memory
whatever the set's size, is set_index_build.py.

The format (little-endian):

    bytes 0-7     b"FTSETIX1"
    bytes 8-15    uint64: offset of the JSON header      bytes 16-23  uint64: its length
    from 4096     the columns, each a C-contiguous array starting on a 64-byte boundary
    at the end    the JSON header

The header: `format` ("ft-set-index"), `version`, `samples` (N, the rows), `shards` (names, in the manifest's
order: the shard id), `shard_start` (N+1 boundaries: the rows of shard s are `shard_start[s]:shard_start[s+1]`,
in file order), `buckets` (names: the bucket id), `source` (what it was built from: `source_id`), `fingerprint`
(the set fingerprint the training position records: sha256 over the sorted shards' `name:sha256` lines and the
sorted active keys, 16 hex), `active_keys` (how many distinct keys the training view names, or null when the set
has no view), `duplicates` (groups of rows sharing a key, as lists of row numbers: a sample on disk twice), and
`columns` (name -> {dtype, offset, encoding}). The columns, one row per sample:

    key, video_key, text_key, image_key   fixed-width bytes: `hex` (the digest the 2w hex characters spell, as
                                          ft's keys are) or `ascii` (the text, NUL-padded); a half key the sample
                                          lacks is all zero (a hex half key of all zeros reads as none)
    bucket                                uint8/uint16 bucket id
    begin, end                            uint64 byte span of the sample's members in its tar (-1 when unknown)
    active                                uint8: 1 when the key is in the training view (every row when none)
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .liveness import TORN_AFTER_S, alive, describe_holder, process_start, read_lock
from .manifest import Manifest
from .reader import IndexRow

INDEX_NAME = "set_index.bin"
MAGIC = b"FTSETIX1"
FORMAT, VERSION = "ft-set-index", 1
DATA_START = 4096
BUILD_WAIT_S = 600.0  # the longest a process waits for another one's index build that shows no progress
KEY_COLUMNS = ("key", "video_key", "text_key", "image_key")
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_NIBBLE = np.zeros(256, np.uint8)  # a hex character's value (0 for NUL padding)
_NIBBLE[_HEX_DIGITS] = np.arange(16)


def active_files(manifest: Manifest) -> list[str]:
    """The files naming the training view's keys (none: every sample is trained on)."""
    if not manifest.active:
        return []
    return list(manifest.active.get("keys_files") or [manifest.active["keys_file"]])


def source_id(manifest: Manifest, folder: Path) -> str:
    """What an index describes: the manifest's shards (names, digests, counts, in order) and the content of the
    training view's key files (a sha256 of each, read a megabyte at a time: about 0.3 s for 10M keys' 330 MB, and
    the pages stay cached for the index build). Their size and mtime would not do: a rewrite of the same size
    that keeps the old mtime (`cp -p`, `rsync -a`) would train on the old view."""
    h = hashlib.sha256()
    for s in manifest.shards:
        h.update(f"{s.name}:{s.sha256}:{s.samples}\n".encode())
    for name in active_files(manifest):
        content = hashlib.sha256()
        try:
            with open(folder / name, "rb") as f:
                while block := f.read(1 << 20):
                    content.update(block)
        except OSError:
            raise UserError(f"{folder / name} is missing or unreadable; rerun `ft precompute` with the same --out "
                            "to rewrite it.") from None
        h.update(f"{name}:{content.hexdigest()}\n".encode())
    return h.hexdigest()


def hex_to_bytes(keys: np.ndarray) -> np.ndarray:
    """(n,) S32 lowercase hex -> (n, 16) uint8 digests (all zero for an empty key)."""
    nib = _NIBBLE[keys.view(np.uint8).reshape(len(keys), 32)]
    return (nib[:, 0::2] << 4) | nib[:, 1::2]


def bytes_to_hex(digests: np.ndarray) -> np.ndarray:
    """(n, w) uint8 digests -> (n, 2w) uint8 lowercase hex characters."""
    out = np.empty((len(digests), digests.shape[1] * 2), np.uint8)
    out[:, 0::2] = _HEX_DIGITS[digests >> 4]
    out[:, 1::2] = _HEX_DIGITS[digests & 15]
    return out


class SetIndex:
    """A whole-set index mapped read-only; columns are numpy views of the file's pages."""

    def __init__(self, path: Path, unlink: bool = False):
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if unlink:  # a temporary index (read-only set): the mapping keeps its pages
            path.unlink()
        if self._map[:8] != MAGIC:
            raise ValueError("not a set index")
        offset, length = np.frombuffer(self._map, "<u8", 2, 8).tolist()
        self.header: dict[str, Any] = json.loads(self._map[offset: offset + length])
        if hasattr(mmap, "MADV_DONTNEED"):  # the header's pages (1.5 MB at 10M rows) are parsed once
            self._map.madvise(mmap.MADV_DONTNEED, offset // mmap.PAGESIZE * mmap.PAGESIZE)
        if not isinstance(self.header, dict) or (self.header.get("format"), self.header.get("version")) != (FORMAT,
                                                                                                          VERSION):
            raise ValueError("another format or version")
        self.samples: int = self.header["samples"]
        self.shards: list[str] = self.header["shards"]
        self.shard_start = np.asarray(self.header.pop("shard_start"), np.int64)  # its 39k ints at 10M held once
        self.buckets: list[str] = self.header["buckets"]
        self.fingerprint: str = self.header["fingerprint"]
        self.duplicates: list[list[int]] = self.header["duplicates"]
        self.columns = {name: self._column(name) for name in self.header["columns"]}

    def _column(self, name: str) -> np.ndarray:
        spec = self.header["columns"][name]
        dtype = np.dtype(spec["dtype"])
        shape = (self.samples, *spec.get("shape", ()))
        return np.frombuffer(self._map, dtype, int(np.prod(shape)), spec["offset"]).reshape(shape)

    def _advise(self, advice: str, names: tuple[str, ...]) -> None:
        if not hasattr(self._map, "madvise") or not hasattr(mmap, advice):
            return
        for name in names:
            spec, column = self.header["columns"][name], self.columns[name]
            start = spec["offset"] // mmap.PAGESIZE * mmap.PAGESIZE
            self._map.madvise(getattr(mmap, advice), start, spec["offset"] + column.nbytes - start)

    def scattered(self, *names: str) -> None:
        """Say that columns `names` are read from here on in small scattered pieces (a pass in shard order): a read
        maps its own page (`MADV_RANDOM`), not the 64 KB about it that the kernel maps by default, so what the
        process holds of them between releases is the pages it read."""
        self._advise("MADV_RANDOM", names)

    def release(self, *names: str) -> None:
        """Drop this process's mapping of the pages of columns `names` it has read (`MADV_DONTNEED`): they stay in
        the page cache, shared, and come back with a minor fault when read again."""
        self._advise("MADV_DONTNEED", names)

    @property
    def bucket(self) -> np.ndarray:
        return self.columns["bucket"]

    @property
    def active(self) -> np.ndarray:
        return self.columns["active"]

    @property
    def active_keys(self) -> int | None:
        return self.header["active_keys"]

    def rows(self, shard: int) -> range:
        return range(int(self.shard_start[shard]), int(self.shard_start[shard + 1]))

    def keys(self, rows: Iterable[int] | np.ndarray, column: str = "key") -> list[str]:
        """The keys of `rows` as strings."""
        data = self.columns[column][np.asarray(rows, np.int64)]
        if self.header["columns"][column]["encoding"] == "hex":
            text = bytes_to_hex(data).view(f"S{2 * data.shape[1]}").ravel().tolist()
            if column == "key":  # never empty: all zero is a digest like any other
                return [t.decode() for t in text]
            zero = ~data.any(axis=1)  # a half key the sample does not have
            return ["" if z else t.decode() for t, z in zip(text, zero.tolist(), strict=True)]
        return [bytes(r).rstrip(b"\0").decode() for r in data]

    def sortable_keys(self, rows: np.ndarray) -> np.ndarray:
        """Keys of `rows` as fixed-width bytes that sort as the key strings do."""
        data = np.ascontiguousarray(self.columns["key"][rows])
        return data.view(f"S{data.shape[1]}").ravel()

    def index_rows(self, shard: int) -> list[IndexRow]:
        """A shard's rows as the `.idx` reader gives them."""
        rows = self.rows(shard)
        cols = [self.keys(rows, c) for c in KEY_COLUMNS]
        begin, end = (self.columns[c][rows.start: rows.stop].astype(np.int64).tolist() for c in ("begin", "end"))
        buckets = [self.buckets[b] for b in self.bucket[rows.start: rows.stop].tolist()]
        return [IndexRow(k, v, t, b, s, e, i)
                for k, v, t, i, b, s, e in zip(*cols, buckets, begin, end, strict=True)]


def write_set_index(folder: Path, manifest: Manifest, previous: Any = None) -> Path:
    """Build the index of `folder`'s set and put it in place atomically (`set_index.bin`); `previous`: the
    index being replaced (set_index_build.PreviousIndex), whose rows of the shards kept are copied."""
    target = folder / INDEX_NAME
    tmp = folder / f".{INDEX_NAME}.{socket.gethostname()}.{os.getpid()}.tmp"  # named for `_remove_leftovers`
    from .set_index_build import build_set_index

    _remove_leftovers(folder)  # a killed merge's (the merge builds here, without `_build_once`)
    try:
        build_set_index(folder, manifest, tmp, previous)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _matching(path: Path, wanted: str) -> SetIndex | None:
    """The index at `path` when it describes `wanted` and is sound; None (build it again) when it is missing, of
    another source, or damaged in any way: a torn, truncated or hand-edited file fails in ways no list of
    exception types covers (a header of the wrong shape, columns past the file's end, bucket ids out of range)."""
    try:
        index = SetIndex(path)
        if index.header.get("source") != wanted:
            return None
        _check(index)
    except Exception:
        return None
    return index


def _check(index: SetIndex) -> None:
    """Raise ValueError unless the shards' row ranges cover the rows and every bucket id names a bucket."""
    start = index.shard_start
    if len(start) != len(index.shards) + 1 or start[0] != 0 or start[-1] != index.samples or (np.diff(start) < 0).any():
        raise ValueError("shard row ranges that do not cover the rows")
    for at in range(0, index.samples, 1 << 20):  # a block at a time, its pages released: not 10 MB mapped at 10M
        if int(index.bucket[at: at + (1 << 20)].max()) >= len(index.buckets):
            raise ValueError("a bucket id past the buckets")
        index.release("bucket")


def _build_once(folder: Path, manifest: Manifest, wanted: str, wait_s: float = BUILD_WAIT_S) -> SetIndex:
    """Build and save the index, one process at a time: the ranks of a node starting on an older set wait for the
    one that builds it (a lock naming host, pid and start; a dead holder's lock is taken over, and so is a lock
    naming no process once older than `TORN_AFTER_S`). A holder on another host cannot be checked from here: after
    `wait_s` in which its partial index (`.set_index.bin.HOST.PID.tmp`) did not grow or change, this process gives
    up with a UserError naming the lock (a long build that writes is waited for)."""
    from ..logs import log

    lock = folder / (INDEX_NAME + ".lock")
    me = {"what": "an index build", "host": socket.gethostname(), "pid": os.getpid(),
          "process_start": process_start(os.getpid())}
    deadline = time.monotonic() + wait_s
    told, seen = False, None
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(lock)
            if holder is not None and not holder.get("pid") and not holder.get("torn") and _age(lock) > TORN_AFTER_S:
                holder = {"torn": True}  # `{}` or a holder naming no process, left long ago: no one builds
            if holder is not None and not alive(holder):
                lock.unlink(missing_ok=True)  # its builder is gone
            elif holder is not None:
                who = describe_holder(holder) if holder else "a process still writing the lock"
                if not told:
                    log.info(f"waiting for {lock}: {who} builds {INDEX_NAME}")
                    told = True
                progress = (holder, _stat(folder / f".{INDEX_NAME}.{holder.get('host')}.{holder.get('pid')}.tmp"))
                if progress != seen:
                    seen, deadline = progress, time.monotonic() + wait_s
                elif time.monotonic() > deadline:
                    raise UserError(f"{folder}: waited {wait_s:.0f} s without progress for {who} to build "
                                    f"{INDEX_NAME} (its lock {lock}); delete {lock} if no `ft` is building the index; "
                                    "run again.") from None
                time.sleep(0.2)
            found = _matching(folder / INDEX_NAME, wanted)
            if found is not None:
                return found
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            _remove_leftovers(folder)
            found = _matching(folder / INDEX_NAME, wanted)  # built while this process waited for the lock
            return found if found is not None else SetIndex(write_set_index(folder, manifest))
        finally:
            lock.unlink(missing_ok=True)


def _remove_leftovers(folder: Path) -> None:
    """Delete the partial indexes (`.set_index.bin.HOST.PID.tmp`) and spill folders (`<that>.spill`) of builders on
    this host that were killed; those of another host (or named by no host) cannot be checked from here and are
    left."""
    import shutil

    host = socket.gethostname()
    for path in [*folder.glob(f".{INDEX_NAME}.*.tmp"), *folder.glob(f".{INDEX_NAME}.*.tmp.spill")]:
        named, _, pid = path.name[len(INDEX_NAME) + 2:].removesuffix(".spill")[: -len(".tmp")].rpartition(".")
        if named == host and pid.isdigit() and not alive({"host": host, "pid": int(pid)}):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def open_set_index(folder: str | Path, manifest: Manifest, wait_s: float = BUILD_WAIT_S) -> SetIndex:
    """The set's index, mapped: `set_index.bin` when it describes `manifest` (its shards and training view),
    else built now and saved beside the manifest (or, for a set this process cannot write, or whose disk is full,
    built in a temporary file and mapped, with a warning)."""
    folder = Path(folder)
    for path in (folder / INDEX_NAME, folder / (INDEX_NAME + ".lock")):
        if path.exists() and not path.is_file():
            raise UserError(f"{path} is a directory (or another non-file), where ft keeps the set's index; remove "
                            "it, and ft builds the index again.")
    wanted = source_id(manifest, folder)
    found = _matching(folder / INDEX_NAME, wanted)
    if found is not None:
        return found
    from ..logs import log

    if not os.access(folder, os.W_OK):
        log.warning(f"{folder} is read-only: its index ({INDEX_NAME}) is built in a temporary file for this "
                    "process; `ft precompute --finalize` by its owner (or a writable copy) saves it for every run")
        return _temporary_index(folder, manifest)
    log.info(f"indexing {folder} ({manifest.num_samples} samples): once, saved as {INDEX_NAME}")
    try:
        return _build_once(folder, manifest, wanted, wait_s)
    except OSError as e:
        if e.errno not in _CANNOT_WRITE:
            raise
        log.warning(f"{folder}: its index cannot be saved there ({e.strerror}: {e.filename or folder}); it is built "
                    f"in a temporary file for this process. Free about {_index_mb(manifest)} MB there (or fix its "
                    "permissions) to save it for every run.")
    return _temporary_index(folder, manifest)


_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _index_mb(manifest: Manifest) -> int:
    """About how large the index of `manifest` is, in MB (hex keys: 83 bytes a sample, and the header)."""
    header = sum(len(s.name) + 24 for s in manifest.shards)
    return -(-(DATA_START + 1024 + 83 * manifest.num_samples + header) // (1 << 20))


def _temporary_index(folder: Path, manifest: Manifest) -> SetIndex:
    """The index built in a temporary file, mapped and unlinked (the mapping keeps its pages)."""
    from .set_index_build import build_set_index

    fd, name = tempfile.mkstemp(prefix="ft-set-index-")
    os.close(fd)
    try:
        build_set_index(folder, manifest, Path(name))
    except OSError as e:
        Path(name).unlink(missing_ok=True)
        if e.errno not in _CANNOT_WRITE:
            raise
        raise UserError(f"{name}: cannot build the index of {folder} there either ({e.strerror}); it needs about "
                        f"{_index_mb(manifest)} MB. Free that much in {folder} or in {Path(name).parent} (or point "
                        "TMPDIR at a folder with room), and run again.") from None
    return SetIndex(Path(name), unlink=True)

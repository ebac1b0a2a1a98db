"""Writing shards: `ShardWriter` fills `<prefix>-NNNNNN.tar` shards and writes each one's index file beside it.

A shard is written as `<name>.tar.tmp` and renamed when complete (after its index file is in place), so a killed
job never leaves a truncated `.tar` that looks whole, and a whole `.tar` always has its index. `on_shard` is
called with each completed shard's `ShardInfo` after the rename, so the caller records it at once (`ft
precompute` appends it to its job's journal): a kill then loses at most the shard being written.

Test hook: `FT_TEST_KILL_AT=<point>[:<n>]` makes the process SIGKILL itself the n-th time (default 1st) it
reaches a named point (`kill_point`), so the kill tests can stop `ft precompute` exactly between two steps, such
as a shard's rename and its journal entry (`FT_TEST_KILL_SIGNAL=INT` sends a Ctrl-C instead, `STOP` pauses the
process with its lock held). It is read only by `kill_point` and does nothing when unset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .buckets import bucket_name
from .codec import new_hasher, tensors_to_bytes
from .manifest import TENSOR_GROUPS, ShardInfo
from .reader import IndexRow, write_index_file

if TYPE_CHECKING:
    import torch


def kill_point(name: str) -> None:
    """Test hook (see the module docstring): signal this process at the named point when FT_TEST_KILL_AT asks."""
    wanted = os.environ.get("FT_TEST_KILL_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    if _KILL_COUNTS[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("FT_TEST_KILL_SIGNAL", "KILL")))


_KILL_COUNTS: dict[str, int] = {}


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.xxh3, self.size = f, hashlib.sha256(), new_hasher("xxh3_128"), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.xxh3.update(b)
        self.size += len(b)
        return self.f.write(b)


def shard_number(name: str) -> int:
    """`shard-000012.tar` or `shard-j0003-000012.tar` -> 12 (-1 for a name that is not a shard's)."""
    stem = name.split(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class ShardWriter:
    """Writes samples into `<prefix>-NNNNNN.tar` shards of at most `max_samples` samples / `max_bytes` bytes.

    Numbering starts at `start_index`, or (None) after the highest shard of this prefix already in the folder.
    """

    def __init__(self, folder: str | Path, prefix: str = "shard", start_index: int | None = None,
                 max_samples: int = 256, max_bytes: int = 1 << 30,
                 on_shard: Callable[[ShardInfo], None] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if start_index is None:
            start_index = 1 + max((shard_number(p.name) for p in self.folder.glob(f"{prefix}-*")
                                   if p.name[len(prefix) + 1:].split(".")[0].isdigit()), default=-1)
        self.prefix, self.index = prefix, start_index
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.on_shard = on_shard
        self.completed: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None  # the .tar.tmp being written, until it is renamed into place
        self._writing = False

    def _open(self) -> None:
        self._name = f"{self.prefix}-{self.index:06d}.tar"
        self._tmp = self.folder / (self._name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._hasher = _HashingWriter(self._file)
        # plain "w" mode writes each member through at once (stream mode would hold 10 KiB back)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.USTAR_FORMAT)
        self._samples, self._buckets = 0, Counter()
        self._rows: list[IndexRow] = []

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Add one sample: `tensors` maps a group ('latents', 'cond') to named tensors; `meta` is its JSON."""
        assert set(tensors) <= set(TENSOR_GROUPS), tensors.keys()
        members = [(f"{key}.{group}.safetensors", tensors_to_bytes(named)) for group, named in tensors.items()]
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))  # last: marks the sample whole
        if self._tar is None:
            self._open()
        self._writing = True  # an interrupt between here and the end leaves a half-written sample
        begin = self._hasher.size
        for name, data in members:
            self._add(name, data)
            kill_point("sample-member")
        self._writing = False
        bucket = bucket_name(*meta["bucket"])
        self._rows.append(IndexRow(key, meta.get("video_key", ""), meta.get("text_key", ""), bucket, begin,
                                   self._hasher.size, meta.get("image_key", "")))
        self._samples += 1
        self._buckets[bucket] += 1
        if self._samples >= self.max_samples or self._hasher.size >= self.max_bytes:
            self.finish_shard()

    def discard(self) -> tuple[int, int] | None:
        """Drop the shard being written (a write failed: disk full), freeing its space; returns its (bytes,
        samples), or None when none was open. Errors closing it are ignored: its bytes are being thrown away."""
        if self._tmp is None:  # none open (or the last one was renamed into place)
            return None
        if self._tar is not None:
            self._tar.closed = True  # nothing more may be written to it
        try:
            self._file.close()
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)
        self._tar, self._tmp, self._writing = None, None, False
        return self._hasher.size, self._samples

    def finish_shard(self) -> ShardInfo | None:
        """Close the shard being written (if any), write its index, rename it into place and report it."""
        if self._tar is None:
            return None
        if self._writing:  # interrupted inside a sample: the tar's end is damaged, so the shard is not kept
            self.discard()
            return None
        tar, self._tar = self._tar, None  # an interrupt from here on must not close it twice
        tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        kill_point("shard-written")
        info = ShardInfo(self._name, self._samples, self._hasher.size, self._hasher.sha.hexdigest(),
                         dict(sorted(self._buckets.items())), self._hasher.xxh3.hexdigest())
        write_index_file(self.folder / self._name, info, self._rows)
        os.replace(self.folder / (self._name + ".tmp"), self.folder / self._name)
        self._tmp = None
        kill_point("shard-renamed")  # an unlisted whole shard: the next run adopts it
        self.index += 1
        self.completed.append(info)
        if self.on_shard:
            self.on_shard(info)
        return info

"""Building a set's index (`set_index.bin`; its format and its readers are set_index.py) in flat memory.

One pass over the shards' `.idx` files (or their tar headers) writes the per-row columns with `pwrite`, a batch of
rows at a time, and counts the rows by the first byte of their key. What needs the keys sorted (the `active` flag
of each row, the set fingerprint over the sorted keys of the training view, the groups of rows sharing a key) is
then done one key range at a time: the first-byte counts cut the key space into consecutive ranges of at most
`RANGE_ROWS` rows; the training view's keys (as 16-byte digests) and every row's key and number (one read of the
key column with `pread`: nothing is mapped, so no page of the index counts in the builder's memory) are spilled
into a file per range; then each range is finished alone, its view keys and its rows sorted. The ranges are taken
in key order, so the fingerprint hashes the keys in the order one sort of them all gives, and the index is byte
for byte what a sort of everything in memory wrote. Memory is one range's keys and a byte a row (the `active`
column, written last), not the 16 bytes a key of the whole view (160 MB at ten million samples) and the 8 bytes a
row of a global sort; the spill files (about 40 bytes a row) live in a folder named after the new index, beside it.

A set whose keys are not ft's 32-hex-character digests (written by hand, in tests) is indexed with its keys' text
(`ascii` columns), and its training view is read into a set of strings: such sets are small.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import MANIFEST_NAME, Manifest
from .reader import IndexRow, ShardCorruptError, shard_rows
from .set_index import (
    DATA_START,
    FORMAT,
    INDEX_NAME,
    KEY_COLUMNS,
    MAGIC,
    VERSION,
    active_files,
    bytes_to_hex,
    hex_to_bytes,
    source_id,
)
from .writer import kill_point

RANGE_ROWS = 1 << 18  # rows a key range holds at most (a first byte's rows may be more): about 20 MB of transients
CHUNK_ROWS = 1 << 18  # rows of a column read back at once
BATCH_ROWS = 1 << 14  # rows of the shards' indexes encoded into the columns at once
_HEX_CHARS = np.zeros(256, bool)
_HEX_CHARS[np.frombuffer(b"0123456789abcdef", np.uint8)] = True


class _NotHex(Exception):
    """A key that is not 32 lowercase hex characters: the set is indexed with `ascii` keys instead."""


def _hex_words(words: list[bytes], allow_empty: bool = False) -> np.ndarray | None:
    """(n, 16) uint8 digests of `words` when each is 32 lowercase hex characters (or empty, when allowed); else
    None. Checked with numpy, not a regular expression a word."""
    raw = np.array(words, dtype="S") if words else np.empty(0, "S32")
    if raw.dtype.itemsize > 32:
        return None
    raw = raw.astype("S32")
    chars = raw.view(np.uint8).reshape(len(raw), 32)
    ok = _HEX_CHARS[chars].all(axis=1)
    if allow_empty:
        ok |= ~chars.any(axis=1)
    return hex_to_bytes(raw) if ok.all() else None


def _encode(values: list[str], encoding: str, width: int) -> np.ndarray:
    """Keys -> (n, width) uint8 rows in the column's encoding."""
    if encoding == "hex":
        digests = _hex_words([v.encode() for v in values], allow_empty=True)
        if digests is None:
            raise _NotHex
        return digests
    raw = np.array([v.encode() for v in values], dtype=f"S{width}")
    return raw.view(np.uint8).reshape(len(values), width)


def _shard_rows(folder: Path, manifest: Manifest, first: int = 0) -> Iterable[tuple[int, list[IndexRow]]]:
    for i, info in enumerate(manifest.shards[first:], first):
        rows = shard_rows(folder / info.name, info)
        if len(rows) != info.samples:
            raise ShardCorruptError(f"{folder / info.name}: {len(rows)} samples on disk, {info.samples} in the "
                                    "manifest; the shard is damaged. Delete it and rerun `ft precompute` with the "
                                    "same --out to rebuild it.")
        yield i, rows


class PreviousIndex:
    """The index a merge replaces, when it describes the last merged manifest (`base`): the new index copies its
    rows of the shards the new manifest keeps at its start (a rerun's merge lists the old shards first) instead
    of reading their `.idx` files again. Opened (and kept open, by descriptor) before the merge rewrites the
    training view that its `source` covers: a reader that rebuilds the index meanwhile replaces the file, not these
    bytes. Read with `pread`, never mapped (mapped pages would count in the merge's memory)."""

    def __init__(self, fd: int, header: dict[str, Any], base: Manifest):
        self.fd, self.header = fd, header
        self.base = {s.name: (s.sha256, s.samples) for s in base.shards}

    @classmethod
    def open(cls, folder: Path, base: Manifest | None) -> PreviousIndex | None:
        """`folder`'s index when it is sound, of hex keys, and describes `base`; else None (built from the
        `.idx` files)."""
        if base is None:
            return None
        try:
            fd = os.open(folder / INDEX_NAME, os.O_RDONLY)
        except OSError:
            return None
        try:
            head = os.pread(fd, 24, 0)
            offset, length = np.frombuffer(head, "<u8", 2, 8).tolist()
            header = json.loads(os.pread(fd, length, offset))
            if (head[:8] != MAGIC or (header["format"], header["version"]) != (FORMAT, VERSION)
                    or any(header["columns"][c]["encoding"] != "hex" for c in KEY_COLUMNS)
                    or header["source"] != source_id(base, folder)):
                raise ValueError("another index")
        except Exception:  # missing, torn, of another set or format: any damage means a build from the shards
            os.close(fd)
            return None
        return cls(fd, header, base)

    def close(self) -> None:
        os.close(self.fd)

    def kept(self, manifest: Manifest) -> int:
        """How many of `manifest`'s first shards this index holds as they are (same name, digest and count)."""
        count = 0
        for name, info in zip(self.header["shards"], manifest.shards, strict=False):
            if info.name != name or self.base.get(name) != (info.sha256, info.samples):
                break
            count += 1
        return count

    def chunks(self, rows: int, buckets: list[str]) -> Iterable[dict[str, np.ndarray]]:
        """Its first `rows` rows' columns (keys, bucket renumbered to `buckets`, byte spans), a chunk at a time."""
        new_id = {b: i for i, b in enumerate(buckets)}
        renumber = np.array([new_id.get(b, 0) for b in self.header["buckets"]] or [0], np.int64)
        for start in range(0, rows, CHUNK_ROWS):
            count = min(CHUNK_ROWS, rows - start)
            out = {}
            for name in (*KEY_COLUMNS, "bucket", "begin", "end"):
                spec = self.header["columns"][name]
                dtype, shape = np.dtype(spec["dtype"]), tuple(spec.get("shape", ()))
                size = dtype.itemsize * int(np.prod(shape or (1,)))
                raw = os.pread(self.fd, count * size, spec["offset"] + start * size)
                out[name] = np.frombuffer(raw, dtype).reshape(count, *shape)
            out["bucket"] = renumber[out["bucket"]]
            yield out


class _Columns:
    """The columns of a new index file, written with `pwrite` a batch of rows at a time (never mapped while written:
    dirty mapped pages would count in the building process's memory) and read back in chunks; `first_bytes`
    counts the rows by the first byte of their key."""

    def __init__(self, fd: int, layout: dict[str, dict[str, Any]], n: int):
        self.fd, self.layout, self.n = fd, layout, n
        self.rows = 0
        self.first_bytes = np.zeros(256, np.int64)

    def _dtype(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        spec = self.layout[name]
        return np.dtype(spec["dtype"]), tuple(spec.get("shape", ()))

    def _row_bytes(self, name: str) -> int:
        dtype, shape = self._dtype(name)
        return dtype.itemsize * int(np.prod(shape or (1,)))

    def add(self, values: dict[str, np.ndarray]) -> None:
        """The next rows, a column's values each."""
        for name, value in values.items():
            self.write(name, self.rows, value)
        self.first_bytes += np.bincount(values["key"][:, 0], minlength=256)
        self.rows += len(values["key"])

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        dtype, _ = self._dtype(name)
        os.pwrite(self.fd, values.astype(dtype, copy=False).tobytes(),
                  self.layout[name]["offset"] + start * self._row_bytes(name))

    def chunks(self, name: str, size: int = CHUNK_ROWS) -> Iterable[tuple[int, np.ndarray]]:
        dtype, shape = self._dtype(name)
        for start in range(0, self.n, size):
            count = min(size, self.n - start)
            raw = os.pread(self.fd, count * self._row_bytes(name),
                           self.layout[name]["offset"] + start * self._row_bytes(name))
            yield start, np.frombuffer(raw, dtype).reshape(count, *shape)


def _key_ranges(first_bytes: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive first-byte ranges [lo, hi) covering 0-255, each of at most RANGE_ROWS rows (one byte's rows
    may be more: ft's keys are digests, spread evenly over the bytes)."""
    ranges, lo, held = [], 0, 0
    for byte in range(256):
        if held and held + first_bytes[byte] > RANGE_ROWS:
            ranges.append((lo, byte))
            lo, held = byte, 0
        held += int(first_bytes[byte])
    ranges.append((lo, 256))
    return ranges


class _Spill:
    """Files of one key range each, appended to a batch at a time (the batch grouped by range first)."""

    def __init__(self, folder: Path, name: str, ranges: list[tuple[int, int]]):
        self.which = np.zeros(256, np.intp)
        for i, (lo, hi) in enumerate(ranges):
            self.which[lo:hi] = i
        self.paths = [folder / f"{name}-{i:05d}" for i in range(len(ranges))]
        self.files = [open(p, "wb") for p in self.paths]

    def add(self, first_bytes: np.ndarray, records: np.ndarray) -> None:
        part = self.which[first_bytes]
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(self.paths) + 1))
        records = records[order]
        for i in np.flatnonzero(np.diff(bounds)).tolist():
            self.files[i].write(records[bounds[i]: bounds[i + 1]].tobytes())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def take(self, i: int, dtype: np.dtype | str) -> np.ndarray:
        """Range i's records (the file is deleted)."""
        records = np.fromfile(self.paths[i], dtype)
        self.paths[i].unlink()
        return records


def _spill_view(folder: Path, files: list[str], ranges: list[tuple[int, int]], spill: Path) -> _Spill | None:
    """The training view's keys as 16-byte digests in a file per key range, read a megabyte of keys at a time;
    None when a key is not one of ft's hex digests (the view is then read as text)."""
    out = _Spill(spill, "view", ranges)
    try:
        for name in files:
            with open(folder / name, "rb") as f:
                while block := f.read(1 << 20):
                    digests = _hex_words((block + f.readline()).split())
                    if digests is None:
                        return None
                    out.add(digests[:, 0], digests.view("S16").ravel())
    finally:
        out.close()
    return out


def _spill_rows(cols: _Columns, ranges: list[tuple[int, int]], spill: Path) -> tuple[_Spill, np.dtype]:
    """Every row's key and number in a file per key range: one read of the key column, a chunk at a time."""
    width = cols.layout["key"]["shape"][0]
    record = np.dtype([("key", f"S{width}"), ("row", "<i8")])
    out = _Spill(spill, "rows", ranges)
    try:
        for start, keys in cols.chunks("key"):
            records = np.empty(len(keys), record)
            records["key"] = np.ascontiguousarray(keys).view(f"S{width}").ravel()
            records["row"] = np.arange(start, start + len(keys))
            out.add(keys[:, 0], records)
    finally:
        out.close()
    return out, record


def _text_view(folder: Path, files: list[str]) -> list[str]:
    keys: set[str] = set()
    for name in files:
        keys.update((folder / name).read_text().split())
    return sorted(keys)


def _range_rows(rows: _Spill, i: int, record: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Range i's rows sorted by key (the rows of one key in row order): (their row numbers, their keys as
    fixed-width bytes, which sort as the key strings do)."""
    found = rows.take(i, record)
    order = np.argsort(found["key"], kind="stable")
    return found["row"][order], found["key"][order]


def _repeats(rows: np.ndarray, keys: np.ndarray) -> list[list[int]]:
    """Groups of rows sharing a key (rare: one media under two names that two jobs encoded), of sorted keys."""
    same = np.flatnonzero(keys[1:] == keys[:-1])
    groups: dict[bytes, list[int]] = {}
    for i in same.tolist():
        group = groups.setdefault(keys[i], [int(rows[i])])
        group.append(int(rows[i + 1]))
    return [sorted(g) for g in groups.values()]


class _Finish:
    """What the sorted keys give, a key range at a time: each row's `active` flag, the fingerprint, the number of
    distinct view keys and the groups of rows sharing a key."""

    def __init__(self, manifest: Manifest, n: int, has_view: bool):
        self.fingerprint = hashlib.sha256()
        for shard in sorted(manifest.shards, key=lambda s: s.name):
            self.fingerprint.update(f"{shard.name}:{shard.sha256}\n".encode())
        self.active = np.zeros(n, np.uint8) if has_view else np.ones(n, np.uint8)
        self.view_keys = 0
        self.duplicates: list[list[int]] = []

    def hex_view(self, digests: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> None:
        """A range's view keys (16-byte digests, any order, maybe repeated: an unmerged view) against its rows."""
        digests.sort()
        if len(digests) > 1:
            digests = digests[np.concatenate([[True], digests[1:] != digests[:-1]])]
        self.view_keys += len(digests)
        for start in range(0, len(digests), 1 << 16):
            part = digests[start: start + (1 << 16)].view(np.uint8).reshape(-1, 16)
            self.fingerprint.update(bytes_to_hex(part).tobytes())
        if len(digests) and len(rows):
            at = np.searchsorted(digests, keys).clip(0, len(digests) - 1)
            self.active[rows] = digests[at] == keys

    def text_view(self, view: list[str], cols: _Columns) -> None:
        """A view of keys that are not all hex digests: a set of strings against every row."""
        for key in view:
            self.fingerprint.update(key.encode())
        self.view_keys = len(view)
        wanted, encoding = set(view), cols.layout["key"]["encoding"]
        for start, keys in cols.chunks("key"):
            text = (bytes_to_hex(keys).view("S32").ravel().tolist() if encoding == "hex"
                    else [bytes(r).rstrip(b"\0") for r in keys])
            self.active[start: start + len(keys)] = [t.decode("utf-8", "replace") in wanted for t in text]


def _finish(folder: Path, manifest: Manifest, cols: _Columns, spill: Path) -> _Finish:
    files = active_files(manifest)
    done = _Finish(manifest, cols.n, bool(files))
    ranges = _key_ranges(cols.first_bytes)
    hexes = cols.layout["key"]["encoding"] == "hex"
    view = _spill_view(folder, files, ranges, spill) if files and hexes else None
    if files and view is None:
        done.text_view(_text_view(folder, files), cols)
    rows, record = _spill_rows(cols, ranges, spill)
    kill_point("set-index-spilled")
    for i in range(len(ranges)):
        numbers, keys = _range_rows(rows, i, record)
        done.duplicates += _repeats(numbers, keys)
        if view is not None:
            done.hex_view(view.take(i, "S16"), numbers, keys)
        del numbers, keys
    done.duplicates.sort()
    return done


def spill_folder(target: Path) -> Path:
    """Where the build of `target` spills (`<target>.spill`, beside it): named after it, so that what a killed build
    leaves is found with its partial index (set_index.py `_remove_leftovers`)."""
    return target.with_name(target.name + ".spill")


def build_set_index(folder: Path, manifest: Manifest, target: Path, previous: PreviousIndex | None = None,
                    shard_columns: Iterable[dict[str, np.ndarray]] | None = None) -> None:
    """Write the index of `manifest`'s shards to `target` (a new file): the rows `previous` holds copied, a pass
    over the other shards' `.idx` files (or tar headers), each shard's rows written straight into the columns, then
    the sorted work a key range at a time (spill files in `spill_folder(target)`). A caller that holds the rows
    already (a bench's synthetic set) gives `shard_columns` instead: per shard, in the manifest's order, its
    columns as the index stores them (the key columns as 16-byte hex digests, bucket ids into the sorted buckets of
    the manifest, byte spans)."""
    if shard_columns is not None:
        _build(folder, manifest, target, "hex", {c: 16 for c in KEY_COLUMNS}, shard_columns=shard_columns)
        return
    try:
        _build(folder, manifest, target, "hex", {c: 16 for c in KEY_COLUMNS}, previous)
    except _NotHex:  # keys that are not ft's digests (sets written by hand, tests): their text, NUL-padded
        widths = dict.fromkeys(KEY_COLUMNS, 1)
        for _, rows in _shard_rows(folder, manifest):
            for row in rows:
                for c in KEY_COLUMNS:
                    widths[c] = max(widths[c], len(getattr(row, c).encode()))
        _build(folder, manifest, target, "ascii", widths)


def _layout(n: int, encoding: str, widths: dict[str, int], bucket_type: type) -> tuple[dict[str, Any], int]:
    """Each column's dtype, shape and offset; the offset where the JSON header goes."""
    layout: dict[str, dict[str, Any]] = {}
    offset = DATA_START
    specs = [*((c, "u1", (widths[c],)) for c in KEY_COLUMNS), ("bucket", np.dtype(bucket_type).str, ()),
             ("begin", "<i8", ()), ("end", "<i8", ()), ("active", "u1", ())]
    for name, dtype, shape in specs:
        layout[name] = {"dtype": dtype, "offset": offset, **({"shape": list(shape)} if shape else {}),
                        **({"encoding": encoding} if name in KEY_COLUMNS else {})}
        offset += -(-n * np.dtype(dtype).itemsize * int(np.prod(shape or (1,))) // 64) * 64
    return layout, offset


def _build(folder: Path, manifest: Manifest, target: Path, encoding: str, widths: dict[str, int],
           previous: PreviousIndex | None = None,
           shard_columns: Iterable[dict[str, np.ndarray]] | None = None) -> None:
    n = manifest.num_samples
    buckets = sorted({b for s in manifest.shards for b in s.buckets})
    bucket_type = np.uint8 if len(buckets) < 255 else np.uint16  # the largest value is never an id: train/plan.py
    layout, offset = _layout(n, encoding, widths, bucket_type)
    bucket_id = {b: i for i, b in enumerate(buckets)}
    starts = [0]
    pending: dict[str, list[Any]] = {name: [] for name in IndexRow._fields}

    def encode() -> None:  # a batch of rows' fields into the columns: numpy's work is per batch, not per shard
        unknown = set(pending["bucket"]) - bucket_id.keys()
        if unknown:  # a bucket the manifest's histogram lacks (a hand-edited manifest)
            raise ShardCorruptError(f"{folder}: a sample of bucket {min(unknown)} is not in {MANIFEST_NAME}'s "
                                    "histogram of its shard; rerun `ft precompute` with the same --out.")
        cols.add({**{c: _encode(pending[c], encoding, widths[c]) for c in KEY_COLUMNS},
                  "bucket": np.array([bucket_id[b] for b in pending["bucket"]]),
                  "begin": np.array(pending["begin"], np.int64), "end": np.array(pending["end"], np.int64)})
        for values in pending.values():
            values.clear()

    with open(target, "w+b") as f:
        f.truncate(offset)
        cols = _Columns(f.fileno(), layout, n)
        for columns in shard_columns or ():
            starts.append(starts[-1] + len(columns["bucket"]))
            if len(columns["bucket"]):
                cols.add(columns)
        kept = previous.kept(manifest) if previous is not None else 0
        if shard_columns is not None:
            assert starts[-1] == n, f"{starts[-1]} rows for the manifest's {n} samples"
        elif kept:
            starts = list(previous.header["shard_start"][: kept + 1])
            for values in previous.chunks(starts[-1], buckets):
                cols.add(values)
        for _, rows in _shard_rows(folder, manifest, kept) if shard_columns is None else ():
            starts.append(starts[-1] + len(rows))
            for name, values in zip(IndexRow._fields, zip(*rows, strict=True), strict=False):
                pending[name].extend(values)
            if len(pending["key"]) >= BATCH_ROWS:
                encode()
        if pending["key"]:
            encode()
        spill = spill_folder(target)
        shutil.rmtree(spill, ignore_errors=True)  # a killed build's, under the same name
        spill.mkdir()
        try:
            done = _finish(folder, manifest, cols, spill)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        cols.write("active", 0, done.active)
        header = {"format": FORMAT, "version": VERSION, "samples": n, "shards": [s.name for s in manifest.shards],
                  "shard_start": starts, "buckets": buckets, "source": source_id(manifest, folder),
                  "fingerprint": done.fingerprint.hexdigest()[:16],
                  "active_keys": done.view_keys if active_files(manifest) else None,
                  "columns": layout, "duplicates": done.duplicates}
        blob = json.dumps(header, separators=(",", ":")).encode()
        f.seek(offset)
        f.write(blob)
        f.seek(0)
        f.write(MAGIC + np.array([offset, len(blob)], "<u8").tobytes())
        f.flush()
        os.fsync(f.fileno())

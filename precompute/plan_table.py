"""A job's up-front plan as fixed-width columns, and the sorted 16-byte digests that find duplicates in it.

A rerun into a set that holds shards plans every item before it encodes (planning.py `JobPlan.up_front`). Held as
a `PlannedSample` per item, with its `DatasetItem`, the plan cost about 1.2 KB per row of the dataset (1.5 GB at a
million rows). Here each planned sample is a row of numpy columns (`PlanTable`): the item's position among the
job's items, its four keys (16 bytes each) and its bucket's index, 70 bytes a sample. The items are planned a
chunk at a time (datasets.iter_dataset) and each chunk's objects are dropped once its samples are keyed; the
encode loop plans the rows it encodes again from the dataset, a chunk at a time (`JobPlan.replan`; a media-cache
hit is a stat and some arithmetic).

Duplicates (two rows naming the same file with the same caption; two samples with the same key) are found by
sorting 16-byte digests (`first_rows`), and the keys a set already holds are a `KeySet` (sorted runs of 16-byte
keys), not Python sets of objects. A key is ordered and searched by its first 8 bytes as an unsigned integer
(numpy searches integers ten times faster than bytes), with the last 8 compared where the first are equal.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ft.common.shards import bucket_name

KEY = np.dtype("V16")  # a key or digest: its 16 bytes
NO_KEY = bytes(16)  # the image key of a text-to-video sample (it has none)
KEY_BLOCK = 1 << 16  # keys turned into text at once


def as_keys(keys: Iterable[bytes]) -> np.ndarray:
    """16-byte keys (b"" for none) as a KEY column."""
    data = b"".join(k or NO_KEY for k in keys)
    return np.frombuffer(data, dtype=KEY).copy() if data else np.empty(0, dtype=KEY)


def hex_keys(keys: np.ndarray) -> list[str]:
    """A KEY column as the 32 hex characters the files name keys by."""
    data = keys.tobytes()
    return [data[i: i + 16].hex() for i in range(0, len(data), 16)]


def from_hex(keys: Iterable[str]) -> np.ndarray:
    return as_keys(bytes.fromhex(k) for k in keys)


def row_digest(path: str, caption: str) -> bytes:
    """What names a dataset row for its duplicates: its absolute media path and its caption."""
    return hashlib.blake2b(f"{path}\0{caption}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _halves(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = keys.view(">u8").reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def sort_keys(keys: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """The order that sorts a KEY column (then `tiebreak`, where given) as bytes: an integer sort of the first 8
    bytes, and a sort of all 16 only where two keys share those."""
    hi, lo = _halves(keys)
    if tiebreak is None:
        order = np.argsort(hi)
        if not (hi[order][1:] == hi[order][:-1]).any():
            return order
    return np.lexsort((lo, hi) if tiebreak is None else (tiebreak, lo, hi))


def first_rows(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each key, the lowest row among the keys equal to it (its own row when it is the first). Only the keys
    whose first 8 bytes meet another's are sorted in full: with no duplicate, one integer sort."""
    hi, lo = _halves(keys)
    firsts = rows.copy()
    order = np.argsort(hi, kind="stable")
    same = hi[order][1:] == hi[order][:-1]
    if not same.any():
        return firsts
    near = np.zeros(len(order), dtype=bool)
    near[1:] |= same
    near[:-1] |= same
    idx = order[near]
    idx = idx[np.lexsort((rows[idx], lo[idx], hi[idx]))]
    sorted_keys = keys[idx]
    start = np.ones(len(idx), dtype=bool)
    start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_first = idx[np.maximum.accumulate(np.where(start, np.arange(len(idx)), 0))]
    firsts[idx] = rows[group_first]
    return firsts


def _distinct(ordered: np.ndarray) -> np.ndarray:
    """A sorted KEY column without its repeats."""
    if len(ordered) < 2:
        return ordered
    return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])]


class KeySet:
    """16-byte keys, added a batch at a time and asked about a batch at a time (`mask`): sorted runs merged as a
    binary counter merges its digits, so adding n keys costs O(n log n) and a question one search per run."""

    def __init__(self, keys: np.ndarray | None = None):
        self.runs: list[np.ndarray] = []
        self._hi: list[np.ndarray] = []
        if keys is not None:
            self.add(keys)

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    def add(self, keys: np.ndarray) -> None:
        keys = keys[~self.mask(keys)]  # held already: not again (a key is in one run at most)
        run = _distinct(keys[sort_keys(keys)])
        while self.runs and len(self.runs[-1]) <= len(run):
            merged = np.concatenate([self.runs.pop(), run])
            run = _distinct(merged[sort_keys(merged)])
        if len(run):
            self.runs.append(run)

    def mask(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` are in the set (searched in sorted order: each search starts where the last ended)."""
        found = np.zeros(len(keys), dtype=bool)
        if not self.runs or not len(keys):
            return found
        order = sort_keys(keys)
        wanted = keys[order]
        hi = np.ascontiguousarray(_halves(wanted)[0])
        hit = np.zeros(len(keys), dtype=bool)
        for run, run_hi in zip(self.runs, self._his(), strict=True):
            left = np.searchsorted(run_hi, hi, "left")
            span = np.searchsorted(run_hi, hi, "right") - left
            one = span == 1
            hit[one] |= run[left[one]] == wanted[one]
            for i in np.flatnonzero(span > 1):  # first 8 bytes shared by several keys: compare each
                hit[i] |= bool((run[left[i]: left[i] + span[i]] == wanted[i]).any())
        found[order] = hit
        return found

    def _his(self) -> list[np.ndarray]:
        """Each run's first 8 bytes as integers, contiguous (kept while the runs do not change)."""
        if len(self._hi) != len(self.runs) or any(len(a) != len(b) for a, b in zip(self._hi, self.runs,
                                                                                    strict=False)):
            self._hi = [np.ascontiguousarray(_halves(run)[0]) for run in self.runs]
        return self._hi

    def __contains__(self, key: bytes) -> bool:
        return bool(self.mask(as_keys([key]))[0])


@dataclass
class PlanTable:
    """The planned samples of a job, a row each, in the order of the job's items: `rows` (the item's position among
    the job's items, ascending), the sample's `key` and its halves' keys (KEY columns; an all-zero image key for a
    text-to-video sample) and `bucket` (an index into `buckets`)."""

    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    key: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=KEY))
    video_key: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=KEY))
    text_key: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=KEY))
    image_key: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=KEY))
    bucket: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int16))
    buckets: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, mask: np.ndarray) -> PlanTable:
        return PlanTable(self.rows[mask], self.key[mask], self.video_key[mask], self.text_key[mask],
                         self.image_key[mask], self.bucket[mask], self.buckets)

    def counts(self, mask: np.ndarray | None = None) -> dict[str, int]:
        """Samples per bucket name (of the rows `mask` selects), as the state and the summary write them."""
        chosen = self.bucket if mask is None else self.bucket[mask]
        found = np.bincount(chosen, minlength=len(self.buckets)) if len(chosen) else []
        return dict(sorted(Counter({bucket_name(*b): int(n) for b, n in zip(self.buckets, found, strict=False)
                                    if n}).items()))


class PlanColumns:
    """A `PlanTable` filled a chunk of planned samples at a time (`add`), in columns made once for at most
    `capacity` samples (the job's items): no array per chunk outlives its chunk, so the memory the chunks' objects
    used is free for the next chunk's."""

    def __init__(self, capacity: int) -> None:
        self.table_ = PlanTable(np.empty(capacity, dtype=np.int64), *(np.empty(capacity, dtype=KEY) for _ in range(4)),
                                np.empty(capacity, dtype=np.int16))
        self.size = 0
        self.bucket_index: dict[tuple[int, int, int], int] = {}

    def add(self, rows: list[int], planned: list) -> None:
        """`planned` (keyed PlannedSamples) and the rows of their items."""
        if not planned:
            return
        t, at, end = self.table_, self.size, self.size + len(planned)
        t.rows[at:end] = rows
        t.key[at:end] = as_keys(p.key_bytes for p in planned)
        t.video_key[at:end] = as_keys(p.video_key_bytes for p in planned)
        t.text_key[at:end] = as_keys(p.text_key_bytes for p in planned)
        t.image_key[at:end] = as_keys(p.image_key_bytes for p in planned)
        t.bucket[at:end] = [self.bucket_index.setdefault(p.bucket, len(self.bucket_index)) for p in planned]
        self.size = end

    def table(self) -> PlanTable:
        n, t = self.size, self.table_
        return PlanTable(t.rows[:n], t.key[:n], t.video_key[:n], t.text_key[:n], t.image_key[:n], t.bucket[:n],
                         list(self.bucket_index))


def write_keys(path: Path, keys: np.ndarray) -> None:
    """A KEY column as lines of hex keys (the job state's active file), written a block at a time, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for start in range(0, len(keys), KEY_BLOCK):
            f.write("".join(k + "\n" for k in hex_keys(keys[start: start + KEY_BLOCK])))
    os.replace(tmp, path)

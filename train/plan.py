"""The plan of one pass over a shard set, streamed with numpy from the set's mapped index (common/shards/
set_index.py): the same order the per-sample Python planner gave, without a Python object per sample and without
holding the pass.

The order is defined by that planner, kept as the reference in tests/train/test_plan.py:

1. the shard names, sorted, shuffled by `random.Random(mix_seed(seed, epoch, "shards"))`;
2. each shard's usable samples in file order (in the training view; a key met again later in the pass skipped);
3. a shuffle buffer of `shuffle_buffer` samples fed in that order: once full, each arrival pops the sample at
   `rng.randrange(len(buffer))` (`rng = random.Random(mix_seed(seed, epoch, "buffer"))`), and what is left at the
   end is `rng.shuffle`d and appended;
4. samples of one bucket collected, in that order, into step batches of `global_batch`; a batch is emitted when
   it fills; a bucket's remainder is dropped.

Here step 1 stays Python (the shard ids in their names' sorted order, shuffled: a shuffle moves places, not
values); step 2 is a numpy gather per shard (`Arrivals`); step 3, the one
sequential part, draws its random numbers with numpy from the same Mersenne Twister state (`randrange(n)` is
`getrandbits(n.bit_length())` redrawn until below n, and `getrandbits(k)` for k <= 32 is the top k bits of one
32-bit output), so only the buffer's pops run as a Python loop over integers (`ShuffleBuffer`); step 4 cuts each
chunk of that order into batches (`Batcher`). Which samples a bucket keeps needs no order: it is the bucket's
usable samples rounded down to whole batches (`EpochPlan.full`, one numpy pass over the index's bucket column).

Steps 2-4 run as one cursor over the pass (`PassStream`), a chunk of `CHUNK` samples at a time, as its batches
are consumed: a pass holds chunk-sized transients, the buffer and the buckets' partial batches, never its order.
A cursor can be copied (`PassStream.copy`): a resume replays the stream once to its position, keeping a copy of
the cursor there. What a rank reads of a pass is kept as one bit an index row (`RowSet`). A pass reads the index's
bucket and view columns once (each sample carries its bucket id through the buffer), a page at a time, and releases
their pages as it goes (`SetIndex.scattered`, `SetIndex.release`): they stay in the page cache, shared by the
node's processes, and a process holds a chunk's worth of them, not 20 MB at 10M rows.
"""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ft.common.shards.set_index import SetIndex

CHUNK = 1 << 14  # samples per step of the buffer loop and of the batches: bounds a pass's transients
BUCKET_BITS = 16  # a sample in the buffer is `row << BUCKET_BITS | bucket id` (ids are uint8 or uint16)
BLOCK = 1 << 18  # rows per step of a pass over the whole index (the buckets' sizes)


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: independent streams for (seed, epoch, purpose)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _numpy_twister(rng: random.Random) -> np.random.MT19937:
    state = rng.getstate()[1]
    twister = np.random.MT19937()
    twister.state = {"bit_generator": "MT19937", "state": {"key": np.array(state[:-1], np.uint32),
                                                            "pos": state[-1]}}
    return twister


def _set_python_state(rng: random.Random, twister: np.random.MT19937) -> None:
    s = twister.state["state"]
    rng.setstate((3, (*s["key"].tolist(), int(s["pos"])), None))


def _skipped(index: SetIndex, shards: list[int] | np.ndarray) -> np.ndarray:
    """The rows of keys met earlier in this pass (a sample on disk twice): all but the first copy in pass order."""
    if not index.duplicates:
        return np.zeros(0, np.int64)
    position = np.empty(len(index.shards), np.int64)
    position[shards] = np.arange(len(shards))
    drop = []
    for group in index.duplicates:
        rows = np.asarray(group, np.int64)
        shard_of = np.searchsorted(index.shard_start, rows, "right") - 1
        first = rows[np.lexsort((rows, position[shard_of]))[0]]
        drop.extend(r for r in group if r != first)
    return np.asarray(sorted(drop), np.int64)


def bucket_sizes(index: SetIndex, skipped: np.ndarray) -> np.ndarray:
    """The usable samples of each bucket id (active, each key once): a pass over the bucket and view columns."""
    sizes = np.zeros(int(np.iinfo(index.bucket.dtype).max) + 1, np.int64)
    for start in range(0, index.samples, BLOCK):
        buckets = index.bucket[start: start + BLOCK]
        sizes += np.bincount(buckets[index.active[start: start + BLOCK] != 0], minlength=len(sizes))
        index.release("bucket", "active")  # their pages stay in the page cache, shared; this process holds a block
    if len(skipped):
        sizes -= np.bincount(index.bucket[skipped][index.active[skipped] != 0], minlength=len(sizes))
    return sizes


class Arrivals:
    """Step 2 as a cursor: the pass's usable rows in arrival order (active; each key once, at its first place in
    the pass), `take`n a few at a time, read a chunk of shards ahead; each carries its bucket id
    (`row << BUCKET_BITS | bucket`), so later steps never go back to the index. The pages of the bucket and view
    columns it reads, scattered, are released after each chunk (`SetIndex.release`; read one page at a time,
    `SetIndex.scattered`, not the 64 KB the kernel maps about a read by default: a chunk's 64 shards would map up
    to 8 MB)."""

    def __init__(self, index: SetIndex, shards: np.ndarray, skipped: np.ndarray):
        self.index, self.shards, self.skipped = index, shards, skipped
        index.scattered("bucket", "active")
        self.next_shard = 0
        self.carry: list[int] = []

    def take(self, k: int) -> list[int]:
        while len(self.carry) < k:
            self.carry += self._read_ahead()
        got, self.carry = self.carry[:k], self.carry[k:]
        return got

    def _read_ahead(self) -> list[int]:
        index, parts, held = self.index, [], 0
        while held < CHUNK and self.next_shard < len(self.shards):
            s = int(self.shards[self.next_shard])
            self.next_shard += 1
            a, b = int(index.shard_start[s]), int(index.shard_start[s + 1])
            at = np.flatnonzero(index.active[a:b])
            if len(self.skipped):
                at = at[~np.isin(at + a, self.skipped)]
            parts.append((at + a) << BUCKET_BITS | index.bucket[a:b][at])
            held += len(at)
        assert parts, "the pass has fewer usable rows than counted"
        index.release("bucket", "active")
        return np.concatenate(parts).tolist()

    def copy(self) -> Arrivals:
        other = copy.copy(self)
        other.carry = list(self.carry)
        return other


class ShuffleBuffer:
    """Step 3 as a cursor: the order samples leave a shuffle buffer of `size` fed with `count` arrivals, a chunk
    of `CHUNK` pops at a time (`next`), then what is left, shuffled; None once the pass is out."""

    def __init__(self, arrivals: Arrivals, count: int, seed: int, size: int):
        self.size = max(size, 1)
        self.pops_left = max(0, count - self.size + 1)
        self.rng = random.Random(seed)
        self.twister = _numpy_twister(self.rng)
        self.arrivals = arrivals
        self.buffer = arrivals.take(min(count, self.size - 1))
        self.emptied = False

    def next(self) -> np.ndarray | None:
        if self.pops_left:
            k = min(CHUNK, self.pops_left)
            draws, came = self._randrange(k), self.arrivals.take(k)
            pop, append = self.buffer.pop, self.buffer.append
            self.pops_left -= k
            return np.array([pop(j) for a, j in zip(came, draws, strict=True) if not append(a)], np.int64)
        if self.emptied:
            return None
        self.emptied = True
        _set_python_state(self.rng, self.twister)
        self.rng.shuffle(self.buffer)
        left, self.buffer = self.buffer, []
        return np.array(left, np.int64)

    def _randrange(self, k: int) -> list[int]:
        """`k` values of `rng.randrange(size)`, leaving the twister exactly where those calls would."""
        n, twister = self.size, self.twister
        shift, parts = 32 - n.bit_length(), []
        while k:
            before = twister.state
            raw = twister.random_raw(int(k * (1 << n.bit_length()) / n * 1.05) + 64) >> shift
            accepted = np.flatnonzero(raw < n)
            if len(accepted) >= k:  # draw again exactly what the calls consumed
                twister.state = before
                twister.random_raw(int(accepted[k - 1]) + 1)
                accepted = accepted[:k]
            parts.append(raw[accepted])
            k -= len(accepted)
        return np.concatenate(parts).tolist()

    def copy(self) -> ShuffleBuffer:
        other = copy.copy(self)
        other.arrivals, other.buffer = self.arrivals.copy(), list(self.buffer)
        other.twister = np.random.MT19937()
        other.twister.state = self.twister.state
        other.rng = random.Random()
        other.rng.setstate(self.rng.getstate())
        return other


class Batcher:
    """Step 4 as a cursor: a chunk of the order in (`row << BUCKET_BITS | bucket`), the step batches it completes
    out, as (k, global_batch) rows in the order they fill. A bucket's rows are collected in its own order; a batch
    is out when its last sample arrives; a bucket's samples past `full` (its remainder) are dropped."""

    def __init__(self, full: np.ndarray, global_batch: int):
        self.full, self.global_batch = full, global_batch
        self.seen = np.zeros(len(full), np.int64)
        self.pending: dict[int, np.ndarray] = {}

    def add(self, samples: np.ndarray) -> np.ndarray:
        g, ids, part = self.global_batch, samples & ((1 << BUCKET_BITS) - 1), samples >> BUCKET_BITS
        ends, rows = [], []
        for b in np.unique(ids).tolist():
            at = np.flatnonzero(ids == b)
            count = self.seen[b] + np.arange(1, len(at) + 1)  # each sample's place in its bucket, from 1
            self.seen[b] += len(at)
            kept = count <= self.full[b]
            if not kept.any():
                continue
            filled = at[kept & (count % g == 0)]
            values = np.concatenate([self.pending.pop(b, part[:0]), part[at[kept]]])
            cut = len(filled) * g
            if len(values) > cut:
                self.pending[b] = values[cut:]
            if len(filled):
                ends.append(filled)
                rows.append(values[:cut].reshape(-1, g))
        if not ends:
            return np.zeros((0, g), part.dtype)
        return np.concatenate(rows)[np.argsort(np.concatenate(ends), kind="stable")]

    def copy(self) -> Batcher:
        other = copy.copy(self)
        other.seen, other.pending = self.seen.copy(), dict(self.pending)  # the arrays are never written in place
        return other


class PassStream:
    """Steps 2-4 as one cursor over a pass's step batches: `next()` gives the batches the next chunk of the order
    completes ((k, global_batch) index rows, k may be 0), None at the end of the pass; `made` counts the batches
    given so far; `copy()` is an independent cursor at the same place."""

    def __init__(self, buffer: ShuffleBuffer, batcher: Batcher):
        self.buffer, self.batcher, self.made = buffer, batcher, 0

    def next(self) -> np.ndarray | None:
        part = self.buffer.next()
        if part is None:
            return None
        batches = self.batcher.add(part)
        self.made += len(batches)
        return batches

    def copy(self) -> PassStream:
        other = PassStream(self.buffer.copy(), self.batcher.copy())
        other.made = self.made
        return other


@dataclass
class EpochPlan:
    """One pass: the shards in reading order (names), what it keeps of each bucket (`full`) and its count of
    step batches; the batches themselves are streamed (`stream`, `chunks`), never held."""

    index: SetIndex
    shards: list[str]  # names, in reading order
    shard_ids: np.ndarray  # the same shards by their id in the index
    buffer_seed: int
    shuffle_buffer: int
    global_batch: int
    skipped: np.ndarray  # rows of a key met earlier in the pass
    usable: np.ndarray  # per bucket id: its samples in the pass

    @property
    def full(self) -> np.ndarray:
        """Per bucket id: the samples that go into batches (its usable samples, whole batches of them)."""
        return self.usable // self.global_batch * self.global_batch

    @property
    def count(self) -> int:
        """The step batches in the pass."""
        return int((self.usable // self.global_batch).sum())

    def stream(self) -> PassStream:
        """A cursor at the start of the pass."""
        index = self.index
        arrivals = Arrivals(index, self.shard_ids, self.skipped)
        buffer = ShuffleBuffer(arrivals, int(self.usable.sum()), self.buffer_seed, self.shuffle_buffer)
        return PassStream(buffer, Batcher(self.full, self.global_batch))

    def chunks(self, skip: int = 0, stream: PassStream | None = None) -> Iterator[np.ndarray]:
        """The step batches after the pass's first `skip`, as (k, global_batch) arrays of index rows, computed as
        they are consumed, from `stream` (a cursor at or before batch `skip`; the pass's start by default)."""
        stream = stream or self.stream()
        while (batches := stream.next()) is not None:
            if stream.made > skip:
                yield batches[max(0, skip - (stream.made - len(batches))):]

    @property
    def batches(self) -> np.ndarray:
        """Every step batch at once, (count, global_batch): for tests and small sets."""
        parts = list(self.chunks())
        return np.concatenate(parts) if parts else np.zeros((0, self.global_batch), np.int64)


class RowSet:
    """A set of index rows as one bit a row (1.25 MB at 10M rows): the rows a rank reads of a pass."""

    def __init__(self, rows: int):
        self.bits = np.zeros((rows + 7) // 8, np.uint8)

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        np.bitwise_or.at(self.bits, rows >> 3, np.left_shift(1, rows & 7).astype(np.uint8))

    def holds_any(self, start: int, stop: int) -> bool:
        """Whether a row in start..stop-1 is in the set."""
        return len(self.within(start, stop)) > 0

    def within(self, start: int, stop: int) -> np.ndarray:
        """The set's rows in start..stop-1, ascending."""
        low = start >> 3
        found = np.flatnonzero(np.unpackbits(self.bits[low: (stop + 7) >> 3], bitorder="little")) + low * 8
        return found[(found >= start) & (found < stop)]


def plan_epoch(index: SetIndex, seed: int, epoch: int, global_batch: int, shuffle_buffer: int) -> EpochPlan:
    """The shard order and what the pass keeps, a pure function of its arguments; its batches are streamed."""
    order = sorted(range(len(index.shards)), key=index.shards.__getitem__)  # the shard ids, their names sorted
    random.Random(mix_seed(seed, epoch, "shards")).shuffle(order)  # as the names: a shuffle moves places, not values
    skipped = _skipped(index, order)
    names = [index.shards[s] for s in order]
    return EpochPlan(index, names, np.array(order, np.int64), mix_seed(seed, epoch, "buffer"), shuffle_buffer,
                     global_batch, skipped, bucket_sizes(index, skipped))


class Replay:
    """The step batches of a pass after its first `skip`, run twice for one replay of the stream up to `skip`:
    `first()` runs the stream from the pass's start, keeping a copy of the cursor at the last chunk boundary at or
    before `skip`; `again()`, after it, gives the same batches from that copy."""

    def __init__(self, plan: EpochPlan, skip: int):
        self.plan, self.skip = plan, skip
        self.cursor: PassStream | None = None

    def first(self) -> Iterator[np.ndarray]:
        stream = self.plan.stream()
        while True:
            if stream.made <= self.skip:
                self.cursor = stream.copy()
            batches = stream.next()
            if batches is None:
                return
            if stream.made > self.skip:
                yield batches[max(0, self.skip - (stream.made - len(batches))):]

    def again(self) -> Iterator[np.ndarray]:
        assert self.cursor is not None, "again() follows first()"
        cursor, self.cursor = self.cursor, None
        return self.plan.chunks(self.skip, cursor)

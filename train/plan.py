"""The plan of one pass over a shard set, computed with numpy from the set's mapped index (common/shards/
set_index.py): the same order the per-sample Python planner gave, without a Python object per sample.

The order is defined by that planner, kept as the reference in tests/train/test_plan.py:

1. the shard names, sorted, shuffled by `random.Random(mix_seed(seed, epoch, "shards"))`;
2. each shard's usable samples in file order (in the training view; a key met again later in the pass skipped);
3. a shuffle buffer of `shuffle_buffer` samples fed in that order: once full, each arrival pops the sample at
   `rng.randrange(len(buffer))` (`rng = random.Random(mix_seed(seed, epoch, "buffer"))`), and what is left at the
   end is `rng.shuffle`d and appended;
4. samples of one bucket collected, in that order, into step batches of `global_batch`; a batch is emitted when
   it fills; a bucket's remainder is dropped.

Here step 1 stays Python (a shuffle of names), step 2 is a numpy gather per shard, streamed in chunks, step 3,
the one sequential part, draws its random numbers with numpy from the same Mersenne Twister state
(`randrange(n)` is `getrandbits(n.bit_length())` redrawn until below n, and `getrandbits(k)` for k <= 32 is the
top k bits of one 32-bit output), so only the buffer's pops run as a Python loop over integers, a chunk at a time,
and step 4 is made from step 3's order a chunk at a time whenever the batches are walked (`EpochPlan.chunks`).
What a pass holds is that order: 4 bytes a sample (int32 index rows), plus chunk-sized transients.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ft.common.shards.set_index import SetIndex

CHUNK = 1 << 14  # samples per step of the buffer loop and of the chunked passes: bounds their transients


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: independent streams for (seed, epoch, purpose)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class EpochPlan:
    """One pass: the shards in reading order (names), the order samples leave the shuffle buffer (index rows, 4
    bytes a sample: all the plan holds), and the step batches made from it a chunk at a time (`chunks`)."""

    shards: list[str]
    order: np.ndarray
    bucket: np.ndarray
    global_batch: int
    count: int  # step batches in the pass

    def chunks(self, skip: int = 0) -> Iterator[np.ndarray]:
        """The step batches after the first `skip`, as (k, global_batch) arrays of index rows."""
        return step_batches(self.order, self.bucket, self.global_batch, skip)

    @property
    def batches(self) -> np.ndarray:
        """Every step batch at once, (count, global_batch): for tests and small sets."""
        parts = list(self.chunks())
        return np.concatenate(parts) if parts else np.zeros((0, self.global_batch), self.order.dtype)


def _numpy_twister(rng: random.Random) -> np.random.MT19937:
    state = rng.getstate()[1]
    twister = np.random.MT19937()
    twister.state = {"bit_generator": "MT19937", "state": {"key": np.array(state[:-1], np.uint32),
                                                            "pos": state[-1]}}
    return twister


def _set_python_state(rng: random.Random, twister: np.random.MT19937) -> None:
    s = twister.state["state"]
    rng.setstate((3, (*s["key"].tolist(), int(s["pos"])), None))


def _randrange_draws(rng: random.Random, n: int, count: int) -> Iterator[np.ndarray]:
    """`count` values of `rng.randrange(n)`, in chunks, leaving `rng` exactly where those calls would."""
    twister = _numpy_twister(rng)
    shift = 32 - n.bit_length()
    left = count
    while left:
        before = twister.state
        raw = twister.random_raw(int(min(left, CHUNK) * (1 << n.bit_length()) / n * 1.05) + 64) >> shift
        accepted = np.flatnonzero(raw < n)
        if len(accepted) >= left:  # draw again exactly what the calls consumed
            used = int(accepted[left - 1]) + 1
            twister.state = before
            twister.random_raw(used)
            accepted = accepted[:left]
        yield raw[accepted].astype(np.int64)
        left -= len(accepted)
    _set_python_state(rng, twister)


def _skipped(index: SetIndex, shards: list[int]) -> np.ndarray:
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


def usable_rows(index: SetIndex, shards: list[int]) -> Iterator[np.ndarray]:
    """Step 2: the rows of the pass in arrival order (active; each key once, at its first place in the pass), a
    chunk of shards at a time."""
    skipped = _skipped(index, shards)
    active, parts, held = index.active, [], 0
    dtype = np.int32 if index.samples < (1 << 31) else np.int64
    for s in shards:
        a, b = int(index.shard_start[s]), int(index.shard_start[s + 1])
        rows = (np.flatnonzero(active[a:b]) + a).astype(dtype)
        if len(skipped):
            rows = rows[~np.isin(rows, skipped)]
        parts.append(rows)
        held += len(rows)
        if held >= CHUNK:
            yield np.concatenate(parts)
            parts, held = [], 0
    if parts:
        yield np.concatenate(parts)


def usable_count(index: SetIndex, shards: list[int]) -> int:
    return int(np.count_nonzero(index.active)) - int(np.count_nonzero(index.active[_skipped(index, shards)]))


def shuffle_buffer_order(arrivals: Iterator[np.ndarray], count: int, rng: random.Random, size: int) -> np.ndarray:
    """Step 3: the order samples leave a shuffle buffer of `size` fed with `count` `arrivals` (chunks)."""
    size = max(size, 1)
    pops = max(0, count - size + 1)
    out = np.empty(count, np.int32 if count < (1 << 31) else np.int64)
    buffer: list[int] = []
    carry: list[int] = []  # arrivals read ahead of the pops

    def take(k: int) -> list[int]:
        nonlocal carry
        while len(carry) < k:
            carry += next(arrivals).tolist()
        got, carry = carry[:k], carry[k:]
        return got

    buffer = take(min(count, size - 1))
    pop, append = buffer.pop, buffer.append
    done = 0
    for draws in _randrange_draws(rng, size, pops):
        for start in range(0, len(draws), CHUNK):
            js = draws[start: start + CHUNK].tolist()
            came = take(len(js))
            out[done: done + len(js)] = [pop(j) for a, j in zip(came, js, strict=True) if not append(a)]
            done += len(js)
    rng.shuffle(buffer)
    out[pops:] = buffer
    return out


def step_batches(order: np.ndarray, bucket: np.ndarray, global_batch: int, skip: int = 0) -> Iterator[np.ndarray]:
    """Step 4: the step batches, as (k, global_batch) arrays of rows in the order they fill, a chunk of `order` at a
    time, after the first `skip` batches (whose rows are not made). A bucket's rows are collected in its own
    order; a batch is out when its last sample arrives; what a bucket cannot fill is dropped."""
    sizes = np.zeros(int(np.iinfo(bucket.dtype).max) + 1, np.int64)
    for start in range(0, len(order), CHUNK):
        sizes += np.bincount(bucket[order[start: start + CHUNK]], minlength=len(sizes))
    full = sizes // global_batch * global_batch
    seen = np.zeros(len(sizes), np.int64)
    pending: dict[int, np.ndarray] = {}
    made = 0
    for start in range(0, len(order), CHUNK):
        part = order[start: start + CHUNK]
        ids = bucket[part]
        ends, rows = [], []
        for b in np.unique(ids).tolist():
            at = np.flatnonzero(ids == b)
            count = seen[b] + np.arange(1, len(at) + 1)  # each sample's place in its bucket, from 1
            seen[b] += len(at)
            kept = count <= full[b]
            if not kept.any():
                continue
            filled = at[kept & (count % global_batch == 0)]
            values = np.concatenate([pending.pop(b, part[:0]), part[at[kept]]])
            cut = len(filled) * global_batch
            if len(values) > cut:
                pending[b] = values[cut:]
            if len(filled):
                ends.append(filled)
                rows.append(values[:cut].reshape(-1, global_batch))
        if not ends:
            continue
        batches = np.concatenate(rows)[np.argsort(np.concatenate(ends), kind="stable")]
        if made + len(batches) > skip:
            yield batches[max(0, skip - made):]
        made += len(batches)


def batch_count(order: np.ndarray, bucket: np.ndarray, global_batch: int) -> int:
    sizes = np.zeros(int(np.iinfo(bucket.dtype).max) + 1, np.int64)
    for start in range(0, len(order), CHUNK):
        sizes += np.bincount(bucket[order[start: start + CHUNK]], minlength=len(sizes))
    return int((sizes // global_batch).sum())


def plan_epoch(index: SetIndex, seed: int, epoch: int, global_batch: int, shuffle_buffer: int) -> EpochPlan:
    """The shard order and the step batches of one pass: a pure function of its arguments."""
    names = sorted(index.shards)
    random.Random(mix_seed(seed, epoch, "shards")).shuffle(names)
    shards = [index.shard_id[n] for n in names]
    rng = random.Random(mix_seed(seed, epoch, "buffer"))
    order = shuffle_buffer_order(usable_rows(index, shards), usable_count(index, shards), rng, shuffle_buffer)
    return EpochPlan(names, order, index.bucket, global_batch, batch_count(order, index.bucket, global_batch))

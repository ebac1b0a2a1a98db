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

Here step 1 stays Python (a shuffle of names), step 2 is a numpy gather per shard, step 4 a sort, and step 3,
the one sequential part, draws its random numbers with numpy from the same Mersenne Twister state
(`randrange(n)` is `getrandbits(n.bit_length())` redrawn until below n, and `getrandbits(k)` for k <= 32 is the
top k bits of one 32-bit output), so only the buffer's pops run as a Python loop over integers, a chunk at a time.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ft.common.shards.set_index import SetIndex

CHUNK = 1 << 16  # samples per step of the buffer loop and of the chunked passes: bounds their transients


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: independent streams for (seed, epoch, purpose)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class EpochPlan:
    """One pass: the shards in reading order (names) and the step batches as an (n, global_batch) array of
    index rows."""

    shards: list[str]
    batches: np.ndarray


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


def usable_rows(index: SetIndex, shards: list[int]) -> np.ndarray:
    """Step 2: the rows of the pass in arrival order (active; each key once, at its first place in the pass)."""
    skipped = np.zeros(0, np.int64)
    if index.duplicates:
        position = np.empty(len(index.shards), np.int64)
        position[shards] = np.arange(len(shards))
        drop = []
        for group in index.duplicates:
            rows = np.asarray(group, np.int64)
            shard_of = np.searchsorted(index.shard_start, rows, "right") - 1
            first = rows[np.lexsort((rows, position[shard_of]))[0]]
            drop.extend(r for r in group if r != first)
        skipped = np.asarray(sorted(drop), np.int64)
    active = index.active
    parts = []
    for s in shards:
        a, b = int(index.shard_start[s]), int(index.shard_start[s + 1])
        rows = np.flatnonzero(active[a:b]) + a
        if len(skipped):
            rows = rows[~np.isin(rows, skipped)]
        parts.append(rows.astype(np.int32 if index.samples < (1 << 31) else np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def shuffle_buffer_order(arrivals: np.ndarray, rng: random.Random, size: int) -> np.ndarray:
    """Step 3: the order samples leave a shuffle buffer of `size` fed with `arrivals`."""
    size = max(size, 1)
    m = len(arrivals)
    pops = max(0, m - size + 1)
    out = np.empty(m, arrivals.dtype)
    buffer = arrivals[: min(m, size - 1)].tolist()
    pop, append = buffer.pop, buffer.append
    done = 0
    for draws in _randrange_draws(rng, size, pops):
        for start in range(0, len(draws), CHUNK):
            js = draws[start: start + CHUNK].tolist()
            came = arrivals[size - 1 + done: size - 1 + done + len(js)].tolist()
            out[done: done + len(js)] = [pop(j) for a, j in zip(came, js, strict=True) if not append(a)]
            done += len(js)
    rng.shuffle(buffer)
    out[pops:] = buffer
    return out


def step_batches(handed: list[np.ndarray], bucket: np.ndarray, global_batch: int) -> np.ndarray:
    """Step 4: the step batches, (n, global_batch) rows, in the order they fill. A bucket's batches fill in its own
    order, so the plan is each bucket's rows cut into batches, dealt out to the places where that bucket completes
    a batch. Two chunked passes over `order`; held at once: a byte a sample (where batches complete), each bucket's
    rows and the plan (4 bytes a sample each). The order is handed over in a list, taken out of it and freed
    before the plan is made."""
    order = handed.pop()
    chunks = [(start, order[start: start + CHUNK]) for start in range(0, len(order), CHUNK)]
    sizes = np.zeros(int(np.iinfo(bucket.dtype).max) + 1, np.int64)
    for _, part in chunks:
        sizes += np.bincount(bucket[part], minlength=len(sizes))
    full = sizes // global_batch * global_batch
    sentinel = len(sizes) - 1  # bucket ids stop short of it (set_index.py picks the dtype with room)
    completes = np.full(len(order), sentinel, bucket.dtype)  # the bucket whose batch fills at each place
    seen = np.zeros(len(sizes), np.int64)
    rows: dict[int, list[np.ndarray]] = {}
    for start, part in chunks:
        ids = bucket[part]
        for b in np.unique(ids).tolist():
            at = np.flatnonzero(ids == b)
            count = seen[b] + np.arange(1, len(at) + 1)  # each sample's place in its bucket, from 1
            seen[b] += len(at)
            kept = count <= full[b]
            if kept.any():
                rows.setdefault(b, []).append(part[at[kept]])
                completes[start + at[kept & (count % global_batch == 0)]] = b
    dtype = order.dtype
    del chunks, order
    sequence = completes[completes != sentinel]
    del completes
    plan = np.empty((len(sequence), global_batch), dtype)
    for b, parts in rows.items():
        plan[sequence == b] = np.concatenate(parts).reshape(-1, global_batch)
        parts.clear()
    return plan


def plan_epoch(index: SetIndex, seed: int, epoch: int, global_batch: int, shuffle_buffer: int) -> EpochPlan:
    """The shard order and the step batches of one pass: a pure function of its arguments."""
    names = sorted(index.shards)
    random.Random(mix_seed(seed, epoch, "shards")).shuffle(names)
    rng = random.Random(mix_seed(seed, epoch, "buffer"))
    order = [shuffle_buffer_order(usable_rows(index, [index.shard_id[n] for n in names]), rng, shuffle_buffer)]
    return EpochPlan(names, step_batches(order, index.bucket, global_batch))

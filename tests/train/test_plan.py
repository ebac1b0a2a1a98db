"""The numpy plan (train/plan.py) orders a pass exactly as the per-sample Python planner did: that planner is kept
here, verbatim, as the reference; both run on sets with several buckets, a training view that leaves samples out,
a sample on disk twice, remainders, several seeds, epochs, buffer sizes and data-parallel splits."""

from __future__ import annotations

import random
import shutil
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ft.common.shards import Manifest, ShardWriter, load_manifest, parse_bucket, shard_rows
from ft.common.shards.set_index import INDEX_NAME, SetIndex
from ft.train.loader import SetStream, ShardSet, mix_seed, plan_epoch


@dataclass(frozen=True)
class Entry:
    shard: str
    key: str
    bucket: tuple[int, ...]


def reference_index(shard_set: ShardSet) -> dict[str, list[Entry]]:
    """What `ShardSet.index()` gave: shard -> its active samples in file order."""
    active = shard_set.manifest.active_keys(shard_set.folder)
    return {s.name: [Entry(s.name, r.key, parse_bucket(r.bucket)) for r in shard_rows(shard_set.folder / s.name, s)
                     if active is None or r.key in active] for s in shard_set.manifest.shards}


def reference_plan(index: dict[str, list[Entry]], seed: int, epoch: int, global_batch: int, shuffle_buffer: int
                   ) -> tuple[list[str], list[list[Entry]]]:
    """The Python planner the numpy one replaced (train/loader.py before the whole-set index)."""
    shards = sorted(index)
    random.Random(mix_seed(seed, epoch, "shards")).shuffle(shards)
    rng = random.Random(mix_seed(seed, epoch, "buffer"))
    seen: set[str] = set()
    buffer: list[Entry] = []
    pending: dict[tuple, list[Entry]] = defaultdict(list)
    batches: list[list[Entry]] = []

    def take(entry: Entry) -> None:
        pending[entry.bucket].append(entry)
        if len(pending[entry.bucket]) == global_batch:
            batches.append(pending.pop(entry.bucket))

    for shard in shards:
        for entry in index[shard]:
            if entry.key in seen:
                continue
            seen.add(entry.key)
            buffer.append(entry)
            if len(buffer) >= shuffle_buffer:
                take(buffer.pop(rng.randrange(len(buffer))))
    rng.shuffle(buffer)
    for entry in buffer:
        take(entry)
    return shards, batches


def as_entries(shard_set: ShardSet, batches: np.ndarray) -> list[list[Entry]]:
    index = shard_set.index
    shard_of = np.searchsorted(index.shard_start, batches.ravel(), "right") - 1
    keys = index.keys(batches.ravel())
    flat = [Entry(index.shards[s], k, parse_bucket(index.buckets[index.bucket[r]]))
            for s, k, r in zip(shard_of.tolist(), keys, batches.ravel().tolist(), strict=True)]
    g = batches.shape[1]
    return [flat[i:i + g] for i in range(0, len(flat), g)]


def write_set(folder, n, buckets, shard_samples, hex_keys=True):
    writer = ShardWriter(folder, max_samples=shard_samples)
    for i in range(n):
        bucket = buckets[(i * 7 + i // 3) % len(buckets)]
        key = f"{i * 2654435761 % (1 << 64):032x}" if hex_keys else f"s{i:04d}"
        writer.write(key, {"latents": {"mean": torch.full((1, 1, 1, 1), float(i))}},
                     {"bucket": list(bucket), "caption": f"clip {i}", "video_key": f"{i + 1:032x}"})
    writer.finish_shard()
    Manifest("cogvideox", {}, "", {}, {"latent_channels": 1}, shards=writer.completed).save(folder)
    return folder


@pytest.fixture(scope="module", params=["hex", "ascii"])
def sets(request, tmp_path_factory):
    """A plain set; the same with a training view that leaves a sixth out; and one with a shard on disk twice."""
    root = tmp_path_factory.mktemp(request.param)
    buckets = ((1, 8, 8), (1, 8, 16), (3, 8, 8))
    plain = write_set(root / "plain", 157, buckets, 9, hex_keys=request.param == "hex")
    view = root / "view"
    shutil.copytree(plain, view)
    manifest = load_manifest(view)
    keys = [r.key for s in manifest.shards for r in shard_rows(view / s.name, s)]
    kept = [k for i, k in enumerate(keys) if i % 6]
    (view / "active_keys.txt").write_text("".join(k + "\n" for k in [*kept, "f" * 32]))  # one not encoded yet
    manifest.active = {"keys_file": "active_keys.txt", "samples": len(kept), "buckets": {}}
    manifest.save(view)
    twice = root / "twice"
    shutil.copytree(plain, twice)
    manifest = load_manifest(twice)
    shutil.copy(twice / manifest.shards[3].name, twice / "shard-000099.tar")
    manifest.shards.append(type(manifest.shards[3])(**{**vars(manifest.shards[3]), "name": "shard-000099.tar"}))
    manifest.save(twice)
    return [ShardSet(plain), ShardSet(view), ShardSet(twice)]


@pytest.mark.parametrize("seed,epoch", [(0, 0), (1, 0), (1, 3), (12345, 1)])
@pytest.mark.parametrize("global_batch,buffer", [(1, 4), (2, 256), (4, 16), (3, 1), (5, 0), (8, 1000)])
def test_the_numpy_plan_is_the_python_plans_order(sets, seed, epoch, global_batch, buffer):
    for shard_set in sets:
        plan = plan_epoch(shard_set.index, seed, epoch, global_batch, buffer)
        shards, batches = reference_plan(reference_index(shard_set), seed, epoch, global_batch, buffer)
        assert plan.shards == shards
        assert as_entries(shard_set, plan.batches) == batches
        assert len(batches) > 0


def test_remainders_are_dropped_as_before(sets):
    """A global batch that leaves a partial batch in every bucket, and one that divides a bucket exactly."""
    shard_set = sets[0]
    sizes = np.bincount(shard_set.index.bucket)
    for g in (7, int(sizes[0]), int(sizes.max()) + 1):
        plan = plan_epoch(shard_set.index, 3, 0, g, 32)
        assert as_entries(shard_set, plan.batches) == reference_plan(reference_index(shard_set), 3, 0, g, 32)[1]
        assert len(plan.batches) == sum(int(n) // g for n in sizes)


@pytest.mark.parametrize("world,batch,accumulation", [(2, 1, 1), (2, 2, 2), (4, 1, 3)])
def test_every_rank_takes_the_slices_the_python_split_gave(sets, world, batch, accumulation):
    shard_set = sets[1]
    g = world * batch * accumulation
    _, reference = reference_plan(reference_index(shard_set), 5, 2, g, 16)
    for rank in range(world):
        stream = SetStream(shard_set, 0, 5, batch, rank=rank, world=world, shuffle_buffer=16,
                           accumulation=accumulation)
        mine = stream.mine(stream.plan(2).batches)
        want = [[e.key for m in range(accumulation)
                 for e in step[(m * world + rank) * batch:(m * world + rank + 1) * batch]] for step in reference]
        assert [shard_set.index.keys(row) for row in mine] == want


def test_the_index_is_saved_once_and_holds_the_fingerprint_and_spans(sets, tmp_path):
    shard_set = sets[1]
    index = shard_set.index
    assert (shard_set.folder / INDEX_NAME).is_file() and index.path == shard_set.folder / INDEX_NAME
    again = ShardSet(shard_set.folder).index
    assert again.header == index.header
    active = sorted(shard_set.manifest.active_keys(shard_set.folder))
    import hashlib

    h = hashlib.sha256()
    for s in sorted(shard_set.manifest.shards, key=lambda s: s.name):
        h.update(f"{s.name}:{s.sha256}\n".encode())
    for key in active:
        h.update(key.encode())
    assert index.fingerprint == h.hexdigest()[:16] and index.active_keys == len(active)
    for shard_id, info in enumerate(shard_set.manifest.shards):
        assert index.index_rows(shard_id) == shard_rows(shard_set.folder / info.name, info)
    assert sets[2].index.duplicates and all(len(g) == 2 for g in sets[2].index.duplicates)
    bad = tmp_path / INDEX_NAME
    bad.write_bytes(b"not an index")
    with pytest.raises(ValueError):
        SetIndex(bad)

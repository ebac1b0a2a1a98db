"""The training data order: a pure function of (seed, epoch, shard set), split by rank, resumable at a saved
position without decoding tensors, mixable across shard sets."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from ft.common.errors import UserError
from ft.common.shards import Manifest, ShardWriter, load_manifest
from ft.train import loader
from ft.train import plan as plan_module
from ft.train.loader import DataStream, SetStream, ShardSet, eval_batches, parse_shard_arg, plan_epoch
from ft.train.plan import Replay, RowSet


def make_set(folder, n=23, buckets=((1, 8, 8), (1, 8, 16)), shard_samples=5, family="cogvideox", channels=2):
    writer = ShardWriter(folder, max_samples=shard_samples)
    for i in range(n):
        bucket = buckets[i % len(buckets)]
        writer.write(f"{folder.name}{i:03d}", {"latents": {"mean": torch.full((channels, *bucket), float(i))},
                                               "cond": {"prompt_embeds": torch.zeros(4, 2)}},
                     {"bucket": list(bucket), "caption": f"clip {i}"})
    writer.finish_shard()
    Manifest(family, {}, "", {}, {"latent_channels": channels}, shards=writer.completed).save(folder)
    return folder


@pytest.fixture
def shard_set(tmp_path):
    return make_set(tmp_path / "a")


def keys_of(steps):
    """Each optimizer step's keys, micro-batch after micro-batch."""
    return [[k for b in step for k in b.keys] for step in steps]


def test_the_plan_is_a_pure_function_of_seed_epoch_and_shards(shard_set):
    index = ShardSet(shard_set).index

    def plan(seed, epoch):
        p = plan_epoch(index, seed, epoch, 2, 4)
        return p.shards, p.batches.tolist()

    assert plan(1, 0) == plan(1, 0)
    assert plan(1, 0) != plan(1, 1)
    assert plan(1, 0) != plan(2, 0)
    batches = plan_epoch(index, 1, 0, 2, 4).batches
    keys = index.keys(batches.ravel())
    assert len(keys) == len(set(keys)) == 22  # 12 + 11 samples per bucket; one remainder dropped
    assert all(len(set(index.bucket[b].tolist())) == 1 for b in batches)


def test_two_ranks_split_the_global_batch(shard_set):
    s = ShardSet(shard_set)
    whole = keys_of(itertools.islice(SetStream(s, 0, 7, batch_size=4).batches(), 12))
    ranks = [keys_of(itertools.islice(SetStream(s, 0, 7, batch_size=2, rank=r, world=2).batches(), 12))
             for r in (0, 1)]
    for full, a, b in zip(whole, *ranks, strict=True):
        assert not set(a) & set(b)
        assert a + b == full


@pytest.mark.parametrize("batch,world,accumulation", [(1, 2, 1), (1, 1, 2), (1, 2, 2), (2, 2, 1), (1, 4, 1)])
def test_every_split_of_the_samples_per_step_trains_on_the_same_samples_at_each_step(shard_set, batch, world,
                                                                                    accumulation):
    # the plan is of optimizer steps: 1 process x batch 4 and any split of 4 samples per step see the same samples
    samples = batch * world * accumulation
    whole = keys_of(itertools.islice(SetStream(ShardSet(shard_set), 0, 7, batch_size=samples).batches(), 12))
    ranks = [list(itertools.islice(SetStream(ShardSet(shard_set), 0, 7, batch_size=batch, rank=r, world=world,
                                             accumulation=accumulation).batches(), 12)) for r in range(world)]
    for step, full in enumerate(whole):
        parts = [ranks[r][step] for r in range(world)]
        assert all(len(p) == accumulation and all(len(b.keys) == batch for b in p) for p in parts)
        seen = [k for p in parts for b in p for k in b.keys]
        assert len(seen) == len(set(seen)) and set(seen) == set(full)
        # micro-batch m of rank r is slice (m * world + r) of the step batch
        assert [k for m in range(accumulation) for r in range(world) for k in parts[r][m].keys] == full
        assert all(b.position == parts[0][-1].position for p in parts for b in p)


def test_resuming_at_a_position_continues_the_straight_stream_across_epochs(shard_set, monkeypatch):
    s = ShardSet(shard_set)
    stream = DataStream([s], seed=3, batch_size=2)
    straight = [step for (step,) in itertools.islice(stream.batches(), 30)]  # 11 per epoch: crosses two epochs
    assert {b.epoch for b in straight} == {0, 1, 2}
    decoded, opened = [], []
    real_iter_shard = loader.iter_shard

    def recording(*args, **kwargs):
        opened.append(args[0].name)
        for sample in real_iter_shard(*args, **kwargs):
            decoded.append(sample.key)
            yield sample

    monkeypatch.setattr(loader, "iter_shard", recording)
    resumed_set = ShardSet(shard_set)  # a new process: nothing verified yet
    position = straight[14].position
    resumed = [step for (step,) in itertools.islice(DataStream([resumed_set], seed=3, batch_size=2).batches(
        position), 15)]
    assert [b.keys for b in resumed] == [b.keys for b in straight[15:]]
    for a, b in zip(resumed, straight[15:], strict=True):
        assert torch.equal(a.latents["mean"], b.latents["mean"]) and a.position == b.position
    # fast-forward decoded no tensors of the batches it skipped: in epoch 1 only the rest of the epoch is decoded
    rest_of_epoch = {k for b in straight[15:22] for k in b.keys}
    assert set(decoded[: len(rest_of_epoch)]) == rest_of_epoch
    # a shard holding nothing of what is left of the epoch is not opened, not even to verify it
    opened.clear()
    (last,) = next(DataStream([ShardSet(shard_set)], seed=3, batch_size=2).batches(straight[9].position))
    assert last.keys == straight[10].keys and len(opened) <= 2 < len(resumed_set.index.shards)


def test_the_streamed_plan_resumes_on_the_same_batch_whatever_its_chunks(tmp_path, monkeypatch):
    """The pass is streamed a chunk of the order at a time (train/plan.py): chunks of 3 samples give the batches
    one chunk gives, a replay to any batch continues exactly there (its copied cursor mid-chunk or on a chunk's
    edge), and a resumed stream reads the same samples as the straight one."""
    folder = make_set(tmp_path / "c", n=61, buckets=((1, 8, 8), (1, 8, 16), (1, 16, 8)), shard_samples=4)
    index = ShardSet(folder).index
    whole = plan_epoch(index, 5, 1, 2, 4).batches
    monkeypatch.setattr(plan_module, "CHUNK", 3)
    plan = plan_epoch(index, 5, 1, 2, 4)
    assert plan.batches.tolist() == whole.tolist() and plan.count == len(whole) > 20
    for skip in range(plan.count + 1):
        replay = Replay(plan, skip)
        first = [b for chunk in replay.first() for b in chunk.tolist()]
        assert first == whole[skip:].tolist()
        assert [b for chunk in replay.again() for b in chunk.tolist()] == first
    stream = DataStream([ShardSet(folder)], seed=5, batch_size=1, world=2, rank=1)
    straight = [step for (step,) in itertools.islice(stream.batches(), 70)]  # crosses epochs
    for at in (0, 1, 7, 8, 20, 40):
        resumed = DataStream([ShardSet(folder)], seed=5, batch_size=1, world=2, rank=1).batches(
            straight[at].position)
        assert [b.keys for (b,) in itertools.islice(resumed, 10)] == [b.keys for b in straight[at + 1: at + 11]]


def test_the_rows_a_rank_reads_are_kept_as_bits():
    rng = np.random.default_rng(0)
    rows = np.unique(rng.integers(0, 1000, 300))
    kept = RowSet(1000)
    kept.add(rng.permutation(rows))
    mask = np.zeros(1000, bool)
    mask[rows] = True
    for start, stop in [(0, 1000), (3, 17), (8, 16), (999, 1000), (5, 5), *rng.integers(0, 1000, (20, 2)).tolist()]:
        assert kept.within(start, stop).tolist() == (np.flatnonzero(mask[start:stop]) + start).tolist()


def test_a_sample_on_disk_twice_is_used_once_per_pass(tmp_path):
    folder = make_set(tmp_path / "d", n=8, buckets=((1, 8, 8),))
    shutil.copy(folder / "shard-000000.tar", folder / "shard-000009.tar")
    manifest = load_manifest(folder)
    manifest.shards.append(type(manifest.shards[0])(**{**vars(manifest.shards[0]), "name": "shard-000009.tar"}))
    manifest.save(folder)
    index = ShardSet(folder).index
    keys = index.keys(plan_epoch(index, 0, 0, 1, 4).batches.ravel())
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 8


def test_mixing_shard_sets_follows_the_weights(tmp_path):
    a, b = make_set(tmp_path / "a"), make_set(tmp_path / "b", n=30)
    stream = DataStream([ShardSet(a), ShardSet(b, 0.25)], seed=0, batch_size=1)
    batches = list(itertools.islice(stream.batches(), 400))
    share_b = sum(x[0].set_index for x in batches) / len(batches)
    assert 0.12 < share_b < 0.28  # 0.25 / 1.25 = 0.2
    again = list(itertools.islice(DataStream([ShardSet(a), ShardSet(b, 0.25)], 0, 1).batches(), 400))
    assert keys_of(batches) == keys_of(again)
    resumed = list(itertools.islice(DataStream([ShardSet(a), ShardSet(b, 0.25)], 0, 1).batches(
        batches[199][0].position), 200))
    assert keys_of(resumed) == keys_of(batches[200:])


def test_mixing_refuses_another_family_or_shape(tmp_path):
    from ft.train.loader import check_compatible

    a = ShardSet(make_set(tmp_path / "a"))
    with pytest.raises(UserError, match="only shard sets of one family"):
        check_compatible([a, ShardSet(make_set(tmp_path / "b", family="ltx_video"))])
    with pytest.raises(UserError, match="only shard sets of one family"):
        check_compatible([a, ShardSet(make_set(tmp_path / "c", channels=3))])


def test_shard_arguments_take_an_optional_weight(tmp_path):
    assert parse_shard_arg("data/shards") == ("data/shards", 1.0)
    assert parse_shard_arg("data/shards:0.3") == ("data/shards", 0.3)
    (tmp_path / "odd:name").mkdir()
    assert parse_shard_arg(str(tmp_path / "odd:name")) == (str(tmp_path / "odd:name"), 1.0)
    with pytest.raises(UserError, match="finite number > 0"):
        parse_shard_arg("data:0")


def test_eval_batches_are_chosen_by_key_not_by_the_training_order(shard_set):
    first = eval_batches(ShardSet(shard_set), batch_size=2, count=3)
    assert [len(b.keys) for b in first] == [2, 2, 2]
    assert keys_of([first]) == keys_of([eval_batches(ShardSet(shard_set), batch_size=2, count=3)])
    every = sorted(k for b in first for k in b.keys)
    assert every == sorted(set(every))


def test_a_training_view_with_none_of_the_shards_samples_says_so(tmp_path):
    """A view whose keys are in no shard leaves the pass empty: the error names the view's file, not the batch size
    (which no lowering would fix)."""
    folder = make_set(tmp_path / "v", n=5)
    manifest = load_manifest(folder)
    (folder / "active_keys.txt").write_text("f" * 32 + "\n")
    manifest.active = {"keys_file": "active_keys.txt", "samples": 1, "buckets": {}}
    manifest.save(folder)
    with pytest.raises(UserError, match="active_keys.txt") as error:
        next(DataStream([ShardSet(folder)], seed=0, batch_size=1).batches())
    assert "lower one of them" not in str(error.value)


RANK_READER = """
import itertools, json, os, sys
from ft.train.loader import DataStream, ShardSet
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
def stream():
    return DataStream([ShardSet(sys.argv[1])], seed=4, batch_size=1, rank=rank, world=world, shuffle_buffer=3,
                      accumulation=2)
straight = list(itertools.islice(stream().batches(), 30))
resumed = {at: [[b.keys for b in step] for step in itertools.islice(stream().batches(straight[at][0].position), 6)]
           for at in (0, 5, 13, 14, 22)}
json.dump({"straight": [[b.keys for b in step] for step in straight], "resumed": resumed},
          open(f"{sys.argv[2]}/rank{rank}.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_read_their_slices_and_resume_on_the_same_batch(tmp_path):
    """Under torchrun, 2 processes that open a set without an index at once (one builds it, both map it) each read
    their slice of every step of the one-process plan, across epochs, and resume on the same batch at any point."""
    import json
    import os
    import subprocess
    import sys

    folder = make_set(tmp_path / "r", n=31, buckets=((1, 8, 8), (1, 8, 16), (1, 16, 8)), shard_samples=4)
    (tmp_path / "read.py").write_text(RANK_READER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "read.py"), str(folder), str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one = DataStream([ShardSet(folder)], seed=4, batch_size=4, shuffle_buffer=3)
    whole = [step[0].keys for step in itertools.islice(one.batches(), 30)]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(ranks):  # micro-batch m of rank r: sample m * 2 + r of the step
        assert got["straight"] == [[[keys[m * 2 + r]] for m in range(2)] for keys in whole]
        for at, steps in got["resumed"].items():
            assert steps == got["straight"][int(at) + 1: int(at) + 7]

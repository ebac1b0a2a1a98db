"""Streams shard samples into batches for training: shuffled, bucketed by shape, read in a background thread.

Each pass ("epoch") visits the shards in a seeded random order; samples go through a shuffle buffer; samples of
equal tensor shapes (one bucket) are collected until a batch is full; a bucket's remainder at the end of a pass is
dropped. The first pass verifies every shard's
sha256 against the manifest as it reads (no extra I/O). Tensors arrive as zero-copy views of the tar bytes.
"""

from __future__ import annotations

import queue
import random
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.common.shards import Manifest, Sample, iter_shard


@dataclass
class Batch:
    """Stacked tensors of equal-shape samples: `latents` and `cond` groups, each sample's metadata, and the pass
    over the data ("epoch", from 0) they came from."""

    latents: dict[str, Any]
    cond: dict[str, Any]
    meta: list[dict[str, Any]]
    epoch: int = 0

    def to(self, device: Any) -> Batch:
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.latents.items()},
                     {k: v.to(device, non_blocking=True) for k, v in self.cond.items()}, self.meta, self.epoch)


def _shape_key(sample: Sample) -> tuple:
    return tuple((g, n, tuple(t.shape)) for g in sorted(sample.tensors) for n, t in sorted(sample.tensors[g].items()))


def collate(samples: list[Sample], epoch: int = 0) -> Batch:
    import torch

    groups = {g: {n: torch.stack([s.tensors[g][n] for s in samples]) for n in samples[0].tensors[g]}
              for g in samples[0].tensors}
    return Batch(groups.get("latents", {}), groups.get("cond", {}), [s.meta for s in samples], epoch)


class ShardStream:
    """An endless iterator of `Batch`es over a shard set.

    Only the samples in `active` (the keys of the dataset's last precompute run, see Manifest.active_keys) are
    used when it is given. Samples of a bucket left over at the end of a pass, too few for a batch, are dropped
    rather than carried into the next pass, so a batch never holds the same sample twice.
    """

    def __init__(self, folder: str | Path, manifest: Manifest, batch_size: int, seed: int, shuffle_buffer: int = 256,
                 active: set[str] | None = None):
        self.folder, self.manifest = Path(folder), manifest
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.active = active

    def epoch_samples(self, epoch: int, rng: random.Random) -> Iterator[Sample]:
        """One pass: shards in a seeded order, samples through a shuffle buffer; sha256 verified on pass 0."""
        shards = list(self.manifest.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        buffer: list[Sample] = []
        for shard in shards:
            for sample in iter_shard(self.folder / shard.name, expected_sha256=shard.sha256 if epoch == 0 else None):
                if self.active is not None and sample.key not in self.active:
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Batch]:
        rng = random.Random(self.seed)
        epoch = 0
        while True:
            pending: dict[tuple, list[Sample]] = defaultdict(list)
            for sample in self.epoch_samples(epoch, rng):
                key = _shape_key(sample)
                pending[key].append(sample)
                if len(pending[key]) == self.batch_size:
                    yield collate(pending.pop(key), epoch)
            epoch += 1


def background(iterator: Iterator[Any], size: int = 4) -> Iterator[Any]:
    """Run `iterator` in a daemon thread, `size` items ahead; exceptions are re-raised in the consumer.

    When the consumer stops (the generator is closed or collected), the thread stops too instead of blocking on
    a full queue for the rest of the process.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    done, stop = object(), threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)
            return
        put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()

"""Streams shard samples into optimizer steps: an order that is a pure function of (seed, epoch, shard set,
samples per optimizer step), a position that can be saved, and a split into micro-batches and ranks.

Planning. Each pass ("epoch") over a shard set is planned with numpy from the set's index (`set_index.bin`,
memory-mapped and shared by the processes of a node; plan.py): the shards in an order seeded by (seed, epoch),
samples through a shuffle buffer seeded likewise, samples of one bucket collected into *step* batches of
`batch_size x world x accumulation` samples; a bucket's remainder at the end of the pass is dropped (a batch never
holds a sample twice, and a key that appears twice on disk is used once per pass). A step batch is cut into
micro-batches of `batch_size x world`, and rank r takes slice r of each: 2 processes x batch 1 and 1 process x
batch 2 (or accumulation 2) train on the same samples at the same step.

Reading. The shards are then read in the plan's order, decoding only the samples this rank needs from the
current position on (the others' bytes are seeked over, and a shard with nothing needed is not opened), and each
batch is emitted once all its samples are in; memory stays what the shuffle buffer holds. A shard is verified
against its manifest digest the first time this process reads samples from it (its other members' bytes are
then read and hashed, not decoded). The plan is streamed, never held: a first run of it marks the rows this rank
reads (a bit a row), a second is consumed as the shards are read. Resuming at a position costs one run of the
pass's plan up to it (the stream's cursor is copied there), never tensors, headers or JSON.

Several shard sets are mixed per optimizer step: step n comes from set i with probability weight_i / sum, drawn
from (seed, n). The position (`Batch.position`, saved in checkpoints) is the step count and each set's (epoch,
steps taken in that epoch), with the samples per optimizer step it counts in.
"""

from __future__ import annotations

import hashlib
import math
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ft.common.errors import UserError
from ft.common.shards import (
    Manifest,
    Sample,
    iter_shard,
    load_shard_set,
    parse_bucket,
    stack_tensors,
    tensors_from_bytes,
)
from ft.common.shards.set_index import INDEX_NAME, SetIndex, active_files, open_set_index

from .plan import EpochPlan, Replay, RowSet, mix_seed, plan_epoch

__all__ = ["Batch", "DataStream", "EpochPlan", "SetStream", "ShardSet", "background", "check_compatible", "collate",
           "eval_batches", "mix_seed", "parse_shard_arg", "plan_epoch"]


@dataclass
class Batch:
    """Stacked tensors of equal-shape samples (`latents`, `cond`), each sample's metadata, the shard set they
    came from, its epoch, and the stream position after this batch."""

    latents: dict[str, Any]
    cond: dict[str, Any]
    meta: list[dict[str, Any]]
    keys: list[str] = field(default_factory=list)
    set_index: int = 0
    epoch: int = 0
    position: dict[str, Any] = field(default_factory=dict)
    image: dict[str, Any] = field(default_factory=dict)  # the image-to-video conditioning, where the set has it

    def to(self, device: Any) -> Batch:
        def moved(group: dict[str, Any]) -> dict[str, Any]:
            return {k: v.to(device, non_blocking=True) for k, v in group.items()}

        return Batch(moved(self.latents), moved(self.cond), self.meta, self.keys, self.set_index, self.epoch,
                     self.position, moved(self.image))


def collate(samples: list[Sample], **info: Any) -> Batch:
    """One batch of equal-shape samples. It runs in the reader thread (`background`), so it stacks without torch's
    intra-op threads (`stack_tensors` says why that matters)."""
    groups = {g: {n: stack_tensors([s.tensors[g][n] for s in samples]) for n in samples[0].tensors[g]}
              for g in samples[0].tensors}
    return Batch(groups.get("latents", {}), groups.get("cond", {}), [s.meta for s in samples],
                 [s.key for s in samples], image=groups.get("image", {}), **info)


class ShardSet:
    """One shard folder with its manifest and its whole-set index (common/shards/set_index.py), mapped on first
    use: the rows training plans from (bucket, training view, byte spans, keys), shared with every process of the
    node through the page cache."""

    def __init__(self, folder: str | Path, weight: float = 1.0):
        self.folder, self.weight = Path(folder), weight
        self.manifest = load_shard_set(self.folder)
        self._index: SetIndex | None = None
        self.verified: set[str] = set()

    @property
    def index(self) -> SetIndex:
        """The set's index: `set_index.bin` when it matches the manifest, else built once (and saved)."""
        if self._index is None:
            self._index = open_set_index(self.folder, self.manifest)
        return self._index

    def fingerprint(self) -> str:
        """What the data order depends on: the shards (names and digests) and the keys trained on (read from the
        index, which computed it when it was written)."""
        return self.index.fingerprint

    def trained_samples(self) -> int:
        """The samples training uses: the training view's keys, or every sample when the set has no view."""
        count = self.index.active_keys
        return self.manifest.num_samples if count is None else count

    def active_keys(self) -> set[str] | None:
        """The training view's keys as strings (for a small set, such as a held-out one), or None for all."""
        return self.manifest.active_keys(self.folder)

    def empty_caption(self) -> dict[str, Any] | None:
        """The conditioning of the empty caption stored by `ft precompute`, or None for an older shard set."""
        info = self.manifest.empty_caption
        if not info:
            return None
        path = self.folder / info["file"]
        if not path.is_file():
            raise UserError(f"{path} is missing; rerun `ft precompute` with the same --out to rewrite it.")
        data = bytearray(path.read_bytes())
        try:
            if hashlib.sha256(data).hexdigest() != info.get("sha256"):
                raise ValueError("its sha256 does not match the manifest")
            return tensors_from_bytes(data)
        except (ValueError, KeyError, UnicodeDecodeError, RuntimeError) as e:
            raise UserError(f"{path} is damaged ({e}); delete it and rerun `ft precompute` with the same --out to "
                            "rewrite it.") from e


class SetStream:
    """Endless optimizer steps of one shard set for one rank, from a position (epoch, steps already taken).

    A plan batch is one optimizer step's samples (`batch_size x world x accumulation`, one bucket); it is cut into
    `accumulation` micro-batches of `batch_size x world`, and rank r takes slice r of each. So the samples of a step
    depend only on the samples per optimizer step, not on how processes and micro-batches split them."""

    def __init__(self, shard_set: ShardSet, set_index: int, seed: int, batch_size: int, rank: int = 0,
                 world: int = 1, shuffle_buffer: int = 256, accumulation: int = 1):
        self.set, self.set_index, self.seed = shard_set, set_index, seed
        self.batch_size, self.rank, self.world, self.shuffle_buffer = batch_size, rank, world, shuffle_buffer
        self.accumulation = accumulation
        self._verifier: np.ndarray | None = None

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.world * self.accumulation

    def plan(self, epoch: int) -> EpochPlan:
        plan = plan_epoch(self.set.index, self.seed, epoch, self.samples_per_step, self.shuffle_buffer)
        views = ", ".join(str(self.set.folder / f) for f in active_files(self.set.manifest))
        if views and not plan.usable.any():  # the view leaves every sample out: no batch size would help
            raise UserError(f"{self.set.folder}: its training view ({views}) names none of its shards' samples "
                            f"(the data it was last precomputed from has none: see `ft inspect {self.set.folder}`); "
                            "rerun `ft precompute` on the data to train on.")
        if not plan.count:
            raise UserError(f"{self.set.folder}: no bucket has {self.samples_per_step} samples for one optimizer "
                            f"step (--batch-size {self.batch_size} x {self.world} processes x "
                            f"--gradient-accumulation-steps {self.accumulation}); lower one of them.")
        return plan

    def mine(self, step_batches: np.ndarray) -> np.ndarray:
        """This rank's samples of each optimizer step (rows of `step_batches`), micro-batch after micro-batch."""
        b, w = self.batch_size, self.world
        parts = [step_batches[:, (m * w + self.rank) * b:(m * w + self.rank + 1) * b] for m in range(self.accumulation)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def batches(self, epoch: int = 0, taken: int = 0) -> Iterator[list[Batch]]:
        """Per optimizer step, this rank's micro-batches (each position is the stream's after the step)."""
        while True:
            plan = self.plan(epoch)
            total = plan.count
            if taken >= total:
                epoch, taken = epoch + 1, 0
                continue
            for i, samples in enumerate(self._read(plan, taken)):
                done = taken + i + 1
                position = {"epoch": epoch + 1, "taken": 0} if done == total else {"epoch": epoch, "taken": done}
                b = self.batch_size
                yield [collate(samples[m * b:(m + 1) * b], set_index=self.set_index, epoch=epoch, position=position)
                       for m in range(self.accumulation)]
            epoch, taken = epoch + 1, 0

    def verifies(self, shard: int) -> bool:
        """Whether this rank hashes shard `shard` (its id in the index) on its first pass: each shard is verified by
        one rank (in one process, by it), the shards' names taken in turn in sorted order, whose failure stops
        every rank; the others read it without hashing."""
        if self._verifier is None:
            names = self.set.index.shards
            self._verifier = np.empty(len(names), np.int64)
            self._verifier[np.argsort(np.array(names))] = np.arange(len(names)) % self.world
        return int(self._verifier[shard]) == self.rank

    def _read(self, plan: EpochPlan, taken: int) -> Iterator[list[Sample]]:
        """This rank's samples of each step after the first `taken`: a first run of the pass's stream marks the
        rows this rank needs and those any rank needs (a bit a row; one set when this rank needs them all); the
        second, from a copy of the stream made at `taken` by the first (`Replay`), is consumed as the shards are
        read in the plan's order."""
        index = self.set.index
        replay = Replay(plan, taken)
        needed = RowSet(index.samples)
        anyones = needed if self.world == 1 else RowSet(index.samples)  # the rest of the pass's rows, anyone's
        for chunk in replay.first():
            needed.add(self.mine(chunk).ravel())
            if anyones is not needed:
                anyones.add(chunk.ravel())
        steps = (rows.tolist() for chunk in replay.again() for rows in self.mine(chunk))
        next_rows = next(steps, None)
        loaded: dict[int, Sample] = {}
        emitted = 0
        infos = self.set.manifest.shards  # in the index's order (its source is the manifest's shards, in order)
        for shard, name in zip(plan.shard_ids.tolist(), plan.shards, strict=True):
            rows = index.rows(shard)
            verify = name not in self.set.verified and self.verifies(shard) and anyones.holds_any(rows.start,
                                                                                                    rows.stop)
            assert infos[shard].name == name, "the index lists the manifest's shards in its order"
            want = needed.within(rows.start, rows.stop)
            if not verify and not len(want):
                continue  # fast-forward: nothing of this shard is read, not even to verify it
            row_of = dict(zip(index.keys(want), want.tolist(), strict=True))
            for sample in iter_shard(self.set.folder / name, verify=infos[shard] if verify else None,
                                     wanted=lambda key, row_of=row_of: key in row_of and row_of[key] not in loaded):
                loaded[row_of[sample.key]] = sample
                while next_rows is not None and all(r in loaded for r in next_rows):
                    yield [loaded.pop(r) for r in next_rows]
                    emitted += 1
                    next_rows = next(steps, None)
            if verify:
                self.set.verified.add(name)
        if emitted < plan.count - taken:
            raise UserError(f"{self.set.folder}: {plan.count - taken - emitted} planned batches could not be read; "
                            "the shards changed during training. Rerun `ft precompute` and train again (or delete "
                            f"{self.set.folder / INDEX_NAME} to rebuild it, if the shards are as they were).")


class DataStream:
    """Optimizer steps mixed from one or more shard sets; `batches(position)` resumes at a saved position.

    Each item is this rank's micro-batches of one optimizer step. The position counts optimizer steps (and each
    set's epoch and steps taken in it), recorded with the samples per optimizer step it counts in."""

    def __init__(self, sets: list[ShardSet], seed: int, batch_size: int, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 256, accumulation: int = 1):
        self.sets, self.seed = sets, seed
        # set 0 keeps the run's seed, so adding a second set does not reorder the first
        self.streams = [SetStream(s, i, seed if i == 0 else mix_seed(seed, "set", i), batch_size, rank, world,
                                  shuffle_buffer, accumulation) for i, s in enumerate(sets)]
        self.samples_per_step = batch_size * world * accumulation
        total = sum(s.weight for s in sets)
        self.weights = [s.weight / total for s in sets]

    def initial_position(self) -> dict[str, Any]:
        return {"batches": 0, "sets": [{"epoch": 0, "taken": 0} for _ in self.sets],
                "samples_per_step": self.samples_per_step}

    def fingerprints(self) -> list[str]:
        return [s.fingerprint() for s in self.sets]

    def choose_set(self, n: int) -> int:
        if len(self.sets) == 1:
            return 0
        return random.Random(mix_seed(self.seed, n, "mix")).choices(range(len(self.sets)), self.weights)[0]

    def batches(self, position: dict[str, Any] | None = None) -> Iterator[list[Batch]]:
        position = position or self.initial_position()
        if len(position["sets"]) != len(self.sets):
            raise UserError(f"the checkpoint was taken mixing {len(position['sets'])} shard sets, not "
                            f"{len(self.sets)}: pass the same --shards to resume.")
        sets = [dict(p) for p in position["sets"]]
        iterators = [s.batches(p["epoch"], p["taken"]) for s, p in zip(self.streams, sets, strict=True)]
        n = position["batches"]
        fingerprints = self.fingerprints()
        while True:
            i = self.choose_set(n)
            micro = next(iterators[i])
            sets[i] = micro[-1].position
            n += 1
            step_position = {"batches": n, "sets": [dict(p) for p in sets], "fingerprints": fingerprints,
                             "samples_per_step": self.samples_per_step}
            for batch in micro:
                batch.position = step_position
            yield micro


def eval_batches(shard_set: ShardSet, batch_size: int, count: int) -> list[Batch]:
    """Fixed batches for the fixed-noise loss, chosen by sample key (the smallest keys of each bucket, buckets in
    turn), so they do not depend on the training order and are the same in a resumed run."""
    index = shard_set.index
    rows = np.flatnonzero(index.active)
    buckets = index.bucket[rows]
    queues: list[list[int]] = []
    for b in sorted(np.unique(buckets).tolist(), key=lambda b: parse_bucket(index.buckets[b])):
        mine = rows[buckets == b]
        first = mine[np.argsort(index.sortable_keys(mine), kind="stable")][: batch_size * count]
        queues.append(first.tolist())
    chosen: list[list[int]] = []
    while len(chosen) < count and any(len(q) >= batch_size for q in queues):
        for q in queues:
            if len(q) >= batch_size and len(chosen) < count:
                chosen.append([q.pop(0) for _ in range(batch_size)])
    flat = [r for b in chosen for r in b]
    key_of = dict(zip(flat, index.keys(flat), strict=True))
    wanted = set(key_of.values())
    samples: dict[str, Sample] = {}
    shard_of = np.searchsorted(index.shard_start, flat, "right") - 1
    for shard in sorted(set(shard_of.tolist())):
        for sample in iter_shard(shard_set.folder / index.shards[shard], wanted=wanted.__contains__):
            samples[sample.key] = sample
    return [collate([samples[key_of[r]] for r in b]) for b in chosen]


def check_compatible(sets: list[ShardSet]) -> Manifest:
    """Shard sets mixed in one run must hold the same family and shapes; returns the first one's manifest."""
    first = sets[0].manifest
    seen = {sets[0].folder.resolve()}
    for s in sets[1:]:
        m = s.manifest
        if s.folder.resolve() in seen:
            raise UserError(f"--shards {s.folder} is given twice; give it once, with the weight you mean.")
        seen.add(s.folder.resolve())
        if m.model_family != first.model_family or m.shapes != first.shapes:
            raise UserError(f"--shards {s.folder} holds {m.model_family} samples of shapes {m.shapes}, but "
                            f"{sets[0].folder} holds {first.model_family} samples of shapes {first.shapes}: only "
                            "shard sets of one family and shape can be mixed.")
        if m.encoder_fingerprint != first.encoder_fingerprint:
            raise UserError(f"--shards {s.folder} was encoded with other encoders than {sets[0].folder} (fingerprint "
                            f"{m.encoder_fingerprint[:12]} against {first.encoder_fingerprint[:12]}: another VAE, "
                            "text encoder or dtype); its latents would be scaled wrongly. Precompute both with the "
                            "same model and dtypes to mix them.")
    return first


def parse_shard_arg(arg: str) -> tuple[str, float]:
    """`PATH` or `PATH:WEIGHT` -> (path, weight)."""
    path, sep, weight = arg.rpartition(":")
    if sep and path and not Path(arg).exists():
        try:
            value = float(weight)
        except ValueError:
            raise UserError(f"--shards {arg}: no such folder, and {weight!r} after ':' is not a weight (a number "
                            "> 0, as in --shards A B:0.3).") from None
        if not (value > 0 and math.isfinite(value) and value < 1e12):
            raise UserError(f"--shards {arg}: the weight after ':' must be a finite number > 0.")
        return path, value
    return arg, 1.0


def background(iterator: Iterator[Any], size: int = 4) -> Iterator[Any]:
    """Run `iterator` in a daemon thread, `size` items ahead; exceptions are re-raised in the consumer.

    When the consumer stops (the generator is closed or collected), the thread stops too instead of blocking on
    a full queue for the rest of the process, and is waited for.
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
        # wait for the reader to notice (it checks between items): a daemon thread still inside torch when the
        # interpreter exits aborts the process ("terminate called without an active exception")
        thread.join(timeout=30)

"""A sample's two halves as a cache: the video half (VAE posterior) and the text half (conditioning).

Each sample's JSON records `video_key` (a hash of the media bytes, frames, bucket, resize mode and the VAE's
fingerprint) and `text_key` (the caption, the text encoders' fingerprints and the text length); the family's
encoding choices enter both. A new sample whose video half is already in `--out` under another sample (the same
clip with a new caption, an id token added to every caption) takes its latents from that shard instead of
decoding and encoding the clip again; likewise a text half already encoded for another clip. So recaptioning a
dataset runs only the text encoder, and a clip added runs the VAE once.

Cached halves are read from their shards with the shard's digest verified (`iter_shard(verify=...)`), a shard at
a time, and streamed: `TextHalves` holds the wanted conditioning of one source shard at once (the samples that
reuse text are encoded in the order of the shards their text comes from), so a rerun that keeps 10k captions
but re-encodes the videos does not gather 10k conditionings in memory first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common.shards import ShardInfo, iter_shard

from .planned_sample import PlannedSample

if TYPE_CHECKING:
    import torch

Tensors = dict[str, "torch.Tensor"]


@dataclass
class HalfIndex:
    """Where each cached half is: video_key / text_key -> (shard name, sample key), from the samples' JSON."""

    video: dict[str, tuple[str, str]] = field(default_factory=dict)
    text: dict[str, tuple[str, str]] = field(default_factory=dict)

    def add(self, shard: str, key: str, meta: dict[str, Any]) -> None:
        if meta.get("video_key"):  # samples written before the halves were recorded have neither
            self.video.setdefault(meta["video_key"], (shard, key))
        if meta.get("text_key"):
            self.text.setdefault(meta["text_key"], (shard, key))


def _read(out: Path, shards: dict[str, ShardInfo], wanted: dict[str, set[str]], group: str
          ) -> Iterator[tuple[str, str, Tensors]]:
    """(shard name, sample key, tensors of `group`) of the wanted samples, a shard at a time, each shard read
    whole (and its digest checked) before any of its samples is handed out."""
    for name in sorted(wanted):
        keys = wanted[name]
        found = [(s.key, s.tensors[group]) for s in iter_shard(out / name, verify=shards[name],
                                                                  wanted=keys.__contains__)]
        for key, tensors in found:
            yield name, key, tensors


class TextHalves:
    """The cached text halves that the samples to encode can take, by text_key, loaded one source shard at a
    time."""

    def __init__(self, out: Path, shards: dict[str, ShardInfo], index: HalfIndex):
        self.out, self.shards = out, shards
        self.where = index.text  # the text halves the samples to encode want (existing.half_index)
        self.by_shard: dict[str, set[str]] = defaultdict(set)
        for name, key in self.where.values():
            self.by_shard[name].add(key)
        self._shard: str | None = None
        self._loaded: dict[str, Tensors] = {}
        self._verified: set[str] = set()

    def __contains__(self, text_key: str) -> bool:
        return text_key in self.where

    def source(self, text_key: str) -> str:
        """The shard a text half comes from ("" when it is not cached): the order to encode samples in."""
        return self.where.get(text_key, ("", ""))[0]

    def get(self, text_key: str) -> Tensors | None:
        where = self.where.get(text_key)
        if where is None:
            return None
        name, key = where
        if name != self._shard:
            self._loaded = {}  # drop the previous shard's halves before reading the next
            verify = self.shards[name] if name not in self._verified else None
            self._loaded = {s.key: s.tensors["cond"] for s in iter_shard(self.out / name, verify=verify,
                                                                          wanted=self.by_shard[name].__contains__)}
            self._shard = name
            self._verified.add(name)
        return self._loaded[key]


def with_cached_video(out: Path, shards: dict[str, ShardInfo], index: HalfIndex, todo: list[PlannedSample]
                      ) -> Iterator[tuple[PlannedSample, Tensors]]:
    """Each sample of `todo` whose video half is in `out`, with those latents, a source shard at a time."""
    users: dict[tuple[str, str], list[PlannedSample]] = defaultdict(list)
    wanted: dict[str, set[str]] = defaultdict(set)
    for p in todo:
        where = index.video[p.video_key]
        users[where].append(p)
        wanted[where[0]].add(where[1])
    for name, key, latents in _read(out, shards, wanted, "latents"):
        for p in users[(name, key)]:
            yield p, latents

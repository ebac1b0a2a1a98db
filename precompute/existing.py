"""What an `--out` already holds for this job: the shards it may use, the keys done, and where cached halves are.

A job looks at the last merged manifest's shards, its own journal (shards it finished in an earlier attempt) and
its own unlisted shards (renamed into place just before a kill: adopted unless their samples are already
listed, so no sample is listed twice). Each shard is seen through its index file (common/shards/reader.py), or its tar
headers for a set written before indexes existed; a listed shard that is lost or unreadable is dropped (its
samples are encoded again). Only a single run (one job, which no other writer can run beside) removes files it
did not write: leftovers of every killed writer (`*.tar.tmp`), and listed shards whose samples all sit in other
listed shards; a job removes only its own leftovers.

Nothing here holds a sample's JSON: a first pass collects the keys held, a second (only when there is something
to encode) the locations of the halves the new samples can reuse.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ft.common.errors import UserError
from ft.common.logs import log
from ft.common.shards import IndexRow as Row
from ft.common.shards import (
    Manifest,
    ShardInfo,
    describe_shard,
    read_index_file,
    shard_rows,
    write_index_file,
)

from .job_slots import JobSlot
from .reuse import HalfIndex


@dataclass
class Existing:
    """The usable shards (by name), the keys they hold, and what changed on the way."""

    shards: dict[str, ShardInfo] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # every key in the usable shards
    dropped: list[str] = field(default_factory=list)  # listed shards lost, unreadable or redundant
    adopted: list[ShardInfo] = field(default_factory=list)  # whole shards found unlisted, to record now


def _remove_leftovers(out: Path, slot: JobSlot) -> None:
    pattern = "*" if slot.num_jobs == 1 else f"{slot.prefix}-*"
    for suffix in (".tar.tmp", ".idx.tmp"):
        for stale in out.glob(pattern + suffix):
            log.info(f"removing {stale.name}, left unfinished by an earlier run")
            stale.unlink(missing_ok=True)


def _rows(out: Path, info: ShardInfo | None, name: str, exclusive: bool) -> list[Row]:
    path = out / name
    rows = shard_rows(path, info)
    if exclusive and info is not None and read_index_file(path, info) is None:
        write_index_file(path, info, rows)  # a shard of an older set: index it once
    return rows


def scan_existing(out: Path, slot: JobSlot, base: Manifest | None, journal: list[ShardInfo]) -> Existing:
    """The first pass: which listed (and unlisted own) shards are usable and which keys they hold. It needs no
    plan, so it runs before planning: a job whose `--out` holds nothing usable plans while it encodes."""
    exclusive = slot.num_jobs == 1
    _remove_leftovers(out, slot)
    found = Existing()
    listed = list(base.shards if base else [])
    names = {s.name for s in listed}
    listed += [s for s in journal if s.name not in names]
    seen: set[str] = set()
    for shard in listed:
        try:
            keys = {r.key for r in _rows(out, shard, shard.name, exclusive)}
        except (OSError, tarfile.TarError, UserError) as e:
            log.warning(f"{out / shard.name} is listed but cannot be read ({e}); its samples are encoded again")
            found.dropped.append(shard.name)
            continue
        if exclusive and keys and keys <= seen:
            log.info(f"dropping {shard.name}: every sample in it is in another listed shard")
            (out / shard.name).unlink()
            found.dropped.append(shard.name)
            continue
        seen |= keys
        found.shards[shard.name] = shard
    pattern = "shard-*.tar" if exclusive else f"{slot.prefix}-*.tar"
    for path in sorted(out.glob(pattern)):
        if path.name in found.shards or path.name in found.dropped:
            continue
        try:  # renamed into place, then killed before the journal named it
            keys = {r.key for r in shard_rows(path)}
            if keys & seen:
                if keys <= seen:
                    log.info(f"removing {path.name}: complete but unlisted, and its samples are already listed")
                    path.unlink()
                else:
                    log.warning(f"{path} is unlisted and shares samples with listed shards; ignoring it")
                continue
            info = describe_shard(path)
            if read_index_file(path, info) is None:
                write_index_file(path, info, shard_rows(path))
            found.shards[path.name] = info
            found.adopted.append(info)
            seen |= keys
            log.info(f"adopting {path.name}: complete on disk but not recorded")
        except (OSError, tarfile.TarError, UserError) as e:
            log.warning(f"{path} is unlisted and cannot be read ({e}); ignoring it")
    found.held = seen
    return found


def _all_rows(out: Path, shards: dict[str, ShardInfo]) -> Iterator[tuple[str, Row]]:
    for name, info in shards.items():
        for row in shard_rows(out / name, info):
            yield name, row


def half_index(out: Path, shards: dict[str, ShardInfo], video_keys: set[bytes], text_keys: set[bytes]
               ) -> HalfIndex:
    """The second pass: where the wanted video and text halves are cached (the first shard holding each). The
    wanted keys come as their 16 bytes (PlannedSample.video_key_bytes): a rerun wants up to one of each per item."""
    index = HalfIndex()
    if not video_keys and not text_keys:
        return index
    for name, row in _all_rows(out, shards):
        if row.video_key and bytes.fromhex(row.video_key) in video_keys:
            index.video.setdefault(row.video_key, (name, row.key))
        if row.text_key and bytes.fromhex(row.text_key) in text_keys:
            index.text.setdefault(row.text_key, (name, row.key))
    return index

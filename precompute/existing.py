"""What an `--out` already holds for this job: the shards it may use, the keys done, and where cached halves are.

A job looks at the last merged manifest's shards, its own journal (shards it finished in an earlier attempt) and
its own unlisted shards (renamed into place just before a kill: adopted unless their samples are already
listed, so no sample is listed twice). Each shard is seen through its index file (common/shards/reader.py), or its tar
headers for a set written before indexes existed; a listed shard that is lost or unreadable is dropped (its
samples are encoded again). Only a single run (one job, which no other writer can run beside) removes files it
did not write: leftovers of every killed writer (`*.tar.tmp`), and listed shards whose samples all sit in other
listed shards; a job removes only its own leftovers.

Nothing here holds a sample's JSON: a first pass collects the keys held (a KeySet: sorted runs of 16-byte keys,
plan_table.py), a second (only when there is something to encode) the locations of the halves the new samples can
reuse.
"""

from __future__ import annotations

import tarfile
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
from .plan_table import NO_KEY, KeySet, from_hex
from .reuse import HalfIndex


@dataclass
class Existing:
    """The usable shards (by name), the keys they hold, and what changed on the way."""

    shards: dict[str, ShardInfo] = field(default_factory=dict)
    held: KeySet = field(default_factory=KeySet)  # every key in the usable shards
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
    seen = KeySet()
    for shard in listed:
        try:
            keys = from_hex(r.key for r in _rows(out, shard, shard.name, exclusive))
        except (OSError, tarfile.TarError, UserError) as e:
            log.warning(f"{out / shard.name} is listed but cannot be read ({e}); its samples are encoded again")
            found.dropped.append(shard.name)
            continue
        if exclusive and len(keys) and seen.mask(keys).all():
            log.info(f"dropping {shard.name}: every sample in it is in another listed shard")
            (out / shard.name).unlink()
            found.dropped.append(shard.name)
            continue
        seen.add(keys)
        found.shards[shard.name] = shard
    pattern = "shard-*.tar" if exclusive else f"{slot.prefix}-*.tar"
    for path in sorted(out.glob(pattern)):
        if path.name in found.shards or path.name in found.dropped:
            continue
        try:  # renamed into place, then killed before the journal named it
            keys = from_hex(r.key for r in shard_rows(path))
            listed_already = seen.mask(keys)
            if listed_already.any():
                if listed_already.all():
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
            seen.add(keys)
            log.info(f"adopting {path.name}: complete on disk but not recorded")
        except (OSError, tarfile.TarError, UserError) as e:
            log.warning(f"{path} is unlisted and cannot be read ({e}); ignoring it")
    found.held = seen
    return found


def half_index(out: Path, shards: dict[str, ShardInfo], video_keys: KeySet, text_keys: KeySet) -> HalfIndex:
    """The second pass: where the wanted video and text halves are cached (the first shard holding each). The
    wanted keys come as KeySets (a rerun wants up to one of each per item), asked a shard's rows at a time."""
    index = HalfIndex()
    if not len(video_keys) and not len(text_keys):
        return index
    for name, info in shards.items():
        rows = shard_rows(out / name, info)
        videos = video_keys.mask(from_hex(r.video_key or NO_KEY.hex() for r in rows))
        texts = text_keys.mask(from_hex(r.text_key or NO_KEY.hex() for r in rows))
        for row, video, text in zip(rows, videos.tolist(), texts.tolist(), strict=True):
            if video:
                index.video.setdefault(row.video_key, (name, row.key))
            if text:
                index.text.setdefault(row.text_key, (name, row.key))
    return index

"""De-duplicating the lines of large files in flat memory: the merge's tool for `active_keys.txt` (every job's keys,
each once) and the media cache (`cache/media.jsonl`, the newest entry of each path).

A dict of every entry held 1.7 GB at a million media files. Here the lines are first spilled, in their order, into
partition files chosen by a hash of each line's identity (a key, a path), each partition about `PART_BYTES` of
text; then each partition alone is de-duplicated in memory. Memory is one partition's lines, whatever the total; a total
under `PART_BYTES` is one partition and is never spilled. Output order is partition by partition (the readers of
both files load them into a set or a dict: the order is not part of either file's meaning).
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from ft.common.shards import kill_point

PART_BYTES = 8 << 20  # about 250k keys (or 30k media entries) held as Python strings at once


def _lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        if path.is_file():
            with open(path) as f:
                for line in f:
                    if line.strip():
                        yield line if line.endswith("\n") else line + "\n"


def partitions(paths: list[Path], identity: Callable[[str], str | None], spill: Path) -> Iterator[list[str]]:
    """The lines of `paths` (in order within each part), grouped so that lines of one identity share a part.
    Lines whose identity is None are dropped (a line torn by a kill, say). The parts are spilled into the folder
    `spill`, emptied first (what a killed run left there) and removed after."""
    shutil.rmtree(spill, ignore_errors=True)
    total = sum(p.stat().st_size for p in paths if p.is_file())
    count = total // PART_BYTES + 1
    if count == 1:
        yield list(_lines(paths))
        return
    spill.mkdir()
    try:
        files = [open(spill / f"{i:05d}", "w") for i in range(count)]
        try:
            for line in _lines(paths):
                name = identity(line)
                if name is not None:
                    files[zlib.crc32(name.encode()) % count].write(line)
        finally:
            for f in files:
                f.close()
        kill_point("spilled")
        for i in range(count):
            part = spill / f"{i:05d}"
            yield part.read_text().splitlines(keepends=True)
            part.unlink()
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def write_unique(paths: list[Path], target: Path, identity: Callable[[str], str | None], keep_last: bool
                 ) -> tuple[int, list[str]]:
    """Write the lines of `paths` to `target` (atomically), one per identity (the first, or the last with
    `keep_last`); returns how many were written and the identities met more than once. One process at a time
    writes `target` (the merge holds its lock): its temporary file and spill folder are named after it, so a
    killed run's are replaced by the next run's, not left behind."""
    repeated: list[str] = []
    written = 0
    tmp = target.with_name(target.name + ".tmp")
    parts = partitions(paths, identity, target.with_name(f".spill-{target.name}"))
    try:
        with open(tmp, "w") as dst:
            for part in parts:
                chosen: dict[str, str] = {}
                for line in part:
                    name = identity(line)
                    if name is None:
                        continue
                    if name in chosen:
                        repeated.append(name)
                        if not keep_last:
                            continue
                    chosen[name] = line
                dst.writelines(chosen.values())
                written += len(chosen)
                del part, chosen  # before the next partition is read: one partition's lines at a time, not two
        os.replace(tmp, target)
    except BaseException:  # a full disk, say: its partial output is not left on it
        tmp.unlink(missing_ok=True)
        raise
    finally:
        parts.close()  # its spill folder is removed now, not when the generator is collected
    return written, repeated

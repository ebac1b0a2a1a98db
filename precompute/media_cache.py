"""What planning learns about each media file, cached beside the shards by (path, size, mtime, inode), as git's
index caches file digests: a rerun on unchanged media costs a stat per file, not a probe and a sha256.

`OUT/cache/media.jsonl` holds one JSON line per file: its stat signature, its sha256 and its probe (frames, fps,
height, width). Each job writes the entries of its own items to `cache/media-<job>.jsonl` once planning is done
(so a job killed while encoding keeps them); the merge folds those into `media.jsonl`. A file whose signature
changed is probed and hashed again. `PROBE_VERSION` enters every entry: bump it when the probe changes what it
reports (rotation, say), and old entries are ignored.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.common.shards import write_atomic

CACHE_DIR = "cache"
CACHE_NAME = "media.jsonl"
PROBE_VERSION = 2  # 2: sizes as displayed (rotation, EXIF orientation), notes, a variable rate's timestamps


@dataclass(frozen=True)
class MediaFacts:
    """What planning needs of a media file: its probe (size as displayed, its notes, and the frames' timestamps
    when its frame rate varies) and the digest of its bytes."""

    num_frames: int
    fps: float
    height: int
    width: int
    digest: str
    timestamps: list[float] | None = None  # kept only for a variable-frame-rate clip
    notes: tuple[tuple[str, str], ...] = ()

    def reader(self, path: Path) -> Any:
        """The probe as a MediaReader (without a decoder): its variable_rate and span_fps."""
        from ft.precompute.media import MediaReader

        return MediaReader(Path(path), self.num_frames, self.fps, self.height, self.width,
                           timestamps=self.timestamps, notes=list(self.notes))


def signature(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class MediaCache:
    """The cache entries of the files one job plans (`paths`), read from every cache file of `out`."""

    def __init__(self, out: Path, decoder: str, paths: set[str] | None = None):
        self.out, self.decoder = out, decoder
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        folder = out / CACHE_DIR
        files = sorted(folder.glob("media*.jsonl")) if folder.is_dir() else []
        for file in sorted(files, key=lambda p: p.name != CACHE_NAME):  # the merged file first, jobs' over it
            for line in file.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and (paths is None or entry.get("path") in paths):
                    self.entries[entry["path"]] = entry
        self.used: dict[str, dict[str, Any]] = {}

    def knows(self, path: Path) -> bool:
        """Whether an entry names `path`, read or made by this run (its stat is checked by `get`): planning it is a
        stat, not a probe."""
        key = str(Path(path).absolute())
        return key in self.entries or key in self.used

    def get(self, path: Path) -> MediaFacts | None:
        key = str(Path(path).absolute())
        entry = self.entries.get(key) or self.used.get(key)  # used: probed by this run (planned again to encode)
        now = signature(path)
        if (entry is None or now is None or entry.get("stat") != now
                or entry.get("probe_version") != PROBE_VERSION or entry.get("decoder") != self.decoder):
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
            self.used[key] = entry
        return MediaFacts(entry["frames"], entry["fps"], entry["height"], entry["width"], entry["sha256"],
                          entry.get("timestamps"), tuple(tuple(n) for n in entry.get("notes", ())))

    def put(self, path: Path, facts: MediaFacts, before: list[int] | None) -> None:
        """Record a file probed and hashed now; `before` is its stat taken before it was read (a file changed
        while being read is then seen as changed next time)."""
        if before is None:
            return
        key = str(Path(path).absolute())
        entry = {"path": key, "stat": before, "probe_version": PROBE_VERSION, "decoder": self.decoder,
                 "frames": facts.num_frames, "fps": facts.fps, "height": facts.height, "width": facts.width,
                 "sha256": facts.digest, "timestamps": facts.timestamps, "notes": [list(n) for n in facts.notes]}
        with self._lock:
            self.used[key] = entry

    def save(self, stem: str) -> None:
        """Write this job's entries (every file it planned) to `cache/media-<stem>.jsonl`."""
        folder = self.out / CACHE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"media-{stem}.jsonl",
                     "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in self.used.values()))


def _path_of(line: str) -> str | None:
    """An entry's path, parsing no more of the line than that when it is written as `put` writes it."""
    try:
        if line.startswith('{"path":'):
            path, _ = _DECODER.raw_decode(line, 8)
        else:
            entry = json.loads(line)
            path = entry.get("path") if isinstance(entry, dict) else None
    except ValueError:
        return None
    return path if isinstance(path, str) else None


_DECODER = json.JSONDecoder()


def merge_cache_files(out: Path) -> None:
    """Fold the jobs' cache files into `cache/media.jsonl` (the newest entry of each path wins), in flat memory:
    the lines are kept as they are and de-duplicated a partition at a time (spill.py)."""
    from .spill import write_unique

    folder = out / CACHE_DIR
    parts = sorted(folder.glob("media-*.jsonl")) if folder.is_dir() else []
    if not parts:
        return
    write_unique([folder / CACHE_NAME, *parts], folder / CACHE_NAME, _path_of, keep_last=True)
    for part in parts:
        part.unlink(missing_ok=True)

"""The manifest of a shard set (`manifest.json`): what it holds, how it was made, whether it is complete.

`ShardInfo` is one shard's entry (name, samples, bytes, sha256 and xxh3-128, bucket histogram); `Manifest` the
whole set: family, encoder fingerprints, encoding parameters, shards, the training view (`active`: the keys of
the dataset as it last stood, in ACTIVE_KEYS_NAME), the empty caption's conditioning, `complete` and `missing`,
and the jobs that wrote it. Rejected and noted inputs are kept out of it, in `rejected.jsonl` and
`warnings.jsonl` beside it, and summarised in `inputs` (counts by kind), so the manifest every `ft train` loads
stays small whatever the dataset's problems; `Manifest.rejected` / `.warnings` read those files when asked.

`Manifest.read` reads `manifest.json` alone, as the last merge wrote it. `ft precompute` runs as one or more jobs;
each writes a partial manifest of its own under `jobs/`, and the set is merged when the last job finishes. This
module knows nothing of those jobs: the readers that must see them (`ft train`, `ft inspect`, precompute's merge)
ask journal.py (`load_manifest`, `open_shard_set`), which returns the merged view of a set not merged yet, marked
`unmerged`: incomplete, naming what to run. `require_complete` is what `ft train` asks before it trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UserError
from .codec import tensors_to_bytes

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ACTIVE_KEYS_NAME = "active_keys.txt"
EMPTY_CAPTION_NAME = "empty_caption.safetensors"
INPUT_FILES = {"rejected": "rejected.jsonl", "warnings": "warnings.jsonl"}
TENSOR_GROUPS = ("latents", "cond", "image")  # image: image-to-video conditioning (pipelines/image.py)
_TRANSIENT = ("folder", "unmerged", "_inline")  # Manifest fields set on load, never saved


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that a reader (or a kill) never sees it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def input_summary(files: list[str], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's summary of a rejected/warnings file: where it is, how many, how many of each kind (the
    records read once)."""
    kinds = Counter(r.get("kind") or "not-media" for r in records)
    return {"files": files, "count": kinds.total(), "kinds": dict(sorted(kinds.items()))}


def iter_records(folder: Path, files: list[str]) -> Iterator[dict[str, Any]]:
    """The records of rejected/warnings JSON-lines files, a line at a time (a line torn by a kill is skipped)."""
    for name in files:
        path = folder / name
        if not path.is_file():
            continue
        with open(path) as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def read_records(folder: Path, files: list[str]) -> list[dict[str, Any]]:
    """The records of rejected/warnings JSON-lines files (a line torn by a kill is skipped)."""
    return list(iter_records(folder, files))


@dataclass
class ShardInfo:
    """One completed shard: its file name, sample count, size, digests and bucket histogram.

    `xxh3_128` is empty in manifests written before it was recorded; readers then verify the sha256.
    """

    name: str
    samples: int
    bytes: int
    sha256: str
    buckets: dict[str, int] = field(default_factory=dict)
    xxh3_128: str = ""

    def check(self) -> tuple[str, str]:
        """The digest the reader verifies: (algorithm, hex digest), the fastest one recorded."""
        return ("xxh3_128", self.xxh3_128) if self.xxh3_128 else ("sha256", self.sha256)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardInfo:
        """Read a manifest entry, ignoring keys a newer ft may have added. A bucket's name is one string however
        many shards name it (`sys.intern`: 39k shards of a 10M set would each hold a copy)."""
        info = cls(**{k: v for k, v in data.items() if k in _SHARD_FIELDS})
        info.buckets = {sys.intern(b): n for b, n in info.buckets.items()}
        return info


_SHARD_FIELDS = frozenset(f.name for f in dataclasses.fields(ShardInfo))
_SHARD_REQUIRED = frozenset(("name", "samples", "bytes", "sha256"))


def _shard_entry(data: dict[str, Any]) -> Any:
    """`json.loads`'s hook: a manifest's shard entry (its keys those of ShardInfo, the required ones all there)
    becomes a ShardInfo as soon as it is parsed, so its dict is freed before the next entry is read: at 39k shards
    (10M samples) the parse holds 5 MB less than parsing them all, then converting."""
    keys = data.keys()
    return ShardInfo.from_json(data) if _SHARD_REQUIRED <= keys and keys <= _SHARD_FIELDS else data


@dataclass
class Manifest:
    """What a shard set holds and how it was made. Written as `manifest.json` beside the shards."""

    model_family: str
    encoders: dict[str, Any]
    encoder_fingerprint: str
    encoding: dict[str, Any]
    shapes: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    # The dataset's view of the cache: the keys of the last completed precompute run and their bucket histogram
    # ({"keys_file": ACTIVE_KEYS_NAME, ...}; an unmerged view lists each job's file in "keys_files"). Samples
    # outside it (old captions, removed clips) stay cached but are not trained on.
    active: dict[str, Any] = field(default_factory=dict)
    # The conditioning of the empty caption, for caption dropout: {"file": EMPTY_CAPTION_NAME, "sha256": ...}
    empty_caption: dict[str, Any] = field(default_factory=dict)
    # The prompt table (validation prompts and the negative prompt), in its own files: see common/shards/prompts.py
    # ({"folder": "prompts", "negative": <text_key>}; empty when the set has none)
    prompts: dict[str, Any] = field(default_factory=dict)
    # Whether the run that last wrote this manifest finished, and the dataset's samples it had not encoded yet
    # (bucket -> count). None: written by an ft before 0.2 that did not record it (judged from `active` on load).
    complete: bool | None = None
    missing: dict[str, int] = field(default_factory=dict)
    # Rejected inputs and inputs kept with a note: {"rejected": {"files": [...], "count": n, "kinds": {...}}, ...}
    inputs: dict[str, Any] = field(default_factory=dict)
    # The jobs of the run that wrote it (index, num_jobs, host, started, finished, samples written, shards).
    jobs: list[dict[str, Any]] = field(default_factory=list)
    # How to run precompute again on the same data and --out (the saved config), to complete the set.
    resume_command: str = ""
    schema_version: int = SCHEMA_VERSION
    tool: str = "ft"
    tool_version: str = __version__
    updated: str = ""

    # set on load, not saved: the folder, an older manifest's inline records, and a view of unmerged jobs
    folder: Path | None = field(default=None, repr=False, compare=False)
    completeness_guessed = False  # an older manifest without `complete`
    unmerged: dict[str, Any] | None = None
    _inline: dict[str, list] | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def bucket_histogram(self) -> dict[str, int]:
        """Samples per bucket over every shard (cached samples outside the active view included)."""
        total: Counter[str] = Counter()
        for s in self.shards:
            total.update(s.buckets)
        return dict(sorted(total.items()))

    def training_histogram(self) -> dict[str, int]:
        """Samples per bucket that training uses: the active view (less what is not encoded yet) when there is
        one, else every sample."""
        if not self.active:
            return self.bucket_histogram()
        counts = {b: n - self.missing.get(b, 0) for b, n in self.active["buckets"].items()}
        return {b: n for b, n in counts.items() if n > 0}

    @property
    def missing_samples(self) -> int:
        return sum(self.missing.values())

    def _records(self, kind: str) -> list[dict[str, Any]]:
        return list(self.iter_inputs(kind))

    def iter_inputs(self, kind: str) -> Iterator[dict[str, Any]]:
        """The records of `kind` ("rejected" or "warnings") one at a time: `ft inspect` of a million notes holds
        none of them."""
        if self._inline is not None:
            yield from self._inline.get(kind, [])
            return
        files = self.inputs.get(kind, {}).get("files", [])
        if self.folder is not None and files:
            yield from iter_records(self.folder, files)

    @property
    def rejected(self) -> list[dict[str, Any]]:
        """Every rejected input ({"path", "reason", "kind"}), read from its file."""
        return self._records("rejected")

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """Every input kept with a note, read from its file."""
        return self._records("warnings")

    def input_count(self, kind: str) -> int:
        if self._inline is not None:
            return len(self._inline.get(kind, []))
        return int(self.inputs.get(kind, {}).get("count", 0))

    def set_empty_caption(self, folder: str | Path, cond: dict[str, torch.Tensor], name: str = EMPTY_CAPTION_NAME
                          ) -> None:
        """Store the empty caption's conditioning (one sample, batch dimension dropped) beside the shards."""
        data = tensors_to_bytes(cond)
        write_atomic(Path(folder) / name, data)
        self.empty_caption = {"file": name, "sha256": hashlib.sha256(data).hexdigest()}

    def active_keys(self, folder: str | Path) -> set[str] | None:
        """The keys training uses, or None for all of them."""
        if not self.active:
            return None
        keys: set[str] = set()
        for name in self.active.get("keys_files") or [self.active["keys_file"]]:
            path = Path(folder) / name
            if not path.is_file():
                raise UserError(f"{path} is missing; rerun `ft precompute` with the same --out to rewrite it.")
            keys.update(path.read_text().split())
        return keys

    def save(self, folder: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written manifest."""
        self.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _TRANSIENT}
        data["shards"] = [dataclasses.asdict(s) for s in self.shards]
        path = Path(folder) / MANIFEST_NAME
        write_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """`manifest.json` alone, as the last merge wrote it (no unmerged jobs looked at: journal.load_manifest
        does)."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            if not Path(folder).exists():
                raise UserError(f"{folder}: no such shard folder. Run `ft precompute ... --out {folder}` first.")
            raise UserError(f"{folder} has no {MANIFEST_NAME}: it is not a shard set written by `ft precompute`.")
        try:
            data = json.loads(path.read_text(), object_hook=_shard_entry)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}): delete it and rerun `ft precompute` with the same "
                            "--out; the shards there are adopted, not encoded again.") from e
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"{path} has schema version {version}; this ft reads version {SCHEMA_VERSION}. "
                            "Re-encode with this version of `ft precompute`.")
        shards = data.setdefault("shards", [])
        for i, entry in enumerate(shards):  # what `_shard_entry` left (an entry with a field a newer ft added)
            if isinstance(entry, dict):
                shards[i] = ShardInfo.from_json(entry)
        guessed = "complete" not in data
        if guessed:  # ft 0.1 recorded the training view only when a run finished
            data["complete"] = bool(data.get("active"))
        inline = {k: data[k] for k in INPUT_FILES if isinstance(data.get(k), list)}  # before rejected.jsonl
        known = {f.name for f in dataclasses.fields(cls)} - set(_TRANSIENT)
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest.folder, manifest.completeness_guessed = Path(folder), guessed
        if inline:
            manifest._inline = inline
        return manifest

    def describe_completeness(self) -> str:
        """One line: complete, or how much of the dataset is missing and how to encode it."""
        if self.unmerged is not None:
            return self.unmerged["status"]
        if self.complete:
            note = " (an older manifest without the field: judged from its training view)" \
                if self.completeness_guessed else ""
            return f"complete{note}"
        how = f"`{self.resume_command}`" if self.resume_command else "`ft precompute` again with the same flags"
        if self.completeness_guessed:
            return (f"INCOMPLETE: written by an older ft whose run did not finish (no training view); run {how} "
                    "to complete it")
        count = f"{self.missing_samples} samples of the dataset are not encoded yet" if self.missing else \
            "the run that wrote it did not finish"
        return f"INCOMPLETE: {count}; run {how} to complete it"


def require_complete(manifest: Manifest, folder: str | Path, allow_incomplete: bool = False) -> None:
    """Refuse to train on a shard set whose precompute run did not finish, naming the command that completes it;
    with `allow_incomplete`, warn with the count instead. A set whose jobs all finished but were not merged is
    refused either way, with the command that merges it (it takes seconds)."""
    if manifest.complete and manifest.unmerged is None:
        return
    status = manifest.describe_completeness()
    if manifest.unmerged is not None and manifest.unmerged.get("all_finished"):
        raise UserError(f"{folder} is {status}.")
    if not allow_incomplete:
        raise UserError(f"{folder} is {status}. Training on it would see only part of the dataset (some buckets "
                        "may be empty); or pass --allow-incomplete to train on what is there.")
    from ..logs import log

    usable = sum(manifest.training_histogram().values())
    log.warning(f"--allow-incomplete: {folder} is {status}; training on the {usable} samples encoded so far")


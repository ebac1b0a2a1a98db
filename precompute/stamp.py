"""A rerun on unchanged inputs that costs a stat per file and imports no model code: the run's stamp.

When a job (a single run, or job i of N) has finished, it records in `cache/run-<job>.json` a digest of
everything its output depends on: the resolved config, the ft version, the stat signature (size, mtime, inode)
of every file under the dataset folder, under `--pretrained` and every other path the config names (component
folders, a dataset config), and of each media file it planned that lies outside the dataset folder. Once the
set is merged and complete, the merge (by whichever job finishes last, or `--finalize`) seals the stamps of the
jobs it merged with the sha256 of the merged manifest.json: a job that is not the last has no final manifest to
name. The next run of a job with the same config first recomputes that digest (a walk and a stat per file, as
`git status` does): when it matches, the manifest is unchanged and every listed shard is there, nothing can
have changed, and the run says so and stops before loading torch, diffusers or a tokenizer. Anything else (a
file touched, a shard lost, another run into the set, a hub id whose files are not local paths) takes the full
path, which is correct on its own; the stamp only skips work whose result is known. A job whose rerun changed
the set (and merged it again) leaves the other jobs' stamps naming the old manifest: they plan once more.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ft.common import __version__
from ft.common.config import to_jsonable
from ft.common.shards import MANIFEST_NAME, Manifest, read_states, write_atomic

from .datasets import dataset_root
from .media_cache import CACHE_DIR

MODEL_FIELDS = ("pretrained",)  # and every field ending in "_id": where a component comes from


def _files(root: Path, skip: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if (here / d).resolve() != skip)
        for name in sorted(files):
            yield here / name


def inputs_digest(values: dict[str, Any], out: Path, outside: list[str]) -> str | None:
    """The digest of the config and the stat of every input file, or None when an input is not a local path
    (a hub id: its files are not ours to stat)."""
    h = hashlib.sha256(json.dumps({"config": values, "ft": __version__}, sort_keys=True, default=str).encode())
    skip = out.resolve()
    for name, value in sorted(values.items()):
        if name == "out" or not isinstance(value, str) or not value:
            continue
        is_model = name in MODEL_FIELDS or name.endswith("_id")
        if not Path(value).exists():
            if is_model:
                return None
            continue
        # a dataset given as a metadata file (CSV, JSON): its media live in its folder, stat'ed too
        for path in _files(dataset_root(value) if name == "dataset" else Path(value), skip):
            try:
                st = os.stat(path)
            except OSError:
                return None
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    for path in outside:
        try:
            st = os.stat(path)
        except OSError:
            return None
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


def _stamp_path(out: Path, stem: str) -> Path:
    return out / CACHE_DIR / f"run-{stem}.json"


def _values(cfg: Any) -> dict[str, Any]:
    values = to_jsonable(cfg)
    for name in ("num_jobs", "job_index", "finalize"):
        values.pop(name, None)
    return values


def write_stamp(cfg: Any, out: Path, stem: str, outside: list[str]) -> None:
    """Record this job's inputs, unsealed: `seal_stamps` adds the manifest once the set is merged."""
    digest = inputs_digest(_values(cfg), out, outside)
    path = _stamp_path(out, stem)
    if digest is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"inputs": digest, "manifest": None, "outside": outside}) + "\n")


def seal_stamps(out: Path, stems: list[str]) -> None:
    """After a complete merge: name the merged manifest in the unsealed stamps of the jobs merged."""
    manifest = None
    for stem in stems:
        path = _stamp_path(out, stem)
        try:
            stamp = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(stamp, dict) and stamp.get("manifest") is None:
            manifest = manifest or hashlib.sha256((out / MANIFEST_NAME).read_bytes()).hexdigest()
            write_atomic(path, json.dumps({**stamp, "manifest": manifest}) + "\n")


def unchanged(cfg: Any, out: Path, stem: str) -> Manifest | None:
    """The set's manifest when nothing this run depends on changed since the stamp was written, else None."""
    path = _stamp_path(out, stem)
    if not path.is_file() or not (out / MANIFEST_NAME).is_file() or read_states(out):
        return None
    try:
        stamp = json.loads(path.read_text())
        if not stamp["manifest"] or hashlib.sha256((out / MANIFEST_NAME).read_bytes()).hexdigest() != \
                stamp["manifest"]:
            return None
        if inputs_digest(_values(cfg), out, list(stamp.get("outside", []))) != stamp["inputs"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    manifest = Manifest.read(out)
    if not manifest.complete or any(not (out / s.name).is_file() for s in manifest.shards):
        return None
    return manifest

"""The partial manifests of `ft precompute` jobs sharing one `--out`, and the merged view of them.

Job i of N writes only files of its own under `OUT/jobs/` (stem `job-000i-of-000N`): its state (`.json`: the
encoders, what it planned and had to encode, its counts, complete or not), its journal (`.shards.jsonl`: one line
per shard it finished, appended and fsynced as each shard is renamed into place, so nothing is rewritten per
shard), its active keys (`.active.txt`), its rejected and noted inputs (`.rejected.jsonl`, `.warnings.jsonl`),
its config and its lock; job 0 also stores the empty caption's conditioning when the set lacks it. Its shards are
`shard-j000i-NNNNNN.tar` (a single run, N = 1, keeps `shard-NNNNNN.tar`).

`merged_view` folds the states and journals into the last merged `manifest.json` in memory: the shards listed
there (less those a job found lost) plus every journal's, the jobs' keys as the training view, what is still
missing, and a status that names what to run. The last job to finish writes that view as the new manifest and
removes the job files (precompute/merge.py); until then `load_manifest` returns the view, marked `unmerged`, so
`ft train` (through `open_shard_set`) and `ft inspect` say the set is not merged and what to run. This module
stands on manifest.py, never under it: `Manifest.read` is the merged manifest alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .liveness import alive, read_lock
from .manifest import INPUT_FILES, MANIFEST_NAME, Manifest, ShardInfo, write_atomic

JOBS_DIR = "jobs"
_STATE_NAME = re.compile(r"^job-(\d{4})-of-(\d{4})\.json$")


def job_stem(index: int, num_jobs: int) -> str:
    return f"job-{index:04d}-of-{num_jobs:04d}"


def finalize_command(folder: str | Path) -> str:
    return f"ft precompute --finalize --out {folder}"


@dataclass
class JobState:
    """One job's partial manifest: what it is, what it planned, and whether it finished."""

    index: int
    num_jobs: int
    attempt: str  # unique per start of the job: journal lines of this attempt count against `todo`
    host: str
    pid: int
    started: str
    # model_family, encoders, encoder_fingerprint, encoding, shapes, empty_caption, prompts: as in the manifest
    header: dict[str, Any] = field(default_factory=dict)
    resume_command: str = ""
    todo: dict[str, int] = field(default_factory=dict)  # bucket -> samples this attempt had to encode
    active: dict[str, Any] = field(default_factory=dict)  # {"file", "samples", "buckets"} of its slice
    dropped: list[str] = field(default_factory=list)  # listed shards it found lost or unreadable
    inputs: dict[str, Any] = field(default_factory=dict)  # like Manifest.inputs, over this job's files
    complete: bool = False
    finished: str = ""
    written: int = 0

    @property
    def stem(self) -> str:
        return job_stem(self.index, self.num_jobs)

    def file(self, suffix: str) -> str:
        """A file of this job, relative to the shard folder: `jobs/job-0003-of-0008<suffix>`."""
        return f"{JOBS_DIR}/{self.stem}{suffix}"

    def save(self, folder: str | Path) -> None:
        (Path(folder) / JOBS_DIR).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(folder) / self.file(".json"), json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> JobState:
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as e:
            raise UserError(f"{path} is damaged ({e}); rerun that job (or delete the file and rerun it).") from e

    def summary(self, journal: list[tuple[str, ShardInfo]]) -> dict[str, Any]:
        """What `ft inspect` shows of a job, and the merged manifest keeps."""
        mine = [s for attempt, s in journal if attempt == self.attempt]
        return {"index": self.index, "num_jobs": self.num_jobs, "attempt": self.attempt, "host": self.host,
                "pid": self.pid, "started": self.started, "finished": self.finished, "complete": self.complete,
                "written": sum(s.samples for s in mine), "shards": len(mine)}


def append_journal(folder: str | Path, state: JobState, info: ShardInfo) -> None:
    """Record a finished shard in the job's journal: one appended line, on disk before this returns."""
    line = json.dumps({"attempt": state.attempt, **dataclasses.asdict(info)}, separators=(",", ":")) + "\n"
    with open(Path(folder) / state.file(".shards.jsonl"), "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_journal(folder: str | Path, stem: str) -> list[tuple[str, ShardInfo]]:
    """(attempt, shard) for each line of a job's journal; a line torn by a kill is skipped."""
    path = Path(folder) / JOBS_DIR / f"{stem}.shards.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
            out.append((data.pop("attempt", ""), ShardInfo.from_json(data)))
        except (ValueError, TypeError, AttributeError):
            continue
    return out


def read_states(folder: str | Path) -> list[JobState]:
    """The job states not merged yet, by (num_jobs, index)."""
    jobs = Path(folder) / JOBS_DIR
    if not jobs.is_dir():
        return []
    paths = sorted(p for p in jobs.iterdir() if _STATE_NAME.match(p.name))
    states = sorted((JobState.load(p) for p in paths), key=lambda s: (s.num_jobs, s.index))
    merged = merged_attempts(folder) if states else set()
    return [s for s in states if s.attempt not in merged]


def merged_attempts(folder: str | Path) -> set[str]:
    """The job attempts the manifest says it merged: their states, still there, are leftovers of a merge killed
    while it removed the job files (the manifest is written first), not jobs to merge again."""
    path = Path(folder) / MANIFEST_NAME
    try:
        jobs = json.loads(path.read_text()).get("jobs") or []
    except (OSError, ValueError):
        return set()
    return {j["attempt"] for j in jobs if isinstance(j, dict) and j.get("attempt")}


def merge_leftovers(folder: str | Path) -> list[str]:
    """The stems of merged jobs whose files a killed merge left behind: a state the manifest lists as merged (see
    `merged_attempts`), or job files with no state at all (the merge removes each state first). Called when no
    job is left to merge."""
    jobs = Path(folder) / JOBS_DIR
    if not jobs.is_dir():
        return []
    merged = merged_attempts(folder)
    states = {p.name[: -len(".json")]: JobState.load(p) for p in jobs.iterdir() if _STATE_NAME.match(p.name)}
    stems = {p.name.split(".", 1)[0] for p in jobs.iterdir() if p.name.startswith("job-") and ".lock" not in p.name}
    return sorted(stem for stem in stems if stem not in states or states[stem].attempt in merged)


def _sum(histograms: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for h in histograms:
        total.update(h)
    return {b: n for b, n in sorted(total.items()) if n > 0}


def _status(folder: Path, run: list[JobState], num_jobs: int, stale: list[JobState], missing: int) -> str:
    unfinished = [s for s in run if not s.complete]
    not_started = sorted(set(range(num_jobs)) - {s.index for s in run})
    if not unfinished and not not_started and not stale:
        return (f"NOT MERGED: all {num_jobs} job(s) finished but the set is not merged yet; run "
                f"`{finalize_command(folder)}` to merge it (it takes seconds)")
    parts = [f"INCOMPLETE: {missing} samples of the started jobs are not encoded yet" if missing else
             "INCOMPLETE: not every job has finished"]
    running = [s for s in unfinished if _running(folder, s)]
    stopped = [s for s in unfinished if s not in running]
    finished = [s.index for s in run if s.complete]
    if finished:
        parts.append(f"job(s) {', '.join(map(str, finished))} of {num_jobs} finished")
    if running:
        parts.append(f"job(s) {', '.join(str(s.index) for s in running)} of {num_jobs} are still running (job "
                     f"{running[0].index}: host {running[0].host}, pid {running[0].pid}): wait for them")
    if stopped:
        first = stopped[0]
        parts.append(f"job(s) {', '.join(str(s.index) for s in stopped)} of {num_jobs} stopped before finishing: "
                     f"rerun each (job {first.index}: `{first.resume_command}`)")
    if not_started:
        parts.append(f"job(s) {', '.join(map(str, not_started))} of {num_jobs} have not run: run them with "
                     f"--num-jobs {num_jobs} --job-index I")
    if stale:
        parts.append(f"{len(stale)} job(s) of an earlier run with --num-jobs {stale[0].num_jobs} are unmerged "
                     f"(merge what they wrote with `{finalize_command(folder)} --allow-incomplete`)")
    return "; ".join(parts) + "; the set is merged when the last job finishes"


def _running(folder: Path, state: JobState) -> bool:
    """Whether the job still runs: the lock of its slot names a live process (common/shards/liveness.py)."""
    holder = read_lock(folder / JOBS_DIR / f"{state.stem}.lock")
    return holder == {} or (holder is not None and alive(holder))


def merged_view(folder: str | Path, base: Manifest | None, states: list[JobState]) -> Manifest:
    """The shard set as it would be if the jobs were merged now; `unmerged` says what is left to do."""
    folder = Path(folder)
    num_jobs = max(states, key=lambda s: s.started).num_jobs  # the run started last is the current one
    run = [s for s in states if s.num_jobs == num_jobs]
    stale = [s for s in states if s.num_jobs != num_jobs]
    header = dict(run[0].header)
    if base is not None:
        header = {"model_family": base.model_family, "encoders": base.encoders, "shapes": base.shapes,
                  "encoder_fingerprint": base.encoder_fingerprint,
                  "encoding": run[0].header.get("encoding") or base.encoding,  # the run's: its keys are active
                  "empty_caption": base.empty_caption if base.empty_caption and
                  (folder / base.empty_caption["file"]).is_file() else {}, "prompts": base.prompts}
    for s in states:
        if s.header.get("encoder_fingerprint") != header.get("encoder_fingerprint"):
            raise UserError(f"{folder / s.file('.json')}: job {s.index} of {s.num_jobs} encoded with other encoders "
                            f"(fingerprint {str(s.header.get('encoder_fingerprint'))[:12]}, the set's is "
                            f"{str(header.get('encoder_fingerprint'))[:12]}); the two cannot be mixed. Delete that "
                            "job's files and its shards (shard-j...), or use a new --out.")
        header["shapes"] = header.get("shapes") or s.header.get("shapes") or {}
        header["empty_caption"] = header.get("empty_caption") or s.header.get("empty_caption") or {}
        header["prompts"] = s.header.get("prompts") or header.get("prompts") or {}  # a job may add rows
    dropped = {name for s in states for name in s.dropped}
    shards = [s for s in (base.shards if base else []) if s.name not in dropped]
    listed = {s.name for s in shards}
    journals = {s.stem: read_journal(folder, s.stem) for s in states}
    for s in states:
        for _, info in journals[s.stem]:
            if info.name not in listed:
                shards.append(info)
                listed.add(info.name)
    missing = _sum([{b: n - sum(i.buckets.get(b, 0) for a, i in journals[s.stem] if a == s.attempt)
                     for b, n in s.todo.items()} for s in run if not s.complete])
    inputs = {}
    for kind in INPUT_FILES:
        parts = [s.inputs.get(kind, {}) for s in run]
        inputs[kind] = {"files": [f for p in parts for f in p.get("files", [])],
                        "count": sum(p.get("count", 0) for p in parts),
                        "kinds": _sum([p.get("kinds", {}) for p in parts])}
    active = {"keys_files": [s.active["file"] for s in run if s.active],
              "samples": sum(s.active.get("samples", 0) for s in run),
              "buckets": _sum([s.active.get("buckets", {}) for s in run])}
    status = _status(folder, run, num_jobs, stale, sum(missing.values()))
    all_finished = status.startswith("NOT MERGED")
    unfinished = next((s for s in run if not s.complete), None)
    manifest = Manifest(model_family=header["model_family"], encoders=header["encoders"],
                        encoder_fingerprint=header["encoder_fingerprint"], encoding=header["encoding"],
                        shapes=header["shapes"], shards=shards, active=active,
                        empty_caption=header["empty_caption"], prompts=header["prompts"], complete=all_finished,
                        missing=missing,
                        inputs=inputs, jobs=[s.summary(journals[s.stem]) for s in run],
                        resume_command=unfinished.resume_command if unfinished else "")
    manifest.folder = folder
    manifest.unmerged = {"status": status, "all_finished": all_finished, "num_jobs": num_jobs,
                         "merge_command": finalize_command(folder), "stale": len(stale)}
    return manifest


def load_manifest(folder: str | Path) -> Manifest:
    """The shard set as it stands: its manifest, or while jobs under `jobs/` are not merged yet, the merged view of
    what they wrote, with `unmerged` saying what to run."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such shard folder. Run `ft precompute ... --out {folder}` first.")
    states = read_states(folder)
    if states:
        return merged_view(folder, Manifest.read(folder) if (folder / MANIFEST_NAME).is_file() else None, states)
    return Manifest.read(folder)


def open_shard_set(folder: str | Path) -> tuple[Manifest, list[Path]]:
    """The manifest (`load_manifest`) and the shard paths of a shard set, checking that every listed shard is
    there."""
    manifest = load_shard_set(folder)
    return manifest, [Path(folder) / s.name for s in manifest.shards]


def load_shard_set(folder: str | Path) -> Manifest:
    """The manifest of a shard set (`load_manifest`), checking that every listed shard is there (a stat each, no
    path object: 39k shards at 10M samples)."""
    manifest = load_manifest(folder)
    missing = [s.name for s in manifest.shards if not os.path.isfile(os.path.join(folder, s.name))]
    if missing:
        raise UserError(f"{folder}: {len(missing)} shard(s) listed in {MANIFEST_NAME} are missing "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Rerun `ft precompute` "
                        "with the same --out to rebuild them.")
    if not manifest.shards:
        if not manifest.complete or manifest.unmerged is not None:  # nothing written yet: say what is left to do
            raise UserError(f"{folder} holds no samples yet: it is {manifest.describe_completeness()}.")
        raise UserError(f"{folder} holds no samples (every input was rejected?); see `ft inspect {folder}`.")
    return manifest

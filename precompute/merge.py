"""Merging the jobs of one `--out` into one shard set: done by the last job to finish, or by
`ft precompute --finalize --out SHARDS`.

The merge takes `jobs/merge.lock`, reads the jobs' states and journals (common/shards/journal.py `merged_view`) and
writes, each atomically: `active_keys.txt` (every job's keys, each once), `rejected.jsonl` and `warnings.jsonl`
(the jobs' files one after another, summarised in the manifest), the empty caption's conditioning (job 0's),
`precompute_config.json` (job 0's, as a single run), the media cache, the set's index (`set_index.bin`, which
`ft train` maps instead of reading every shard's `.idx`: common/shards/set_index.py; the rows of the shards the
last merge listed are copied from its index, only the new shards' `.idx` files are read), and last `manifest.json`,
listing every shard and the jobs that wrote them. Then it removes the job files, each state first: a merge killed
half-way is merged again by the next one (shards are taken by name, so nothing is listed twice).

Every job runs the check when it finishes: once its own state says complete, it merges if every job of its run
has finished. Two jobs finishing at once: the merge lock lets one merge while the other waits, then looks again
(the first may have read its state before it said complete), so the last job to finish always sees every state.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ft.common.errors import UserError
from ft.common.faults import FAULTS, fault_message
from ft.common.logs import log
from ft.common.shards import (
    ACTIVE_KEYS_NAME,
    EMPTY_CAPTION_NAME,
    INPUT_FILES,
    JOBS_DIR,
    MANIFEST_NAME,
    Manifest,
    PreviousIndex,
    ShardInfo,
    iter_shard,
    kill_point,
    load_manifest,
    merge_leftovers,
    merged_view,
    read_states,
    shard_rows,
    write_atomic,
    write_set_index,
)

from .consistency import check_jobs_agree
from .job_slots import JobSlot, Lock, describe_holder, job_config_path, live_locks
from .media_cache import merge_cache_files
from .spill import write_unique
from .stamp import seal_stamps

CONFIG_NAME = "precompute_config.json"
MERGE_WAIT_S = 600  # how long a finishing job waits for another process's merge before leaving it


def _concat(out: Path, files: list[str], target: str) -> int:
    """Append the lines of `files` into `target` (a new file, replaced atomically); returns the line count."""
    tmp = out / (target + ".tmp")
    count = 0
    try:
        with open(tmp, "w") as dst:
            for name in files:
                path = out / name
                if path.is_file():
                    with open(path) as src:
                        for line in src:
                            if line.strip():
                                dst.write(line if line.endswith("\n") else line + "\n")
                                count += 1
        os.replace(tmp, out / target)
    except BaseException:  # a full disk, say: its partial copy is not left on it
        tmp.unlink(missing_ok=True)
        raise
    return count


def _merge_active(out: Path, files: list[str]) -> tuple[int, set[str]]:
    """`active_keys.txt` from the jobs' key files, each key once (in flat memory: spill.py); returns the number of
    keys, and the keys that more than one job holds (a job drops its own duplicates: these are one media under two
    names that two jobs own, each of which encoded it)."""
    count, repeated = write_unique([out / name for name in files], out / ACTIVE_KEYS_NAME,
                                   lambda line: line.strip() or None, keep_last=False)
    return count, set(repeated)


def _duplicate_notes(out: Path, shards: list[ShardInfo], keys: set[str]) -> list[dict[str, str]]:
    """The warnings a single job gives for exact duplicates, for `keys` found in several jobs: each later source
    named beside the first (read from the samples' JSON; only the shards holding such keys are opened)."""
    sources: dict[str, list[str]] = {}
    for info in shards:
        path = out / info.name
        if not keys & {r.key for r in shard_rows(path, info)}:
            continue
        for sample in iter_shard(path, wanted=keys.__contains__):
            found = sources.setdefault(sample.key, [])
            if sample.meta.get("source") not in found:
                found.append(sample.meta.get("source"))
    return [{"path": later, "reason": f"same media bytes, frames and caption as {names[0]}; trained once (two "
             "jobs own the two names, so both encoded it)", "kind": "duplicate"}
            for _, names in sorted(sources.items()) for later in names[1:]]


def _merge_config(out: Path, stem: str) -> str:
    """Job 0's saved config, as a single run's (no job index), to `precompute_config.json`."""
    path = job_config_path(out, stem)
    if path.is_file():
        values = json.loads(path.read_text())
        for name in ("num_jobs", "job_index"):
            values.pop(name, None)
        write_atomic(out / CONFIG_NAME, json.dumps(values, indent=2) + "\n")
    return f"ft precompute --config {(out / CONFIG_NAME).resolve()}"


def finalize(out: Path, allow_incomplete: bool = False, own: JobSlot | None = None) -> Manifest | None:
    """Merge the jobs of `out` into its manifest. `own`: the job asking, at its end; it waits for another
    process's merge, then steps aside (None) when the set is not ready. From the command line, what is in the way
    is an error."""
    lock = Lock(out / JOBS_DIR / "merge.lock", "a merge of the jobs")
    waited = time.monotonic()
    while True:
        try:
            lock.acquire()
            break
        except UserError:
            # a job at its end waits for the merge in progress (seconds) and then looks again: that merge may have
            # read this job's state before it said complete, and found the set not ready
            if own is None:
                raise
            if time.monotonic() - waited > MERGE_WAIT_S:
                log.info(f"another process has been merging the set for {MERGE_WAIT_S}s; not waiting for it")
                return None
            time.sleep(0.2)
    try:
        states = read_states(out)
        if not states:
            leftovers = merge_leftovers(out)
            if leftovers:  # a merge killed after writing the manifest: finish removing what it merged
                _remove_merged(out, leftovers, leftovers if Manifest.read(out).complete else [])
                log.info(f"finished the merge of {out} that was stopped after writing its manifest "
                         f"({len(leftovers)} job(s))")
            elif own is None:
                log.info(f"{out} has no jobs to merge: it is merged")
            return load_manifest(out)
        base = Manifest.read(out) if (out / MANIFEST_NAME).is_file() else None
        view = merged_view(out, base, states)
        running = [h for h in live_locks(out) if not any(
            s.complete and (s.index, s.num_jobs) == (h.get("index"), h.get("num_jobs")) for s in states)]
        running = [h for h in running if own is None or (h.get("index"), h.get("num_jobs")) != (own.index,
                                                                                             own.num_jobs)]
        if running:
            if own is not None:
                return None
            raise UserError(f"{out}: {describe_holder(running[0])} is still running; merge once it has finished.")
        if not view.complete and not allow_incomplete:
            if own is not None:
                return None
            raise UserError(f"{out} cannot be merged yet: {view.describe_completeness()}. Or pass "
                            "--allow-incomplete to merge what is there (the set is then marked incomplete).")
        check_jobs_agree(out, states, view.unmerged["num_jobs"])
        previous = PreviousIndex.open(out, base)  # before the view is rewritten: its rows of the kept shards
        try:
            return _write_merged(out, view, states, previous)
        finally:
            if previous is not None:
                previous.close()
    finally:
        lock.release()


def _write_merged(out: Path, view: Manifest, states: list, previous: PreviousIndex | None) -> Manifest:
    run = [s for s in states if s.num_jobs == view.unmerged["num_jobs"]]
    samples, repeated = _merge_active(out, view.active["keys_files"])
    inputs = {}
    for kind, name in INPUT_FILES.items():
        count = _concat(out, view.inputs[kind]["files"], name)
        inputs[kind] = {"files": [name], "count": count, "kinds": view.inputs[kind]["kinds"]}
    if repeated:
        notes = _duplicate_notes(out, view.shards, repeated)
        with open(out / INPUT_FILES["warnings"], "a") as f:
            f.write("".join(json.dumps(n) + "\n" for n in notes))
        kinds = inputs["warnings"]["kinds"]
        inputs["warnings"] = {**inputs["warnings"], "count": inputs["warnings"]["count"] + len(notes),
                              "kinds": dict(sorted({**kinds, "duplicate": kinds.get("duplicate", 0) + len(notes)}
                                                   .items()))}
        for n in notes:
            log.info(f"{n['path']}: {n['reason']}")
    if view.empty_caption and view.empty_caption["file"].startswith(JOBS_DIR + "/"):
        moved = out / view.empty_caption["file"]
        if moved.is_file() or not (out / EMPTY_CAPTION_NAME).is_file():  # else a killed merge moved it already
            os.replace(moved, out / EMPTY_CAPTION_NAME)
        kill_point("empty-caption-moved")
        view.empty_caption = {**view.empty_caption, "file": EMPTY_CAPTION_NAME}
    resume = _merge_config(out, run[0].stem)
    merge_cache_files(out)
    manifest = Manifest(model_family=view.model_family, encoders=view.encoders,
                        encoder_fingerprint=view.encoder_fingerprint, encoding=view.encoding, shapes=view.shapes,
                        shards=view.shards, active={"keys_file": ACTIVE_KEYS_NAME, "samples": samples,
                                                    "buckets": view.active["buckets"]},
                        empty_caption=view.empty_caption, prompts=view.prompts, complete=view.complete,
                        missing=view.missing,
                        inputs=inputs, jobs=view.jobs, resume_command=resume)
    write_set_index(out, manifest, previous)  # before the manifest: a reader of it finds its index in place
    kill_point("set-index-written")
    manifest.save(out)
    kill_point("merged")
    _remove_merged(out, [s.stem for s in states], [s.stem for s in run] if manifest.complete else [])
    log.info(f"merged {len(run)} job(s) into {out / MANIFEST_NAME}: {manifest.num_samples} samples in "
             f"{len(manifest.shards)} shards" + ("" if manifest.complete else " (incomplete)"))
    return load_manifest(out)


def _remove_merged(out: Path, stems: list[str], sealed: list[str]) -> None:
    """The merged jobs' files, each state first (a state the manifest lists as merged is a leftover, never merged
    again: common/shards/journal.py `merged_attempts`), then their stamps sealed: an unchanged rerun of any of the
    `sealed` jobs can now stop after a stat of its inputs. A merge killed in here is finished by the next one."""
    for stem in stems:
        (out / JOBS_DIR / f"{stem}.json").unlink(missing_ok=True)
        kill_point("merge-state-removed")
    for stem in stems:
        remove_job_files(out, stem)
        kill_point("merge-files-removed")
    if sealed:
        seal_stamps(out, sealed)


def remove_job_files(out: Path, stem: str) -> None:
    """A merged job's files (its lock and stale-lock leftovers apart, which their owners remove)."""
    for path in (out / JOBS_DIR).glob(f"{stem}.*"):
        if ".lock" not in path.name:
            path.unlink(missing_ok=True)


def finalize_command_line(argv: list[str]) -> Manifest | None:
    """`ft precompute --finalize --out SHARDS [--allow-incomplete]`."""
    out, allow, rest = None, False, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--finalize":
            continue
        if arg == "--allow-incomplete":
            allow = True
        elif arg == "--out" and rest:
            out = rest.pop(0)
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
        else:
            raise UserError(f"`ft precompute --finalize` takes --out SHARDS (and --allow-incomplete), not {arg!r}.")
    if out is None:
        raise UserError("`ft precompute --finalize` needs --out SHARDS: the folder the jobs wrote.")
    if not Path(out).is_dir():
        raise UserError(f"--out {out}: no such folder.")
    if not (Path(out) / JOBS_DIR).is_dir() and not (Path(out) / MANIFEST_NAME).is_file():  # touch nothing there
        raise UserError(f"--out {out} holds neither {MANIFEST_NAME} nor {JOBS_DIR}/: it is not a shard set written "
                        "by `ft precompute`; pass the --out the jobs wrote.")
    try:
        manifest = finalize(Path(out), allow)
    except OSError as e:  # a full disk, say: a merge stopped anywhere is finished by the next one
        if e.errno not in FAULTS:
            raise
        raise UserError(f"{fault_message(e, f'--out {out}')} Then run `ft precompute --finalize --out {out}` "
                        "again: it merges what the jobs wrote (or finishes the merge that was stopped).") from None
    if manifest is not None:
        log.info(f"{out}: {manifest.describe_completeness()}")
    return manifest

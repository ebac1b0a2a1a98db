"""The jobs of one shard set encode with the same parameters, or they do not merge.

N jobs writing into one `--out` each save their encoding parameters in their state (`header["encoding"]` and the
encoders' fingerprints): everything that enters the sample keys and the captions: the buckets, the caption
shaping (`--id-token`, `--strip-llm-prefixes`), the frame sampling, the resize mode, the text length, the
family's encoding choices and the encoders (their fingerprints, dtypes included). A job resubmitted with other
flags would otherwise merge silently into a set marked complete that holds two encodings (clips at two sizes,
half of them without the trigger word) while `ft inspect` shows one.

The check runs twice:
- when a job starts (`check_job_start`, before any encoder loads): against the states of the other jobs of its run
  already in `--out`; it names each differing flag with both values and the command that makes them agree (the
  other job's saved config, with this job's index);
- at the merge (`check_jobs_agree`): two jobs that started at once both passed the first check, so the merge
  compares every state again and refuses to write a manifest over two encodings, naming the jobs and the fix.

A merged set from an earlier run is not compared: a new run into it (other buckets, say) is another experiment
on the same encoders, which the cache is for; its jobs then agree with each other, and the merged manifest
records their encoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.common.shards import JOBS_DIR, JobState, job_stem, sample_key

from .job_slots import job_config_path


def caption_shaping(id_token: str | None, strip_llm_prefixes: bool) -> dict[str, Any]:
    """How captions were shaped before encoding: recorded with the encoding (it does not enter the keys, the
    captions it makes do)."""
    return {"id_token": id_token, "strip_llm_prefixes": bool(strip_llm_prefixes)}


def _buckets(encoding: dict[str, Any]) -> str:
    return " ".join("x".join(map(str, b)) for b in encoding.get("buckets") or [])


def _flag_values(header: dict[str, Any]) -> dict[str, str]:
    """What a job encoded with, as the flags that set it: flag -> its value as typed."""
    enc = header.get("encoding") or {}
    captions = enc.get("captions") or {}
    values = {
        "--buckets": _buckets(enc),
        "--id-token": captions.get("id_token") or "(none)",
        "--strip-llm-prefixes": "on" if captions.get("strip_llm_prefixes") else "off",
        "--frame-sampling": str(enc.get("frame_sampling")),
        "--frame-stride": str(enc.get("frame_stride")),
        "--resize-mode": str(enc.get("resize_mode")),
        "--max-sequence-length": str(enc.get("max_sequence_length")),
        "--vae-dtype": str(enc.get("vae_dtype")),
        "--text-encoder-dtype": str(enc.get("text_encoder_dtype")),
        "the family's encoding choices": str(enc.get("family_choices")),
    }
    encoders = header.get("encoders") or {}
    for name in sorted(encoders):
        values[f"the {name} (--pretrained or --{name.replace('_', '-')}-id)"] = sample_key(encoders[name])[:12]
    values["the encoders' fingerprint"] = str(header.get("encoder_fingerprint", ""))[:12]
    return values


def differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """`--buckets 9x32x32 here, 9x64x96 there` for each parameter that differs between two jobs' headers."""
    a, b = _flag_values(mine), _flag_values(theirs)
    found = [f"{flag} {a[flag]} against {b.get(flag)}" for flag in a if a[flag] != b.get(flag)]
    # the encoders' one fingerprint differs whenever one of them does: name it only when nothing finer did
    if len(found) > 1:
        found = [f for f in found if not f.startswith("the encoders' fingerprint")]
    return found


def _command(out: Path, other: JobState, index: int) -> str:
    config = job_config_path(out, other.stem).resolve()
    return f"ft precompute --config {config} --job-index {index}"


def check_job_start(out: Path, index: int, num_jobs: int, header: dict[str, Any], states: list[JobState]) -> None:
    """Refuse to start job `index` of `num_jobs` when another job of its run in `out` encoded with other
    parameters (called before any encoder loads)."""
    for other in states:
        if other.num_jobs != num_jobs or other.index == index:
            continue
        diff = differences(header, other.header)
        if diff:
            raise UserError(
                f"--out {out}: job {index} of {num_jobs} would encode with other parameters than job {other.index} "
                f"of {num_jobs} already there ({'; '.join(diff)}, this job's first). The jobs of one shard set must "
                f"agree, or the merged set would hold two encodings. Run this job with that job's flags: "
                f"`{_command(out, other, index)}` (or use another --out for another encoding). Nothing was "
                "encoded.")


def check_jobs_agree(out: Path, states: list[JobState], num_jobs: int) -> None:
    """Refuse to merge the jobs of a run that encoded with different parameters (jobs that started at once)."""
    run = sorted((s for s in states if s.num_jobs == num_jobs), key=lambda s: (s.started, s.index))
    if not run:
        return
    first = run[0]
    odd = [(s, differences(s.header, first.header)) for s in run[1:]]
    odd = [(s, d) for s, d in odd if d]
    if odd:
        s, diff = odd[0]
        others = ", ".join(str(o.index) for o, _ in odd)
        raise UserError(
            f"{out} cannot be merged: job(s) {others} of {num_jobs} encoded with other parameters than job "
            f"{first.index} (job {s.index}: {'; '.join(diff)}, its own first). Merged, the set would hold two "
            f"encodings. Rerun job {s.index} with job {first.index}'s flags: `{_command(out, first, s.index)}` (it "
            f"encodes again only what differs; the set merges when it finishes), or delete "
            f"{out / JOBS_DIR / job_stem(s.index, num_jobs)}.* and its shards to drop it.")

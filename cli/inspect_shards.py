"""`ft inspect`: a readable summary of a shard set from its manifest (and, with --verify, its bytes).

It shows the jobs that wrote a merged set, and a set whose jobs are not merged yet as such, with what to run.
Listed shards that are missing are named. `--verify` reads every shard (in parallel threads: hashing releases
the GIL), checks its sha256 and sample count against the manifest, and names each shard that fails; it decodes
no sample (reader.py `verify_shard`), and the rejected and noted inputs are counted a record at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

from ft.common.runtime import prefetch_map
from ft.common.shards.journal import load_manifest
from ft.common.shards.manifest import MANIFEST_NAME, Manifest, ShardInfo
from ft.common.shards.reader import ShardCorruptError, verify_shard
from ft.precompute.rejects import summarize_inputs


def _verify(folder: Path, shard: ShardInfo) -> str:
    """"" when the shard's bytes and sample count match its entry, else what is wrong."""
    try:
        n = verify_shard(folder / shard.name, shard.sha256)
    except (ShardCorruptError, OSError) as e:
        return str(e)
    return "" if n == shard.samples else f"{shard.name}: {n} samples, but {MANIFEST_NAME} says {shard.samples}"


def _jobs(manifest: Manifest) -> list[str]:
    lines = []
    for job in manifest.jobs:
        done = "finished " + job["finished"] if job.get("complete") else "NOT FINISHED"
        lines.append(f"  job {job['index']} of {job['num_jobs']}: {job.get('written', 0)} samples written in "
                     f"{job.get('shards', 0)} shards, host {job.get('host')} pid {job.get('pid')}, started "
                     f"{job.get('started')}, {done}")
    return lines


def describe(folder: str, verify: bool = False) -> str:
    """The summary of the shard set in `folder`; a folder holding shard sets (the `--out` of a precompute run with
    several datasets in its --dataset_config: `0-name/`, `1-name/`, ...) gets each one's summary in turn."""
    root = Path(folder)
    if root.is_dir() and not (root / MANIFEST_NAME).is_file():
        sets = sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file())
        if sets:
            parts = [f"{folder} holds {len(sets)} shard sets (one per dataset of a --dataset_config): "
                     f"{', '.join(p.name for p in sets)}"]
            return "\n\n".join(parts + [_describe(str(p), verify) for p in sets])
    return _describe(folder, verify)


def _describe(folder: str, verify: bool) -> str:
    manifest = load_manifest(folder)
    lines = [
        f"shard set      {folder}",
        f"model family   {manifest.model_family}",
        f"samples        {manifest.num_samples} in {len(manifest.shards)} shards, {manifest.num_bytes / 1e6:.2f} MB",
        f"encoders       fingerprint {manifest.encoder_fingerprint}",
        f"status         {manifest.describe_completeness()}",
    ]
    if manifest.jobs:
        lines.append(f"jobs           {len(manifest.jobs)}" + (" (not merged yet)" if manifest.unmerged else ""))
        lines += _jobs(manifest)
    lost = [s.name for s in manifest.shards if not (Path(folder) / s.name).is_file()]
    if lost:
        lines.append(f"MISSING        {len(lost)} listed shard(s) are not on disk: {', '.join(lost[:10])}"
                     f"{', ...' if len(lost) > 10 else ''}; rerun `ft precompute` with the same --out to rebuild "
                     "them")
    for name, info in manifest.encoders.items():
        detail = f"{info.get('class', '?')}"
        if "weights" in info:
            detail += f" weights {info['weights'][:12]} {info.get('dtype', '')}"
        if "vocab_size" in info:
            detail += f" vocab {info['vocab_size']}"
        if "files" in info:  # a tokenizer fingerprinted from its files
            detail += f" files {info['files'][:12]}"
        lines.append(f"  {name:12s} {detail}")
    enc = manifest.encoding
    lines.append(f"encoding       max_sequence_length {enc.get('max_sequence_length')}, frames "
                 f"{enc.get('frame_sampling')} stride {enc.get('frame_stride')}, {enc.get('resize_mode')}")
    for choice, value in (enc.get("family_choices") or {}).items():  # the family's own (ModelSpec.encoding_choices)
        lines.append(f"  {choice}: {value}")
    lines.append(f"shapes         {manifest.shapes}")
    if manifest.active:
        # the view counts the dataset's samples, encoded or not: while some are missing (an incomplete run),
        # the encoded ones are fewer, and only a surplus is cache from earlier runs
        encoded = manifest.active["samples"] - manifest.missing_samples
        cached = manifest.num_samples - encoded
        lines.append(f"training view  {manifest.active['samples']} samples of the dataset's last run"
                     + (f" ({encoded} encoded so far)" if manifest.missing_samples else "")
                     + (f"; {cached} more cached from earlier runs, not trained on" if cached > 0 else ""))
    lines.append("buckets (trained on)")
    for bucket, count in manifest.training_histogram().items():
        lines.append(f"  {bucket:14s}{count}")
    if manifest.missing:
        lines.append("not encoded yet (missing from training)")
        for bucket, count in sorted(manifest.missing.items()):
            lines.append(f"  {bucket:14s}{count}")
    if manifest.prompts:
        rows = len(list((Path(folder) / manifest.prompts["folder"]).glob("*.safetensors")))
        lines.append(f"prompt table   {rows - 1} validation prompt(s) and the negative prompt, in "
                     f"{manifest.prompts['folder']}/")
    lines.append(f"rejected       {manifest.input_count('rejected')}, kept with a note "
                 f"{manifest.input_count('warnings')}")
    summary = summarize_inputs(manifest.iter_inputs("rejected"), manifest.iter_inputs("warnings"), first=5)
    lines += ["  " + line for line in summary.splitlines()]
    if verify:
        present = [s for s in manifest.shards if s.name not in lost]
        problems = [p for p in prefetch_map(lambda s: _verify(Path(folder), s), present, os.cpu_count() or 1) if p]
        if problems or lost:
            raise ShardCorruptError("\n".join(lines) + f"\nverification failed: {len(problems)} damaged and "
                                    f"{len(lost)} missing shard(s)" + "".join(f"\n  {p}" for p in problems[:20]) +
                                    "\nDelete the damaged shards and rerun `ft precompute` with the same --out to "
                                    "rebuild them.")
        lines.append(f"verified       {len(manifest.shards)} shards: sha256 and sample counts match")
    lines.append(f"written by     {manifest.tool} {manifest.tool_version}, updated {manifest.updated}")
    return "\n".join(lines)

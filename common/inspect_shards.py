"""`ft inspect`: a readable summary of a shard set from its manifest (and, with --verify, its bytes)."""

from __future__ import annotations

from pathlib import Path

from .rejects import summarize_inputs
from .shards import MANIFEST_NAME, Manifest, ShardCorruptError, iter_shard


def describe(folder: str, verify: bool = False) -> str:
    manifest = Manifest.load(folder)
    lines = [
        f"shard set      {folder}",
        f"model family   {manifest.model_family}",
        f"samples        {manifest.num_samples} in {len(manifest.shards)} shards, {manifest.num_bytes / 1e6:.2f} MB",
        f"encoders       fingerprint {manifest.encoder_fingerprint}",
        f"status         {manifest.describe_completeness()}",
    ]
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
        cached = manifest.num_samples - manifest.active["samples"]
        lines.append(f"training view  {manifest.active['samples']} samples of the dataset's last run"
                     + (f"; {cached} more cached from earlier runs, not trained on" if cached else ""))
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
    lines.append(f"rejected       {len(manifest.rejected)}, kept with a note {len(manifest.warnings)}")
    summary = summarize_inputs(manifest.rejected, manifest.warnings, first=5)
    lines += ["  " + line for line in summary.splitlines()]
    if verify:
        for shard in manifest.shards:
            n = sum(1 for _ in iter_shard(Path(folder) / shard.name, expected_sha256=shard.sha256))
            if n != shard.samples:
                raise ShardCorruptError(f"{shard.name}: {n} samples, but {MANIFEST_NAME} says {shard.samples}; "
                                        "rerun `ft precompute` with the same --out to rebuild it.")
        lines.append(f"verified       {len(manifest.shards)} shards: sha256 and sample counts match")
    lines.append(f"written by     {manifest.tool} {manifest.tool_version}, updated {manifest.updated}")
    return "\n".join(lines)

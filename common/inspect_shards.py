"""`ft inspect`: a readable summary of a shard set from its manifest (and, with --verify, its bytes)."""

from __future__ import annotations

from pathlib import Path

from .rejects import summarize_inputs
from .shards import MANIFEST_NAME, Manifest, ShardCorruptError, iter_shard


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
    lines.append(f"rejected       {len(manifest.rejected)}, kept with a note {len(manifest.warnings)}")
    summary = summarize_inputs(manifest.rejected, manifest.warnings, first=5)
    lines += ["  " + line for line in summary.splitlines()]
    if verify:
        absent = [s.name for s in manifest.shards if not (Path(folder) / s.name).is_file()]
        if absent:
            raise ShardCorruptError(f"{folder}: {len(absent)} of the {len(manifest.shards)} shards listed in "
                                    f"{MANIFEST_NAME} are missing ({', '.join(absent[:3])}"
                                    f"{', ...' if len(absent) > 3 else ''}). Rerun `ft precompute` with the same "
                                    "--out to encode their samples again; the other shards are reused.")
        for shard in manifest.shards:
            n = sum(1 for _ in iter_shard(Path(folder) / shard.name, expected_sha256=shard.sha256))
            if n != shard.samples:
                raise ShardCorruptError(f"{shard.name}: {n} samples, but {MANIFEST_NAME} says {shard.samples}; "
                                        "rerun `ft precompute` with the same --out to rebuild it.")
        lines.append(f"verified       {len(manifest.shards)} shards: sha256 and sample counts match")
    lines.append(f"written by     {manifest.tool} {manifest.tool_version}, updated {manifest.updated}")
    return "\n".join(lines)

"""The `ft precompute` run: plan the dataset, load the encoders, encode in batches, write shards and manifest.

Content addressing makes the run resumable and incremental: samples whose key is already in a completed shard of
`--out` are skipped, so a killed job, a grown dataset, or a second experiment on the same encoders pays only for
what is new. Leftover `*.tar.tmp` files of a killed run are removed and their samples encoded again.
"""

from __future__ import annotations

import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ft.common.datasets import load_dataset
from ft.common.errors import UserError
from ft.common.logs import log, quiet_libraries
from ft.common.runtime import pick_device, prefetch_map
from ft.common.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardWriter,
    bucket_name,
    describe_shard,
    sample_key,
    shard_keys,
)
from ft.common.video import MediaError, effective_fps, open_media, parse_bucket, resize_center_crop
from ft.pipelines.base import ModelSpec
from ft.pipelines.registry import spec_for

from .config import PrecomputeConfig
from .plan import PlannedSample, Rejected, assign_keys, plan_samples, sample_encoding


def check_buckets(spec: ModelSpec, texts: list[str], vae_config: dict, transformer_config: dict
                  ) -> list[tuple[int, int, int]]:
    buckets = []
    for text in texts:
        bucket = parse_bucket(text)
        problem = spec.check_bucket(bucket, vae_config, transformer_config)
        if problem:
            raise UserError(f"--buckets {text}: {problem}.")
        buckets.append(bucket)
    return buckets


def _existing_keys(out: Path, manifest: Manifest | None) -> set[str]:
    """Keys already encoded in `out`. Shards that are listed but missing or unreadable are dropped from the
    manifest (their samples are encoded again); complete shards missing from it are adopted; leftovers of a
    killed run (`*.tar.tmp`) are removed."""
    for stale in out.glob("*.tar.tmp"):
        log.info(f"removing {stale.name}, a shard left unfinished by an earlier run")
        stale.unlink()
    if manifest is None:
        return set()
    listed = {s.name for s in manifest.shards}
    for path in sorted(out.glob("shard-*.tar")):
        if path.name not in listed:  # renamed into place, then killed before the manifest was saved
            try:
                manifest.shards.append(describe_shard(path))
                log.info(f"adopting {path.name}: complete on disk but missing from the manifest")
            except (OSError, UserError) as e:
                log.warning(f"{path} is not in the manifest and cannot be read ({e}); ignoring it")
    keys: set[str] = set()
    kept = []
    for shard in manifest.shards:
        path = out / shard.name
        try:
            keys |= shard_keys(path)
            kept.append(shard)
        except (OSError, tarfile.TarError) as e:
            log.warning(f"{path} is listed in the manifest but cannot be read ({e}); its samples are encoded again")
    manifest.shards = kept
    return keys


def _check_reuse(out: Path, existing: Manifest, fingerprint: str, encoding: dict[str, Any], family: str) -> None:
    if existing.model_family != family or existing.encoder_fingerprint != fingerprint:
        raise UserError(f"--out {out} already holds shards made by other encoders ({existing.model_family}, "
                        f"fingerprint {existing.encoder_fingerprint[:12]}); mixing them would corrupt training. "
                        "Choose a new --out folder.")
    if existing.encoding.get("max_sequence_length") != encoding["max_sequence_length"]:
        raise UserError(f"--out {out} holds captions encoded with --max-sequence-length "
                        f"{existing.encoding.get('max_sequence_length')}; use that, or a new --out folder.")


class _Encoder:
    """Batches decoded clips per bucket and writes each encoded sample."""

    def __init__(self, spec: ModelSpec, encoders: dict, vae: Any, writer: ShardWriter, seq_len: int,
                 batch_size: int, manifest: Manifest):
        self.spec, self.encoders, self.vae, self.writer = spec, encoders, vae, writer
        self.seq_len, self.batch_size, self.manifest = seq_len, batch_size, manifest
        self.pending: dict[tuple, list] = defaultdict(list)
        self.written: set[str] = set()

    def add(self, sample: PlannedSample, frames: Any) -> None:
        self.pending[sample.bucket].append((sample, frames))
        if len(self.pending[sample.bucket]) >= self.batch_size:
            self.flush(sample.bucket)

    def flush(self, bucket: tuple) -> None:
        import torch

        batch = self.pending.pop(bucket, [])
        if not batch:
            return
        frames = torch.stack([f.permute(1, 0, 2, 3) for _, f in batch])  # [B, C, F, H, W]
        with torch.no_grad():
            latents = self.spec.encode_video(self.vae, frames)
            cond = self.spec.encode_prompts(self.encoders, [s.item.caption for s, _ in batch], self.seq_len)
        if not self.manifest.shapes:
            first = next(iter(latents.values()))
            self.manifest.shapes = {"latent_channels": int(first.shape[1]),
                                    **{name: list(t.shape[1:]) for name, t in cond.items()}}
        for i, (sample, _) in enumerate(batch):
            lat = {k: v[i].detach().clone() for k, v in latents.items()}
            con = {k: v[i].detach().clone() for k, v in cond.items()}
            meta = {
                "key": sample.key, "caption": sample.item.caption, "source": str(sample.item.path),
                "source_fps": sample.fps, "source_frames": sample.source_frames, "frame_indices": sample.indices,
                "fps": effective_fps(sample.fps, sample.indices),
                "bucket": list(sample.bucket), "latent_shape": list(next(iter(lat.values())).shape),
                "model_family": self.spec.name,
            }
            self.writer.write(sample.key, {"latents": lat, "cond": con}, meta)
            self.written.add(sample.key)

    def flush_all(self) -> None:
        for bucket in list(self.pending):
            self.flush(bucket)


def run_precompute(cfg: PrecomputeConfig) -> Manifest:
    """Encode `cfg.dataset` into shards under `cfg.out`; returns the manifest written there."""
    from tqdm import tqdm

    started = time.time()
    spec = spec_for(cfg)
    items = load_dataset(cfg.dataset, cfg.video_column, cfg.caption_column)  # the user's files first: no waiting
    vae_config = spec.load_config("vae", cfg)
    transformer_config = spec.load_config("transformer", cfg)
    buckets = check_buckets(spec, cfg.buckets or spec.default_buckets, vae_config, transformer_config)
    seq_len = cfg.max_sequence_length or spec.default_sequence_length(transformer_config)
    problem = spec.check_sequence_length(seq_len, transformer_config)
    if problem:
        raise UserError(f"--max-sequence-length {seq_len}: {problem}.")
    log.info(f"dataset {cfg.dataset}: {len(items)} items; buckets {', '.join(cfg.buckets or spec.default_buckets)}")

    planned, rejected = plan_samples(items, buckets, cfg.frame_sampling, cfg.frame_stride, cfg.decoder,
                                     cfg.decode_workers, lambda b: spec.check_bucket(b, vae_config, transformer_config))
    for r in rejected:
        log.info(f"rejected {r.path}: {r.reason}")

    quiet_libraries()
    device = pick_device(cfg.device)
    encoders = spec.load_text_encoders(cfg, device)
    vae = spec.load_component("vae", cfg, device)
    if cfg.vae_tiling:
        for method in ("enable_tiling", "enable_slicing"):
            getattr(vae, method, lambda: None)()
    fingerprints = spec.encoder_fingerprints(encoders, vae, cfg)
    fingerprint = sample_key(fingerprints)
    encoding = {**sample_encoding(seq_len, spec.encoding_choices(transformer_config)),
                "frame_sampling": cfg.frame_sampling, "frame_stride": cfg.frame_stride,
                "buckets": [list(b) for b in buckets], "vae_dtype": cfg.vae_dtype,
                "text_encoder_dtype": cfg.text_encoder_dtype}
    planned = assign_keys(planned, fingerprint, encoding)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    existing = Manifest.load(out) if (out / MANIFEST_NAME).is_file() else None
    if existing:
        _check_reuse(out, existing, fingerprint, encoding, spec.name)
    done = _existing_keys(out, existing)
    todo = sorted((p for p in planned if p.key not in done), key=lambda p: p.bucket)
    manifest = Manifest(model_family=spec.name, encoders=fingerprints, encoder_fingerprint=fingerprint,
                        encoding=encoding, shapes=existing.shapes if existing else {},
                        shards=existing.shards if existing else [], active=existing.active if existing else {},
                        empty_caption=existing.empty_caption if existing else {})
    manifest.rejected = [r.to_dict() for r in rejected]
    if not manifest.empty_caption or (existing and not (out / manifest.empty_caption["file"]).is_file()):
        import torch

        with torch.no_grad():  # stored once per shard set, for caption dropout in training
            empty = spec.encode_prompts(encoders, [""], seq_len)
        manifest.set_empty_caption(out, {k: v[0] for k, v in empty.items()})

    def record(shard: Any) -> None:
        manifest.shards.append(shard)
        manifest.save(out)

    start_index = 1 + max((int(p.name.split("-")[1].split(".")[0]) for p in out.glob("shard-*.tar")), default=-1)
    writer = ShardWriter(out, "shard", start_index, cfg.shard_samples, cfg.shard_max_mb << 20, on_shard=record)
    encoder = _Encoder(spec, encoders, vae, writer, seq_len, cfg.batch_size, manifest)
    log.info(f"encoding {len(todo)} clips on {device} ({len(planned) - len(todo)} already in {out})")

    def decode(sample: PlannedSample) -> tuple[PlannedSample, Any]:
        try:
            frames = open_media(sample.item.path, cfg.decoder).read(sample.indices)
        except MediaError as e:
            return sample, e
        return sample, resize_center_crop(frames, sample.bucket[1], sample.bucket[2])

    try:
        with tqdm(total=len(todo), unit="clip", desc="precompute", disable=not todo) as bar:
            for sample, frames in prefetch_map(decode, todo, cfg.decode_workers):
                if isinstance(frames, Exception):
                    rejected.append(Rejected(str(sample.item.path), str(frames)))
                    manifest.rejected.append(rejected[-1].to_dict())
                else:
                    encoder.add(sample, frames)
                bar.update(1)
            encoder.flush_all()
    finally:
        writer.finish_shard()  # keep what was encoded, even on Ctrl-C
        manifest.save(out)
    # Only a completed run changes what training sees: this dataset's samples, not older cached ones.
    encoded = done | encoder.written
    active = [p for p in planned if p.key in encoded]
    manifest.set_active(out, [p.key for p in active], Counter(bucket_name(*p.bucket) for p in active))
    manifest.save(out)
    cached = manifest.num_samples - len(active)
    log.info(f"wrote {len(encoder.written)} new samples to {out} in {time.time() - started:.1f}s: the dataset is "
             f"{len(active)} samples in {len(manifest.shards)} shards ({manifest.num_bytes / 1e6:.1f} MB)"
             f"{f', beside {cached} cached from earlier runs that training skips' if cached else ''}; "
             f"{len(manifest.rejected)} rejected")
    if not active:
        raise UserError(f"no usable clips in {cfg.dataset}: all {len(items)} were rejected (reasons above and in "
                        f"{out / MANIFEST_NAME}).")
    return manifest

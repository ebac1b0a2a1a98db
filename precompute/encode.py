"""The `ft precompute` run: plan the dataset, load the encoders, encode in batches, write shards and manifest.

Content addressing makes the run resumable and incremental: samples whose key is already in a completed shard of
`--out` are skipped, so a killed job, a grown dataset, or a second experiment on the same encoders pays only for
what is new. Leftover `*.tar.tmp` files of a killed run are removed and their samples encoded again.

Before any encoder is loaded the dataset goes through the data policy (check_data.py, policy.py) and its summary
is printed. The manifest is saved at the start as incomplete (with the dataset's keys and what is missing), after
each shard, and as complete at the end, so a kill at any point leaves a shard set that says what it lacks, and a
rerun (the same command, or the saved `precompute_config.json`) gives the sample set of an uninterrupted run.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ft.common.config import to_jsonable
from ft.common.dataset_config import apply_caption_options
from ft.common.datasets import load_dataset
from ft.common.errors import UserError
from ft.common.faults import check_writable, environment_fault
from ft.common.logs import log, quiet_libraries
from ft.common.prompts import PromptWriter, check_validation_file
from ft.common.runtime import pick_device, prefetch_map
from ft.common.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    ShardWriter,
    bucket_name,
    describe_shard,
    kill_point,
    sample_key,
    shard_index,
)
from ft.common.video import MediaError, effective_fps, open_media, resize_to_bucket
from ft.pipelines.base import ModelSpec
from ft.pipelines.fingerprint import FilesUnavailable
from ft.pipelines.registry import spec_for

from .check_data import DataCheck, check_buckets, check_dataset, sequence_length
from .config import PrecomputeConfig
from .faults import disk_fault_message
from .plan import PlannedSample, assign_keys, sample_encoding
from .policy import Rejected, enforce_on_error
from .reuse import HalfIndex, cached_text, with_cached_video

CONFIG_NAME = "precompute_config.json"


def _existing_keys(out: Path, manifest: Manifest | None) -> tuple[set[str], list[ShardInfo], HalfIndex]:
    """Keys already encoded in `out`, the shards that hold them, and where each cached half is (from the samples'
    JSON). Shards that are listed but missing or unreadable are dropped (their samples are encoded again);
    complete shards missing from the manifest (renamed into place just before a kill) are adopted unless their
    samples are already listed, so no sample is ever listed twice;
    leftovers of a killed run (`*.tar.tmp`) are removed."""
    for stale in out.glob("*.tar.tmp"):
        log.info(f"removing {stale.name}, a shard left unfinished by an earlier run")
        stale.unlink()
    keys: set[str] = set()
    kept: list[ShardInfo] = []
    metas: dict[str, list[tuple[str, dict]]] = {}
    for shard in manifest.shards if manifest else []:
        try:
            metas[shard.name] = shard_index(out / shard.name)
            shard_set = {key for key, _ in metas[shard.name]}
        except (OSError, tarfile.TarError, UserError) as e:
            log.warning(f"{out / shard.name} is listed in the manifest but cannot be read ({e}); its samples are "
                        "encoded again")
            continue
        if shard_set and shard_set <= keys:
            log.info(f"dropping {shard.name}: every sample in it is in another listed shard")
            (out / shard.name).unlink()
            continue
        keys |= shard_set
        kept.append(shard)
    listed = {s.name for s in kept} | {s.name for s in (manifest.shards if manifest else [])}
    for path in sorted(out.glob("shard-*.tar")):
        if path.name in listed:
            continue
        try:  # renamed into place, then killed before the manifest named it
            metas[path.name] = shard_index(path)
            shard_set = {key for key, _ in metas[path.name]}
            if shard_set & keys:
                if shard_set <= keys:
                    log.info(f"removing {path.name}: complete but unlisted, and its samples are already listed")
                    path.unlink()
                else:
                    log.warning(f"{path} is not in the manifest and shares samples with listed shards; ignoring it")
                continue
            kept.append(describe_shard(path))
            keys |= shard_set
            log.info(f"adopting {path.name}: complete on disk but missing from the manifest")
        except (OSError, tarfile.TarError, UserError) as e:
            log.warning(f"{path} is not in the manifest and cannot be read ({e}); ignoring it")
    halves = HalfIndex()
    for shard in kept:
        for key, meta in metas[shard.name]:
            halves.add(shard.name, key, meta)
    return keys, kept, halves


def _check_reuse(out: Path, existing: Manifest, fingerprints: dict[str, Any], encoding: dict[str, Any],
                 family: str) -> None:
    fingerprint = sample_key(fingerprints)
    if existing.model_family == family and existing.encoder_fingerprint != fingerprint and any(
            existing.encoders.get(name, {}).get("from") != info.get("from") for name, info in fingerprints.items()):
        how = {None: "the loaded models", "files": "the model files"}
        old = next(iter(existing.encoders.values()), {}).get("from")
        new = next(iter(fingerprints.values()), {}).get("from")
        raise UserError(f"--out {out} was written by a run that fingerprinted the encoders from {how[old]}; this run "
                        f"fingerprints them from {how[new]}, so its sample keys differ and the two cannot be mixed. "
                        "Choose a new --out folder (or delete this one) to encode the dataset again.")
    if existing.model_family != family or existing.encoder_fingerprint != fingerprint:
        raise UserError(f"--out {out} already holds shards made by other encoders ({existing.model_family}, "
                        f"fingerprint {existing.encoder_fingerprint[:12]}); mixing them would corrupt training. "
                        "Choose a new --out folder.")
    if existing.encoding.get("max_sequence_length") != encoding["max_sequence_length"]:
        raise UserError(f"--out {out} holds captions encoded with --max-sequence-length "
                        f"{existing.encoding.get('max_sequence_length')}; use that, or a new --out folder.")


class _Encoder:
    """Batches the samples to write per bucket. A sample's video half is its clip's decoded frames to encode
    through the VAE, or latents read from the cache; its text half is encoded, or taken from `texts` (cached
    halves by text_key). `vae` / `encoders` are None when the run needs none."""

    def __init__(self, spec: ModelSpec, encoders: dict | None, vae: Any, writer: ShardWriter, seq_len: int,
                 batch_size: int, manifest: Manifest, texts: dict[str, dict]):
        self.spec, self.encoders, self.vae, self.writer = spec, encoders, vae, writer
        self.seq_len, self.batch_size, self.manifest, self.texts = seq_len, batch_size, manifest, texts
        self.pending: dict[tuple, list] = defaultdict(list)
        self.written: set[str] = set()

    def add(self, sample: PlannedSample, frames: Any = None, latents: dict | None = None) -> None:
        self.pending[sample.bucket].append((sample, frames, latents))
        if len(self.pending[sample.bucket]) >= self.batch_size:
            self.flush(sample.bucket)

    def flush(self, bucket: tuple) -> None:
        import torch

        batch = self.pending.pop(bucket, [])
        if not batch:
            return
        latents = [lat for _, _, lat in batch]
        conds = [self.texts.get(s.text_key) for s, _, _ in batch]
        clips = [i for i, lat in enumerate(latents) if lat is None]
        captions = list(dict.fromkeys(s.text_key for (s, _, _), c in zip(batch, conds, strict=True) if c is None))
        with torch.no_grad():
            if clips:
                frames = torch.stack([batch[i][1].permute(1, 0, 2, 3) for i in clips])  # [B, C, F, H, W]
                encoded = self.spec.encode_video(self.vae, frames)
                for j, i in enumerate(clips):
                    latents[i] = {k: v[j].detach().clone() for k, v in encoded.items()}
            if captions:
                text = {s.text_key: s.item.caption for s, _, _ in batch}
                cond = self.spec.encode_prompts(self.encoders, [text[k] for k in captions], self.seq_len)
                new = {key: {k: v[j].detach().clone() for k, v in cond.items()} for j, key in enumerate(captions)}
                conds = [c if c is not None else new[s.text_key] for (s, _, _), c in zip(batch, conds, strict=True)]
        if not self.manifest.shapes:
            self.manifest.shapes = {"latent_channels": int(next(iter(latents[0].values())).shape[0]),
                                    **{name: list(t.shape) for name, t in conds[0].items()}}
        for (sample, _, _), lat, con in zip(batch, latents, conds, strict=True):
            meta = {
                "key": sample.key, "caption": sample.item.caption, "source": str(sample.item.path),
                "source_fps": sample.fps, "source_frames": sample.source_frames, "frame_indices": sample.indices,
                "fps": effective_fps(sample.fps, sample.indices),
                "bucket": list(sample.bucket), "latent_shape": list(next(iter(lat.values())).shape),
                "model_family": self.spec.name, "video_key": sample.video_key, "text_key": sample.text_key,
            }
            self.writer.write(sample.key, {"latents": lat, "cond": con}, meta)
            self.written.add(sample.key)

    def flush_all(self) -> None:
        for bucket in list(self.pending):
            self.flush(bucket)


class _Models:
    """The stage-1 models, loaded only when asked for. The fingerprint comes from the files when they can be read
    (pipelines/fingerprint.py); otherwise every encoder is loaded to fingerprint it, as before."""

    def __init__(self, spec: ModelSpec, cfg: PrecomputeConfig, device: Any):
        self.spec, self.cfg, self.device = spec, cfg, device
        self._vae: Any = None
        self._encoders: dict | None = None

    def fingerprints(self) -> dict[str, Any]:
        try:
            return self.spec.fingerprints_from_files(self.cfg)
        except (FilesUnavailable, OSError, ValueError) as e:
            log.info(f"the encoders' files cannot be fingerprinted without loading them ({e}); loading them to "
                     "fingerprint them")
            return self.spec.encoder_fingerprints(self.text_encoders(), self.vae(), self.cfg)

    def vae(self) -> Any:
        if self._vae is None:
            self._vae = self.spec.load_component("vae", self.cfg, self.device)
            if self.cfg.vae_tiling:
                for method in ("enable_tiling", "enable_slicing"):
                    getattr(self._vae, method, lambda: None)()
        return self._vae

    def text_encoders(self) -> dict:
        if self._encoders is None:
            self._encoders = self.spec.load_text_encoders(self.cfg, self.device)
        return self._encoders


def _save_config(cfg: PrecomputeConfig, out: Path) -> str:
    """Save the resolved config beside the shards (paths made absolute); returns the command that reruns it."""
    values = to_jsonable(cfg)
    for name in ("dataset", "out", "pretrained"):
        if values.get(name) and Path(values[name]).exists():
            values[name] = str(Path(values[name]).resolve())
    path = out / CONFIG_NAME
    path.write_text(json.dumps(values, indent=2) + "\n")
    return f"ft precompute --config {path.resolve()}"


def _log_summary(check: DataCheck) -> None:
    for line in check.summary().splitlines():
        log.info(line)


def run_precompute(cfg: PrecomputeConfig) -> Manifest:
    """Encode `cfg.dataset` into shards under `cfg.out`; returns the manifest written there."""
    from tqdm import tqdm

    started = time.time()
    spec = spec_for(cfg)
    held = (Path(cfg.out) / MANIFEST_NAME).is_file()
    check_writable(cfg.out, "--out", "the shard folder; the shards already in it are untouched and `ft train` reads "
                   "them where they are" if held else "the shard folder")
    items = load_dataset(cfg.dataset, cfg.video_column, cfg.caption_column)  # the user's files first: no waiting
    items = apply_caption_options(items, cfg.id_token, cfg.strip_llm_prefixes)
    vae_config = spec.load_config("vae", cfg)
    transformer_config = spec.load_config("transformer", cfg)
    buckets = check_buckets(spec, cfg.buckets or spec.default_buckets, vae_config, transformer_config)
    seq_len = sequence_length(spec, cfg, transformer_config)
    validation = check_validation_file(cfg.validation_dataset_file, spec, vae_config, transformer_config, buckets)
    log.info(f"dataset {cfg.dataset}: {len(items)} items; buckets {', '.join(cfg.buckets or spec.default_buckets)}")

    quiet_libraries()
    check = check_dataset(items, cfg, spec, buckets, vae_config, transformer_config, seq_len, cfg)
    _log_summary(check)  # the same checks and summary as `ft check-data`, before any encoder is loaded
    enforce_on_error(cfg.on_error, check.rejected, cfg.dataset)
    rejected, warnings = check.rejected, check.warnings

    device = pick_device(cfg.device)
    models = _Models(spec, cfg, device)
    fingerprints = models.fingerprints()
    fingerprint = sample_key(fingerprints)
    halves = (sample_key({"vae": fingerprints["vae"]}),
              sample_key({k: v for k, v in fingerprints.items() if k != "vae"}))
    encoding = {**sample_encoding(seq_len, spec.encoding_choices(transformer_config), cfg.resize_mode),
                "frame_sampling": cfg.frame_sampling, "frame_stride": cfg.frame_stride,
                "buckets": [list(b) for b in buckets], "vae_dtype": cfg.vae_dtype,
                "text_encoder_dtype": cfg.text_encoder_dtype}
    planned, duplicates = assign_keys(check.planned, fingerprint, encoding, halves)
    warnings += duplicates

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    existing = Manifest.load(out) if (out / MANIFEST_NAME).is_file() else None
    if existing:
        _check_reuse(out, existing, fingerprints, encoding, spec.name)
    done, shards, index = _existing_keys(out, existing)
    todo = sorted((p for p in planned if p.key not in done), key=lambda p: p.bucket)
    by_name = {s.name: s for s in shards}
    texts = cached_text(out, by_name, index, todo)
    to_decode = [p for p in todo if p.video_key not in index.video]
    reused = [p for p in todo if p.video_key in index.video]
    empty_missing = not (existing and existing.empty_caption and (out / existing.empty_caption["file"]).is_file())
    prompts = PromptWriter(out, fingerprints, encoding, validation)  # the prompt table's rows this run adds
    # only what this run must encode is loaded: nothing at all when every sample is in `out` already
    vae = models.vae() if to_decode else None
    encoders = models.text_encoders() if empty_missing or prompts.needed or any(
        p.text_key not in texts for p in todo) else None
    manifest = Manifest(model_family=spec.name, encoders=fingerprints, encoder_fingerprint=fingerprint,
                        encoding=encoding, shapes=existing.shapes if existing else {}, shards=shards,
                        empty_caption=existing.empty_caption if existing else {})
    manifest.rejected = [r.to_dict() for r in rejected]
    manifest.warnings = [w.to_dict() for w in warnings]
    if empty_missing:
        import torch

        with torch.no_grad():  # stored once per shard set, for caption dropout in training
            empty = spec.encode_prompts(encoders, [""], seq_len)
        manifest.set_empty_caption(out, {k: v[0] for k, v in empty.items()})
    manifest.prompts = prompts.write(spec, encoders, seq_len, cfg.batch_size)
    # Until this run finishes, the manifest says it is incomplete and how much is missing (ft train refuses it).
    manifest.complete = False
    manifest.set_active(out, [p.key for p in planned], Counter(bucket_name(*p.bucket) for p in planned))
    manifest.missing = dict(Counter(bucket_name(*p.bucket) for p in todo))
    manifest.resume_command = _save_config(cfg, out)
    manifest.save(out)
    kill_point("started")

    def record(shard: ShardInfo) -> None:
        manifest.shards.append(shard)
        for bucket, n in shard.buckets.items():
            manifest.missing[bucket] = manifest.missing.get(bucket, 0) - n
        manifest.missing = {b: n for b, n in manifest.missing.items() if n > 0}
        manifest.save(out)

    start_index = 1 + max((int(p.name.split("-")[1].split(".")[0]) for p in out.glob("shard-*.tar")), default=-1)
    writer = ShardWriter(out, "shard", start_index, cfg.shard_samples, cfg.shard_max_mb << 20, on_shard=record)
    encoder = _Encoder(spec, encoders, vae, writer, seq_len, cfg.batch_size, manifest, texts)
    captions = len({p.text_key for p in todo if p.text_key not in texts})
    log.info(f"{len(todo)} new samples on {device} ({len(planned) - len(todo)} already in {out}): {len(to_decode)} "
             f"clips to encode ({len(reused)} video latents reused from {out}), {captions} captions to encode")

    def decode(sample: PlannedSample) -> tuple[PlannedSample, Any]:
        try:
            frames = open_media(sample.item.path, cfg.decoder).read(sample.indices)
            return sample, resize_to_bucket(frames, sample.bucket[1], sample.bucket[2], cfg.resize_mode)
        except MediaError as e:
            return sample, e

    failed: set[str] = set()
    try:
        with tqdm(total=len(todo), unit="clip", desc="precompute", disable=not todo) as bar:
            for sample, latents in with_cached_video(out, by_name, index, reused):
                encoder.add(sample, latents=latents)
                bar.update(1)
            for sample, frames in prefetch_map(decode, to_decode, cfg.decode_workers):
                if isinstance(frames, MediaError):
                    rejected.append(Rejected(str(sample.item.path), str(frames), frames.kind))
                    manifest.rejected.append(rejected[-1].to_dict())
                    failed.add(sample.key)
                    log.info(f"rejected {sample.item.path}: {frames}")
                    enforce_on_error(cfg.on_error, rejected[-1:], cfg.dataset)
                else:
                    encoder.add(sample, frames)
                bar.update(1)
            encoder.flush_all()
    except KeyboardInterrupt:
        writer.finish_shard()
        kept = sum(shard.samples for shard in writer.completed)
        log.error(f"interrupted: kept {kept} new samples in {out} (shards are whole; "
                  f"{manifest.missing_samples} samples of the dataset are not encoded yet). Run the same command "
                  f"again, or `{manifest.resume_command}`, to go on: it encodes only what is missing.")
        raise
    except OSError as e:  # a full disk (or one gone read-only): keep the whole shards, say how much is needed
        fault = environment_fault(e)
        if fault is None:
            raise
        partial = writer.discard()
        raise UserError(disk_fault_message(fault, out, writer.completed, partial, len(todo) - len(failed),
                                           manifest.resume_command)) from e
    finally:
        writer.finish_shard()  # keep what was encoded, even on Ctrl-C or an error (nothing after a discard)
        try:
            manifest.save(out)
        except OSError as e:  # the disk is full: the manifest saved after the last whole shard stands
            if environment_fault(e) is None:
                raise
    kill_point("encoded")
    active = [p for p in planned if p.key not in failed and (p.key in done or p.key in encoder.written)]
    manifest.set_active(out, [p.key for p in active], Counter(bucket_name(*p.bucket) for p in active))
    manifest.complete, manifest.missing = True, {}
    manifest.save(out)
    cached = manifest.num_samples - len(active)
    log.info(f"wrote {len(encoder.written)} new samples to {out} in {time.time() - started:.1f}s: the dataset is "
             f"{len(active)} samples in {len(manifest.shards)} shards ({manifest.num_bytes / 1e6:.1f} MB)"
             f"{f', beside {cached} cached from earlier runs that training skips' if cached else ''}")
    check.planned, check.rejected, check.warnings = active, rejected, warnings
    _log_summary(check)
    if not active:
        raise UserError(f"no usable clips in {cfg.dataset}: all {len(items)} were rejected (reasons above and in "
                        f"{out / MANIFEST_NAME}).")
    return manifest

"""The `ft precompute` job: `PrecomputeJob`, one job's run in four named steps, and `run_precompute`, the command
that takes the job's slot and runs it (or stops at once when nothing changed since its last run, stamp.py).

`plan` reads the job's items and plans them (planning.py), `open_state` saves the job's state as incomplete,
`encode` loads the encoders when first needed and encodes in batches (encoder.py) into shards and the job's
journal, `finish` says the job complete and, when it is the last job to finish, merges the set (merge.py).

A single run is job 0 of 1. Job i of N (job_slots.py) takes the lock of its slot, reads only the items it owns, and
writes only its own files: shards `shard-j000i-NNNNNN.tar`, and its state, journal, keys and rejects under
`jobs/` (common/shards/journal.py). Content addressing makes a job resumable and incremental: samples whose key is
already in a usable shard of `--out` are skipped (existing.py), so a killed job, a grown dataset, or a second
experiment on the same encoders pays only for what is new; unchanged media is neither probed nor hashed again
(media_cache.py).

The job's items go through the data policy (planning.py, policy.py) and its summary is printed: before any
encoder is loaded when the job plans up front (a rerun into a set that has shards, or `--on-error fail`), or as
the last item is planned when a first run plans while it encodes (`JobPlan.stream`), so the GPU does not wait for
every file to be probed and hashed. The encoders load when first needed. The job's state is saved at the start
as incomplete (what it must encode, once known), each finished shard is appended to its journal, and the state
says complete at the end, so a kill at any point leaves a shard set that says what it lacks, and a rerun (the
same command, or the job's saved config) gives the sample set of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np

from ft.common.config import to_jsonable
from ft.common.errors import UserError
from ft.common.faults import check_writable, environment_fault
from ft.common.logs import log, quiet_libraries
from ft.common.runtime import pick_device, prefetch_map
from ft.common.shards import (
    JOBS_DIR,
    MANIFEST_NAME,
    JobState,
    Manifest,
    ShardInfo,
    ShardWriter,
    append_journal,
    bucket_name,
    finalize_command,
    kill_point,
    load_manifest,
    read_journal,
    read_states,
    sample_key,
    write_atomic,
)
from ft.common.shards.manifest import input_summary
from ft.common.shards.prompts import PromptWriter, check_condition_rows, check_validation_file
from ft.pipelines.image import read_model_index, resolve_conditioning
from ft.pipelines.memory import largest_gpu
from ft.pipelines.registry import spec_for
from ft.precompute.media import MediaError, open_media, resize_to_bucket

from .config import PrecomputeConfig
from .consistency import caption_shaping, check_job_start
from .encoder import Encoder, Models
from .existing import half_index, scan_existing
from .faults import disk_fault_message
from .job_items import JobItems
from .job_slots import JobSlot, job_config_path, job_device, live_locks, lock_slot, resolve_slot
from .media_cache import MediaCache
from .merge import finalize, remove_job_files
from .plan_table import KeySet, from_hex, write_keys
from .planned_sample import PlannedSample, SampleKeys, sample_encoding
from .planning import JobPlan, check_buckets, sequence_length
from .policy import Rejected, enforce_on_error
from .reuse import HalfIndex, TextHalves, with_cached_video
from .stamp import unchanged, write_stamp
from .validation_images import write_image_rows


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


def _save_config(cfg: PrecomputeConfig, out: Path, slot: JobSlot) -> str:
    """Save this job's resolved config (paths made absolute, its job named) under `jobs/`; returns the command
    that reruns the job."""
    values = to_jsonable(cfg)
    for name in ("dataset", "out", "pretrained"):
        if values.get(name) and Path(values[name]).exists():
            values[name] = str(Path(values[name]).resolve())
    values["num_jobs"], values["job_index"] = slot.num_jobs, slot.index
    path = job_config_path(out, slot.stem)
    write_atomic(path, json.dumps(values, indent=2) + "\n")
    return f"ft precompute --config {path.resolve()}"


def _write_records(out: Path, name: str, records: Iterable[Rejected]) -> None:
    """Records as JSON lines, written a line at a time (there can be one per row), atomically."""
    path = out / name
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")
    os.replace(tmp, path)


def _append_record(out: Path, name: str, record: Rejected) -> None:
    with open(out / name, "a") as f:
        f.write(json.dumps(record.to_dict()) + "\n")


class PrecomputeJob:
    """One job's run into `out` under the lock of its slot, in four named steps (`run` takes them in order):
    `plan` (its items, the run checked against the model, the encoders' fingerprint, what `--out` holds, the
    plan), `open_state` (its state saved as incomplete, the empty caption and prompt rows stored), `encode` (the
    clips and captions through the encoders into shards) and `finish` (its state complete, the set merged when
    it is the last job)."""

    def __init__(self, cfg: PrecomputeConfig, slot: JobSlot, out: Path):
        self.cfg, self.slot, self.out = cfg, slot, out
        self.started = time.time()

    def run(self) -> Manifest:
        self.plan()
        self.open_state()
        self.encode()
        try:
            return self.finish()
        except OSError as e:  # the disk filled after the last shard (the job's state, the merge): all shards are whole
            fault = environment_fault(e)
            if fault is None:
                raise
            raise UserError(disk_fault_message(fault, self.out, self.writer.completed, None,
                                               len(self.todo) - len(self.failed), self.state.resume_command)) from e

    def read_items(self) -> None:
        """This job's items (job_items.py: read again a chunk at a time whenever needed), surveyed once;
        refuses an `--out` that holds unmerged jobs of another --num-jobs."""
        cfg, slot, out = self.cfg, self.slot, self.out
        self.items = JobItems(cfg, slot)
        self.survey = self.items.survey()  # the user's files first: no waiting
        self.outside = self.survey.outside
        if slot.num_jobs > 1:  # this job's slice, by a hash of each path: nothing else is probed or hashed
            log.info(f"{slot}: {self.survey.count} of the dataset's {self.survey.total} items are this job's")
        self.states = read_states(out)
        other = [s for s in self.states if s.num_jobs != slot.num_jobs]
        if other:
            raise UserError(f"{out} holds unmerged jobs of a run with --num-jobs {other[0].num_jobs} "
                            f"({len(other)} of them); this is {slot}. Finish that run, or merge what it wrote with "
                            f"`{finalize_command(out)} --allow-incomplete`, then run again.")

    def check_model(self) -> None:
        """The buckets, the text length and the validation prompts checked against the model's configs."""
        cfg, spec = self.cfg, self.spec
        self.vae_config = spec.load_config("vae", cfg)
        self.transformer_config = spec.load_config("transformer", cfg)
        self.buckets = check_buckets(spec, cfg.buckets or spec.default_buckets, self.vae_config,
                                     self.transformer_config)
        self.seq_len = sequence_length(spec, cfg, self.transformer_config)
        self.image = resolve_conditioning(spec, cfg.mode, self.transformer_config,
                                          read_model_index(cfg.pretrained, cfg.revision, cfg.cache_dir),
                                          f"--pretrained {cfg.pretrained}")
        self.validation = check_validation_file(cfg.validation_dataset_file, spec, self.vae_config,
                                                self.transformer_config, self.buckets, largest_gpu())
        check_condition_rows(self.validation, cfg.validation_dataset_file, self.image)
        log.info(f"dataset {cfg.dataset}: {self.survey.count} items; buckets "
                 f"{', '.join(cfg.buckets or spec.default_buckets)}")

    def name_samples(self) -> None:
        """What names this run's samples: the encoders' fingerprints (from their files: nothing is loaded here)
        and the encoding; an `--out` written with others is refused."""
        cfg, spec, out = self.cfg, self.spec, self.out
        self.fingerprints = self.models.fingerprints()
        self.fingerprint = sample_key(self.fingerprints)
        self.halves = (sample_key({"vae": self.fingerprints["vae"]}),
                       sample_key({k: v for k, v in self.fingerprints.items() if k != "vae"}))
        self.encoding = {**sample_encoding(self.seq_len, spec.encoding_choices(self.transformer_config),
                                           cfg.resize_mode),
                         "frame_sampling": cfg.frame_sampling, "frame_stride": cfg.frame_stride,
                         "buckets": [list(b) for b in self.buckets], "vae_dtype": cfg.vae_dtype,
                         "text_encoder_dtype": cfg.text_encoder_dtype,
                         "captions": caption_shaping(cfg.id_token, cfg.strip_llm_prefixes)}
        if self.image is not None:  # image-to-video: enters the image half's key, not the video's or text's
            self.encoding["image"] = self.image.manifest_entry(self.models.image_fingerprints(self.image))
        check_job_start(out, self.slot.index, self.slot.num_jobs, {"encoders": self.fingerprints,
                        "encoder_fingerprint": self.fingerprint, "encoding": self.encoding}, self.states)
        kill_point("checked")
        self.base = Manifest.read(out) if (out / MANIFEST_NAME).is_file() else None
        if self.base:
            _check_reuse(out, self.base, self.fingerprints, self.encoding, spec.name)

    def plan(self) -> None:
        """What this job must encode. With shards in `--out` to look at (or `--on-error fail`) every item is
        planned now, into columns (plan_table.py): the samples already there are done, the video halves found
        there are reused, the rest is to do (`todo`: positions in `table`); `encode` plans those again a chunk of
        the dataset at a time. With nothing to reuse the items are planned while `encode` runs (planning.py):
        `planned` and `todo` are the list planning fills."""
        cfg, slot, out = self.cfg, self.slot, self.out
        self.spec = spec_for(cfg)
        self.read_items()
        self.check_model()
        quiet_libraries()
        self.cache = MediaCache(out, cfg.decoder, self.survey.paths)
        self.device = pick_device(job_device(cfg.device))
        self.models = Models(self.spec, cfg, self.device)  # the fingerprint from the files: nothing is loaded here
        self.name_samples()
        if not any(s.index == slot.index for s in self.states):
            remove_job_files(out, slot.stem)  # leftovers of this slot's merged attempt
        journal = [info for _, info in read_journal(out, slot.stem)]
        self.found = scan_existing(out, slot, self.base, journal)

        self.planning = JobPlan(self.items, self.survey, cfg, self.spec, self.buckets,
                                (self.vae_config, self.transformer_config), self.seq_len, self.cache,
                                SampleKeys(self.fingerprint, self.encoding, self.halves),
                                images=self.image is not None)
        self.streamed = not self.found.shards and cfg.on_error != "fail"  # nothing to reuse: plan while encoding
        if self.streamed:
            self.planned: list[PlannedSample] = self.planning.check.planned  # filled as the items are planned
            self.todo: Sized = self.planned
            self.done: Sized = set()
            self.index = HalfIndex()
            self.captions = 0
        else:
            self.table = table = self.planning.up_front()
            self.cache.save(slot.stem)
            self.done_mask = self.found.held.mask(table.key)
            self.todo_mask = ~self.done_mask
            self.done, self.todo = np.flatnonzero(self.done_mask), np.flatnonzero(self.todo_mask)
            wanted_texts = KeySet(table.text_key[self.todo_mask])
            self.index = half_index(out, self.found.shards, KeySet(table.video_key[self.todo_mask]), wanted_texts)
            self.reused = int((self.todo_mask & KeySet(from_hex(self.index.video)).mask(table.video_key)).sum())
            self.captions = len(wanted_texts) - len(self.index.text)  # distinct captions to encode
        self.texts = TextHalves(out, self.found.shards, self.index)
        # the lists planning fills (streamed: as encode() runs), and encode() adds the clips that fail to decode to
        self.rejected, self.warnings = self.planning.check.rejected, self.planning.check.warnings

    def todo_counts(self) -> dict[str, int]:
        """The samples to encode per bucket."""
        if self.streamed:
            return dict(Counter(bucket_name(*p.bucket) for p in self.planned))
        return self.table.counts(self.todo_mask)

    def open_state(self) -> None:
        """Save this job's state as incomplete (until it finishes, the set says what it lacks and `ft train`
        refuses it), with its rejects and warnings so far; store the empty caption (job 0, once per set) and the
        prompt table's missing rows."""
        cfg, spec, slot, out, base = self.cfg, self.spec, self.slot, self.out, self.base
        empty_caption = (base.empty_caption if base and base.empty_caption
                         and (out / base.empty_caption["file"]).is_file() else {})
        empty_missing = slot.index == 0 and not empty_caption  # job 0 stores it for the set
        # the prompt table's rows this run adds (job 0 writes them for the set, as the empty caption)
        prompts = PromptWriter(out, self.fingerprints, self.encoding, self.validation if slot.index == 0 else [])

        # the tensors' shapes: the set's, else an unmerged attempt's (killed after its last shard, its shards are
        # adopted and this attempt may encode nothing that would say them); check_job_start made the encoders alike
        shapes = base.shapes if base else next((s.header["shapes"] for s in self.states if s.header.get("shapes")), {})
        self.state = state = JobState(
            slot.index, slot.num_jobs, uuid.uuid4().hex, socket.gethostname(), os.getpid(),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            header={"model_family": spec.name, "encoders": self.fingerprints, "encoder_fingerprint": self.fingerprint,
                    "encoding": self.encoding, "shapes": shapes,
                    "empty_caption": empty_caption, "prompts": base.prompts if base else {}},
            resume_command=_save_config(cfg, out, slot),
            todo=self.todo_counts(), dropped=self.found.dropped)
        for info in self.found.adopted:  # recorded, not counted against this attempt's work
            append_journal(out, dataclasses.replace(state, attempt="adopted"), info)
        _write_records(out, state.file(".rejected.jsonl"), self.rejected)
        _write_records(out, state.file(".warnings.jsonl"), self.warnings)
        self.set_view(None)
        if empty_missing:
            import torch

            holder = Manifest(spec.name, {}, "", {}, {})
            with torch.no_grad():  # stored once per shard set, for caption dropout in training
                empty = spec.encode_prompts(self.models.text_encoders(), [""], self.seq_len)
            holder.set_empty_caption(out, {k: v[0] for k, v in empty.items()},
                                     state.file(".empty_caption.safetensors"))
            state.header["empty_caption"] = holder.empty_caption
        # the text encoders, when this job encodes text: the prompt table's missing rows (the negative prompt) with it
        encoders = self.models.text_encoders() if (empty_missing or prompts.needed or self.streamed
                                                    or self.captions) else None
        state.header["prompts"] = (prompts.write(spec, encoders, self.seq_len, cfg.batch_size)
                                   or state.header["prompts"])
        if self.image is not None and self.validation and slot.index == 0:  # the rows' images, job 0 for the set
            image = self.image

            def row_models() -> dict[str, Any]:
                text = self.models.text_encoders() if image.caption else {}
                return {"vae": self.models.vae(), **text, **self.models.image_encoders(image)}

            write_image_rows(out, str(cfg.validation_dataset_file), self.validation, spec, row_models, image,
                             self.encoding, self.fingerprints["vae"], cfg.decoder, cfg.resize_mode, self.seq_len)
        state.save(out)
        kill_point("started")

    def set_view(self, active: np.ndarray | list[PlannedSample] | None) -> None:
        """The state's view of this job's samples (`active`: a mask of `table`, or the samples streamed; None:
        every planned sample), and of its rejects and warnings."""
        state = self.state
        path = self.out / state.file(".active.txt")
        if self.streamed:
            samples = self.planned if active is None else active
            assert isinstance(samples, list)
            write_atomic(path, "".join(p.key + "\n" for p in samples))
            count, buckets = len(samples), Counter(bucket_name(*p.bucket) for p in samples)
        else:
            mask = np.ones(len(self.table), dtype=bool) if active is None else active
            assert isinstance(mask, np.ndarray)
            write_keys(path, self.table.key[mask])
            count, buckets = int(mask.sum()), self.table.counts(mask)
        state.active = {"file": state.file(".active.txt"), "samples": count, "buckets": dict(sorted(buckets.items()))}
        state.inputs = {
            "rejected": input_summary([state.file(".rejected.jsonl")], (r.to_dict() for r in self.rejected)),
            "warnings": input_summary([state.file(".warnings.jsonl")], (w.to_dict() for w in self.warnings))}

    def encode(self) -> None:
        """Encode `todo` into shards: reused video latents first, then the clips as they are decoded (streamed:
        as they are planned). A clip that fails to decode is rejected (`--on-error` applies); Ctrl-C and a full
        disk keep the whole shards and say how to go on."""
        from tqdm import tqdm

        cfg, out, todo = self.cfg, self.out, self.todo
        self.writer = writer = ShardWriter(out, self.slot.prefix, None, cfg.shard_samples, cfg.shard_max_mb << 20,
                                           on_shard=self.record)
        self.encoder = Encoder(self.spec, self.models, writer, self.seq_len, cfg.batch_size,
                                self.state.header["shapes"], self.texts, self.image, self.read_frames)
        self.failed: set[str] = set()
        try:
            with tqdm(total=None if self.streamed else len(todo), unit="clip", desc="precompute",
                      disable=not (len(todo) or self.streamed)) as bar:
                for reused, to_decode in self.work():
                    for sample, latents in with_cached_video(out, self.found.shards, self.index, reused):
                        self.encoder.add(sample, latents=latents)
                        bar.update(1)
                    for sample, frames in prefetch_map(self.decode, to_decode, cfg.decode_workers):
                        if isinstance(frames, MediaError):
                            self.reject_clip(sample, frames)
                        else:
                            self.encoder.add(sample, frames)
                        bar.update(1)
                self.encoder.flush_all()
                writer.finish_shard()  # closing the last shard writes its end: a full disk here is reported below
        except KeyboardInterrupt:
            writer.finish_shard()
            kept = sum(shard.samples for shard in writer.completed)
            log.error(f"interrupted: kept {kept} new samples in {out} (shards are whole; "
                      f"{len(todo) - kept} samples of {self.slot} are not encoded yet). Run the same command again, "
                      f"or `{self.state.resume_command}`, to go on: it encodes only what is missing.")
            raise
        except OSError as e:  # a full disk (or one gone read-only): keep the whole shards, say how much is needed
            fault = environment_fault(e)
            if fault is None:
                raise
            partial = writer.discard()
            raise UserError(disk_fault_message(fault, out, writer.completed, partial, len(todo) - len(self.failed),
                                               self.state.resume_command)) from e
        finally:
            writer.finish_shard()  # keep what was encoded, even on Ctrl-C or an error
        kill_point("encoded")

    def work(self) -> Iterator[tuple[list[PlannedSample], Iterable[PlannedSample]]]:
        """The samples to encode as (those whose video half is in `--out`, those whose clips go through the VAE):
        streamed, each as planning makes it; else the rows to do, planned again a chunk of the dataset at a time
        (JobPlan.replan), the clips of each chunk in the order of their text halves' sources."""
        out = self.out
        if self.streamed:
            log.info(f"nothing in {out} to reuse: encoding on {self.device} as the items are planned")
            yield [], self.planning.stream(self.reject_planned, self.planned_all)
            return
        todo = len(self.todo)
        log.info(f"{todo} new samples on {self.device} ({len(self.table) - todo} already in {out}): "
                 f"{todo - self.reused} clips to encode ({self.reused} video latents reused from {out}), "
                 f"{self.captions} captions to encode" + (f", {todo} image conditionings to encode"
                                                          if self.image is not None else ""))
        for chunk in self.planning.replan(self.table, self.todo_mask):
            reused, to_decode = [], []
            for key, sample in chunk:
                if isinstance(sample, Rejected):
                    self.reject_gone(key, sample)
                else:
                    (reused if sample.video_key in self.index.video else to_decode).append(sample)
            yield reused, sorted(to_decode, key=lambda p: self.texts.source(p.text_key))

    def decode(self, sample: PlannedSample) -> tuple[PlannedSample, Any]:
        """A sample's frames resized to its bucket (in a decode worker), or the MediaError that stopped them."""
        try:
            frames = open_media(sample.item.path, self.cfg.decoder).read(sample.indices)
            return sample, resize_to_bucket(frames, sample.bucket[1], sample.bucket[2], self.cfg.resize_mode)
        except MediaError as e:
            return sample, e

    def read_frames(self, sample: PlannedSample, indices: list[int]) -> Any:
        """Frames of a sample's clip at `indices`, resized to its bucket: an image-to-video sample's conditioning
        frames where its video latents are reused (the clip itself is not decoded); no indices: its named
        conditioning image."""
        if not indices:
            frames = open_media(sample.item.image, self.cfg.decoder).read([0])
            return resize_to_bucket(frames, sample.bucket[1], sample.bucket[2], self.cfg.resize_mode)
        frames = open_media(sample.item.path, self.cfg.decoder).read(indices)
        return resize_to_bucket(frames, sample.bucket[1], sample.bucket[2], self.cfg.resize_mode)

    def reject_clip(self, sample: PlannedSample, error: MediaError) -> None:
        """A clip that failed to decode: rejected, recorded at once, and `--on-error` applied."""
        self.rejected.append(Rejected(str(sample.item.path), str(error), error.kind))
        _append_record(self.out, self.state.file(".rejected.jsonl"), self.rejected[-1])
        self.failed.add(sample.key)
        log.info(f"rejected {sample.item.path}: {error}")
        enforce_on_error(self.cfg.on_error, self.rejected[-1:], self.cfg.dataset)

    def reject_gone(self, key: str, record: Rejected) -> None:
        """A sample planned up front whose file changed or went before it was encoded: rejected as a clip that
        fails to decode is."""
        self.rejected.append(record)
        _append_record(self.out, self.state.file(".rejected.jsonl"), record)
        self.failed.add(key)
        log.info(f"rejected {record.path}: {record.reason}")
        enforce_on_error(self.cfg.on_error, [record], self.cfg.dataset)

    def reject_planned(self, record: Rejected) -> None:
        """An item planning found bad while the job encodes (streamed), recorded at once."""
        _append_record(self.out, self.state.file(".rejected.jsonl"), record)

    def planned_all(self) -> None:
        """The last item is planned (streamed): the state now says all this job must encode."""
        self.cache.save(self.slot.stem)
        _write_records(self.out, self.state.file(".warnings.jsonl"), self.warnings)
        self.state.todo = self.todo_counts()
        self.set_view(None)
        self.state.save(self.out)
        log.info(f"planned {len(self.planned)} samples while encoding ({len(self.rejected)} items rejected)")
        kill_point("planned")

    def record(self, shard: ShardInfo) -> None:
        """A finished shard, appended to the journal; the tensors' shapes enter the state with the first."""
        append_journal(self.out, self.state, shard)
        if not self.state.header["shapes"] and self.encoder.shapes:
            self.state.header["shapes"] = self.encoder.shapes
            self.state.save(self.out)

    def finish(self) -> Manifest:
        """Say this job complete (its samples, its stamp for a free rerun), merge the set when it is the last job,
        print the summary; returns the set's manifest."""
        cfg, slot, out, state = self.cfg, self.slot, self.out, self.state
        written = self.encoder.written
        if self.encoder.notes:  # found while encoding: recorded beside the planning's
            self.warnings += self.encoder.notes
            _write_records(out, state.file(".warnings.jsonl"), self.warnings)
        check = self.planning.check
        if self.streamed:
            active: Any = [p for p in self.planned if p.key not in self.failed and p.key in written]
            count = len(active)
            check.planned = active
        else:
            keys = self.table.key
            active = ((self.done_mask | KeySet(from_hex(written)).mask(keys))
                      & ~KeySet(from_hex(self.failed)).mask(keys))
            count = int(active.sum())
            check.histogram = self.table.counts(active)
        self.set_view(active)
        state.header["shapes"] = state.header["shapes"] or self.encoder.shapes
        state.complete, state.written = True, len(written)
        state.finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_stamp(cfg, out, slot.stem, self.outside)  # before the state says complete: the merge seals it
        state.save(out)
        kill_point("job-complete")
        merged = finalize(out, own=slot)
        manifest = merged or load_manifest(out)
        log.info(f"wrote {len(written)} new samples to {out} in {time.time() - self.started:.1f}s: {slot} is "
                 f"{count} samples" + ("" if merged else f"; the set is {manifest.describe_completeness()}"))
        check.rejected, check.warnings = self.rejected, self.warnings
        check.log_summary()
        if not count and slot.num_jobs == 1:
            raise UserError(f"no usable clips in {cfg.dataset}: all {self.survey.count} were rejected (reasons above "
                            f"and in {out / 'rejected.jsonl'}).")
        return manifest


def run_precompute(cfg: PrecomputeConfig) -> Manifest:
    """Encode this job's part of `cfg.dataset` into shards under `cfg.out` (all of it for a single run), under
    the lock of its slot; the last job to finish merges the set. Returns the set's manifest (a merged view while
    other jobs have not finished)."""
    slot = resolve_slot(cfg.num_jobs, cfg.job_index)
    out = Path(cfg.out)
    held = (out / MANIFEST_NAME).is_file()  # before the lock and the job files: a read-only disk costs nothing
    check_writable(cfg.out, "--out", "the shard folder; the shards already in it are untouched and `ft train` reads "
                   "them where they are" if held else "the shard folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with lock_slot(out, slot):
            # another job of this run writing now: join it (its merge needs this job's state), do not stop
            running = any(h.get("index") != slot.index for h in live_locks(out))
            same = None if running else unchanged(cfg, out, slot.stem)
            if same is not None:
                log.info(f"nothing changed since {slot}'s last run into {out} (its config, the dataset's files and "
                         f"the model's files, each stat'ed): the set has {same.active.get('samples', same.num_samples)}"
                         f" samples in {len(same.shards)} shards, {same.describe_completeness()}; nothing to encode")
                return same
            return PrecomputeJob(cfg, slot, out).run()
    finally:
        if created:  # a run stopped before writing anything (--on-error fail, a bad flag) leaves no folder
            for folder in (out / JOBS_DIR, out):
                with contextlib.suppress(OSError):
                    folder.rmdir()

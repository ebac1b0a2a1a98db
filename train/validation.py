"""Validation during training: videos from the validation prompts, and the held-out loss, with no text encoder.

The trainer makes one `Validation` right after opening its shards and calls `after_step(trainer, step, run_log)`
after each optimizer step; `summary` joins the run's summary. Everything else is here:
- before the first step (`__init__`, no model loaded): the validation file is read and every row checked, sizes
  with the family's rules (common/shards/prompts.py); each caption and the negative prompt must be in the
  shard set's prompt table, else the error gives the `ft precompute` command that adds
  them (encoding only the text); the VAE that `--pretrained`/`--vae-id` names must be the one in the manifest
  (its fingerprint from files; a different VAE is refused with the reason); `--eval-shards` is opened and checked
  against the model and the training shards (it is read into memory at the first evaluation);
- every `--validation-steps` and at the last step: the family's pipeline is built around the live transformer
  with no text components (`ModelSpec.build_pipeline`) and the pipeline's own sampling scheduler, and each prompt
  is sampled from its stored embeddings by the code `ft generate` uses (generate.py), under the training dtype's
  autocast when master weights are fp32. The VAE is loaded at the first validation, kept on the CPU, moved to
  the device only once denoising is done and moved back after (`--validation-keep-vae` keeps it there). mp4s go
  to OUTPUT_DIR/validation/step-NNNNNN/ with contact_sheet.png (first, middle and last frame of every prompt);
  the tracker gets both; train_log.jsonl records the files;
- every `--eval-steps` and at the last step: `eval_loss`, the held-out loss (`HeldOutLoss`), logged like the
  training loss. Every sample of the `--eval-shards` set is scored at each of `EVAL_SIGMAS` (spread over the
  schedule), with its latent draw and noise from a generator keyed on `EVAL_SEED` and its key alone, not on
  `--seed`, the step or the rank: the same weights give the same value twice, after a resume, and in another run
  of the same model and objective, so two runs' curves compare. The loss is the objective's own (prediction,
  target and weights, as in training), with no caption dropout and no first-frame conditioning (an image-to-video
  run's samples are all conditioned on their image, as its pipeline samples). (`--eval-batches`
  is another thing: a fixed-noise loss over batches of the TRAINING set, before and after training, trainer.py.)
Training's RNG is untouched: sampling and the held-out loss draw from their own generators, and the torch,
CUDA, Python and NumPy RNG states are put back afterwards, so a run with validation ends with the weights of the
same run without it.

Several processes (the prompts' split): `assign_prompts` gives every rank the same number of generation slots,
and in slot k every rank samples a prompt with the same number of transformer calls (steps x passes per step),
padding with a repeat whose output is dropped; so under FSDP every rank takes part in every denoising step, and
nothing hangs when the prompts do not divide the world. `gather_to_rank0` brings the frames to rank 0, which
alone writes files and logs. With one process both are the identity.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError
from ft.common.logs import log, note
from ft.common.shards import iter_shard, kill_point, parse_bucket, require_complete
from ft.common.shards.prompts import (
    FLAG,
    PromptTable,
    check_condition_rows,
    default_size,
    image_row_key,
    read_validation_file,
    resolve_sizes,
)
from ft.pipelines.base import StepInputs, TrainOptions, randn_per_sample
from ft.pipelines.fingerprint import FilesUnavailable
from ft.pipelines.image import ImageConditioning
from ft.train.video_writer import write_video

from .config import DEFAULT_VALIDATION_STEPS
from .generate import SamplingSettings, match_vae_dtype, pipeline_defaults, sample_frames
from .loader import Batch, ShardSet, collate
from .objectives import sample_generator

if TYPE_CHECKING:
    import numpy as np

    from ft.pipelines.base import ModelSpec

    from .config import TrainConfig
    from .reporting import RunLog

VALIDATION_DIR = "validation"
SHEET_NAME = "contact_sheet.png"
FINGERPRINT_FIELDS = ("class", "config", "weights")


def assign_prompts(signatures: list[Hashable], rank: int, world: int) -> list[tuple[int, bool]]:
    """The (prompt index, keep) slots of `rank`: prompts grouped by signature (transformer calls per sample),
    each group dealt out in rounds of `world`; a rank without a prompt in a round repeats the round's first one
    and drops it (keep False). Every rank gets the same number of slots with the same signatures in order."""
    groups: dict[Hashable, list[int]] = {}
    for i, signature in enumerate(signatures):
        groups.setdefault(signature, []).append(i)
    slots = []
    for indices in groups.values():
        for start in range(0, len(indices), world):
            round_ = indices[start : start + world]
            slots.append((round_[rank], True) if rank < len(round_) else (round_[0], False))
    return slots


def gather_to_rank0(items: list[Any]) -> list[Any] | None:
    """Every rank's items on rank 0 (None on the others); the items themselves with one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, parts, dst=0)
    return None if parts is None else [item for part in parts for item in part]


def rank_and_world() -> tuple[int, int]:
    from ft.train import dist

    return dist.rank(), dist.size()


@contextmanager
def rng_untouched(device: str) -> Iterator[None]:
    """Run a block and put the torch (and CUDA), Python and NumPy RNG states back as they were."""
    import numpy as np
    import torch

    python, numpy = random.getstate(), np.random.get_state()
    devices = [torch.device(device)] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "prompt"


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: Path, cell_height: int = 160) -> Path:
    """One row per video: its caption over its first, middle and last frames."""
    from PIL import Image, ImageDraw

    label, gap = 16, 4
    cells = []
    for caption, frames in rows:
        picks = [frames[0], frames[len(frames) // 2], frames[-1]]
        height = min(cell_height, frames.shape[1])
        width = max(1, round(frames.shape[2] * height / frames.shape[1]))
        cells.append((caption, [Image.fromarray(f).resize((width, height)) for f in picks]))
    sheet_width = max(gap + 3 * (c[1][0].width + gap) for c in cells)
    sheet = Image.new("RGB", (max(sheet_width, 320), sum(label + c[1][0].height + gap for c in cells) + gap),
                      "white")
    draw, y = ImageDraw.Draw(sheet), gap
    for caption, thumbs in cells:
        draw.text((gap, y), caption[:100], fill="black")
        y += label
        for j, thumb in enumerate(thumbs):
            sheet.paste(thumb, (gap + j * (thumb.width + gap), y))
        y += thumbs[0].height + gap
    sheet.save(path)
    return path


def check_vae(spec: ModelSpec, cfg: TrainConfig, stored: dict[str, Any], folder: Path) -> bool:
    """Refuse a VAE other than the manifest's, from its files (no load). Returns False when the files cannot tell
    (the manifest fingerprinted loaded models, or the files are not readable): then the loaded VAE is checked."""
    if stored.get("from") != "files":
        return False
    try:
        now = spec.fingerprints_from_files(cfg, ("vae",))["vae"]
    except (FilesUnavailable, OSError, ValueError) as e:
        log.info(f"validation: the VAE's files cannot be fingerprinted ({e}); it is checked once loaded")
        return False
    compare_vae(now, stored, cfg, folder)
    return True


def compare_vae(now: dict[str, Any], stored: dict[str, Any], cfg: TrainConfig, folder: Path) -> None:
    fields = [f for f in FINGERPRINT_FIELDS if f in now and f in stored and now[f] != stored[f]]
    if fields:
        where = cfg.vae_id or f"{cfg.pretrained}/vae"
        raise UserError(f"{FLAG}: the VAE at {where} is not the one {folder} was encoded with (its "
                        f"{' and '.join(fields)} differ{'s' if len(fields) == 1 else ''}): it would decode the "
                        "latents wrongly. Pass the VAE that `ft precompute` used (--pretrained, or --vae-id).")


# ---------------------------------------------------------------------------------------------- held-out loss

EVAL_SEED = 0
EVAL_DRAW = -2  # the "global batch" of the held-out draws (the training eval of --eval-batches uses -1)
EVAL_SIGMAS = (0.125, 0.375, 0.625, 0.875)


def row_part(row: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The tensors of a validation image row stored under `prefix` (precompute/validation_images.py), unprefixed."""
    return {name[len(prefix):]: value for name, value in row.items() if name.startswith(prefix)}


def describe_held(manifest: Any) -> str:
    image = manifest.encoding.get("image")
    return f"image-to-video ({image.get('kind')}, {'+'.join(image.get('frames', []))})" if image else "text-to-video"


def open_eval_set(cfg: TrainConfig, spec: ModelSpec, train_set: ShardSet, transformer_config: dict) -> ShardSet:
    """The --eval-shards set, checked against the model and the training shards."""
    held_out = ShardSet(cfg.eval_shards)
    folder = held_out.folder
    require_complete(held_out.manifest, folder, False)
    spec.check_shards(held_out.manifest, transformer_config)
    if held_out.folder.resolve() in {train_set.folder.resolve()}:
        raise UserError(f"--eval-shards {folder} is a training shard set: a held-out loss needs clips the model "
                        "does not train on. Precompute them into their own --out.")
    mine, theirs = held_out.manifest, train_set.manifest
    if mine.encoder_fingerprint != theirs.encoder_fingerprint:
        raise UserError(f"--eval-shards {folder} was encoded with other encoders than {train_set.folder} "
                        f"(fingerprint {mine.encoder_fingerprint[:12]} against {theirs.encoder_fingerprint[:12]}): its "
                        "loss would not measure this model. Precompute it with the same --pretrained and dtypes.")
    if (mine.encoding.get("image") or None) != (theirs.encoding.get("image") or None):
        raise UserError(f"--eval-shards {folder} holds {describe_held(mine)} samples, the training shards "
                        f"{describe_held(theirs)} ones; precompute it with the same --pretrained and --mode.")
    if mine.shapes != theirs.shapes:
        raise UserError(f"--eval-shards {folder} holds samples of shapes {mine.shapes}, the training shards "
                        f"{theirs.shapes}; precompute it with the same --max-sequence-length and model.")
    return held_out


class HeldOutLoss:
    """The held-out loss of the trainer's current weights (call it; every rank must, under FSDP)."""

    def __init__(self, cfg: TrainConfig, spec: ModelSpec, train_set: ShardSet, transformer_config: dict):
        self.cfg, self.spec, self.transformer_config = cfg, spec, transformer_config
        self.set = open_eval_set(cfg, spec, train_set, transformer_config)
        self.vae_config = self.set.manifest.encoders.get("vae", {}).get("config", {})
        self._batches: list[Batch] | None = None

    def batches(self) -> list[Batch]:
        """Every active sample of the set, verified, in batches of --batch-size of one bucket, ordered by key."""
        if self._batches is None:
            by_bucket: dict[tuple, list] = defaultdict(list)
            active = self.set.active_keys()
            for info in self.set.manifest.shards:
                for sample in iter_shard(self.set.folder / info.name, verify=info, wanted=(
                        None if active is None else active.__contains__)):
                    by_bucket[tuple(sample.meta["bucket"])].append(sample)
            size = self.cfg.batch_size
            self._batches = [collate(samples[i : i + size])
                             for _, group in sorted(by_bucket.items())
                             for samples in [sorted(group, key=lambda s: s.key)]
                             for i in range(0, len(samples), size)]
        return self._batches

    def losses(self, trainer: Any, batch: Batch) -> list[float]:
        """Per-sample losses of one batch, each the mean over EVAL_SIGMAS."""
        import torch

        spec, objective = self.spec, trainer.objective
        batch = batch.to(trainer.device)
        generators = [sample_generator(EVAL_SEED, EVAL_DRAW, key) for key in batch.keys]
        latents = spec.prepare_latents(batch.latents, self.vae_config, self.transformer_config, generators)
        noise = randn_per_sample(tuple(latents.shape[1:]), generators, latents.device)
        # --first-frame-conditioning-p at its mode's default: no first-frame conditioning in a text-to-video run,
        # every sample conditioned on its image in an image-to-video one
        options = replace(TrainOptions.from_config(self.cfg), first_frame_conditioning_p=None)
        conditioning = trainer.image_conditioning
        image = spec.prepare_image(batch.image, self.vae_config, self.transformer_config, generators,
                                   conditioning, options) if conditioning is not None else {}
        total = torch.zeros(latents.shape[0], device=latents.device)
        for sigma in EVAL_SIGMAS:
            sigmas = torch.full((latents.shape[0],), sigma, device=latents.device)
            noisy, timesteps = objective.noised(latents, noise, sigmas)
            inputs = StepInputs(latents, noise, noisy, sigmas, timesteps, batch.cond, batch.meta, generators, options,
                                image, conditioning)
            context = (torch.autocast(trainer.device.split(":")[0], dtype=trainer.dtype) if trainer.autocast
                       else nullcontext())
            with context:
                output, element_weights = spec.predict(trainer.transformer, inputs, trainer.model_dtype)
            total += objective.sample_losses(output, latents, noise, noisy, sigmas, timesteps, element_weights)
        return (total / len(EVAL_SIGMAS)).tolist()

    def __call__(self, trainer: Any) -> float:
        import torch

        was_training = trainer.transformer.training
        trainer.transformer.eval()
        try:
            with torch.no_grad():
                losses = [loss for batch in self.batches() for loss in self.losses(trainer, batch)]
        finally:
            trainer.transformer.train(was_training)
        return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------- whole or absent
# A step's videos and contact sheet are written into a hidden `validation/.step-NNNNNN.tmp/` and renamed to
# `validation/step-NNNNNN/` once whole, so a kill during validation leaves no folder that looks done with half its
# videos. The checkpoint of step N is saved before step N's validation (train/trainer.py), so a run killed during
# that validation resumes after N and would never pass N again: `due_and_missing` has the resumed run validate
# step N first (the checkpoint's weights, the prompts' fixed seeds: the videos an uninterrupted run made).


def aside_folder(final: Path) -> Path:
    """A fresh hidden folder beside `final` (`.step-NNNNNN.tmp`) to write a step's validation into."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: Path, final: Path) -> Path:
    """Rename the whole `tmp` to `final` (an older `final`, of a run that went on from an earlier checkpoint, is
    replaced); returns `final`."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def due(step: int, validation_steps: int, train_steps: int) -> bool:
    """Whether validation videos are made after optimizer step `step`."""
    return step == train_steps or bool(validation_steps and step % validation_steps == 0)


def due_and_missing(output_dir: str | Path, step: int, cfg: Any) -> bool:
    """Whether step `step` (a resumed run's first) was due a validation that is not on disk: its run was killed
    during it (the hidden folder that kill left is replaced when the step is written again)."""
    if step <= 0 or not due(step, cfg.validation_steps, cfg.train_steps):
        return False
    return not (Path(output_dir) / VALIDATION_DIR / f"step-{step:06d}").is_dir()


# ---------------------------------------------------------------------------------------------- the validation run


class Validation:
    """The validation videos and the held-out loss of a run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, spec: ModelSpec, sets: list[ShardSet], transformer_config: dict,
                 memory: tuple[float, str] | None = None, conditioning: ImageConditioning | None = None):
        self.cfg, self.spec, self.conditioning = cfg, spec, conditioning
        self.summary: dict[str, Any] = {}
        self.prompts: list = []
        self.held_out = HeldOutLoss(cfg, spec, sets[0], transformer_config) if cfg.eval_shards else None
        self._pipe: Any = None
        if not cfg.validation_dataset_file:
            if cfg.validation_steps != DEFAULT_VALIDATION_STEPS:
                note(f"--validation-steps {cfg.validation_steps} does nothing without --validation-dataset-file (no "
                     "prompts to generate): add the file (its prompts precomputed by `ft precompute "
                     "--validation-dataset-file`), or leave the flag out.")
            return
        shard_set, path = sets[0], cfg.validation_dataset_file
        manifest = shard_set.manifest
        self.vae_stored = manifest.encoders.get("vae", {})
        buckets = manifest.encoding.get("buckets") or [parse_bucket(b) for b in manifest.training_histogram()]
        self.prompts = resolve_sizes(read_validation_file(path), path, spec, self.vae_stored.get("config", {}),
                                     transformer_config, default_size(buckets), memory)
        table = PromptTable(shard_set.folder, manifest)
        missing = table.missing([p.caption for p in self.prompts] + [""])
        if missing:
            command = manifest.resume_command or f"ft precompute <its flags> --out {shard_set.folder}"
            raise UserError(f"{FLAG} {path}: {len(missing)} prompt(s) are not precomputed in {shard_set.folder} "
                            f"(first: {missing[0][:60]!r}); ft train loads no text encoder. Add them with `{command} "
                            f"{FLAG} {path}` (it encodes only the text), then train again.")
        self.cond = {p.caption: table.read(p.caption) for p in self.prompts}
        check_condition_rows(self.prompts, path, conditioning)
        self.images = {p.index: table.read_key(image_row_key(p, manifest.encoding, self.vae_stored),
                                               f"the image(s) of {path} row {p.index + 1}")
                       for p in self.prompts} if conditioning is not None else {}
        self.negative = table.negative()
        self.vae_checked = check_vae(spec, cfg, self.vae_stored, shard_set.folder)
        self.folder = shard_set.folder
        log.info(f"validation: {len(self.prompts)} prompt(s) from {path}, every {cfg.validation_steps or '-'} steps "
                 "and at the last")

    # ------------------------------------------------------------------------------------------------ the hook

    def after_step(self, trainer: Any, step: int, run_log: RunLog) -> None:
        """What is due after optimizer step `step`: validation videos, the held-out loss (each at its interval
        and at the last step). Every rank calls this."""
        cfg, last = self.cfg, step == self.cfg.train_steps
        if self.prompts and (last or (cfg.validation_steps and step % cfg.validation_steps == 0)):
            self.validate(trainer, step, run_log)
        if self.held_out is not None and (last or step % cfg.eval_steps == 0):
            with rng_untouched(trainer.device):
                loss = self.held_out(trainer)
            self.summary["eval_loss"] = loss
            from ft.train import dist

            dist.run_on_rank_zero(lambda: run_log.write({"step": step, "eval_loss": loss}))  # a fault stops every rank
            if rank_and_world()[0] == 0:
                log.info(f"step {step}: held-out eval_loss {loss:.5f}")

    def after_resume(self, trainer: Any, step: int, run_log: RunLog) -> None:
        """A resumed run's first act: the validation of its checkpoint's step, when that was due and the kill cut
        it short (see `due_and_missing`). Every rank calls this."""
        from ft.train import dist

        if self.prompts and dist.same_on_every_rank(lambda: due_and_missing(self.cfg.output_dir, step, self.cfg)):
            log.info(f"step {step}: its validation was cut short by the stop; making it again")
            self.validate(trainer, step, run_log)

    # ------------------------------------------------------------------------------------------------ videos

    def pipeline(self, trainer: Any) -> Any:
        """The family's pipeline around the live transformer, built once: the VAE (on the CPU) and the pipeline's
        sampling scheduler; no tokenizer or text encoder."""
        if self._pipe is None:
            vae = self.spec.load_component("vae", self.cfg, "cpu")
            if not self.vae_checked:
                now = self.spec.encoder_fingerprints({}, vae, self.cfg)["vae"]
                if now.get("dtype") != self.vae_stored.get("dtype"):  # loaded weights' bytes depend on the dtype
                    now.pop("weights", None)
                compare_vae(now, self.vae_stored, self.cfg, self.folder)
            match_vae_dtype(self.spec, vae, trainer.model_dtype)
            if self.cfg.validation_keep_vae:
                vae.to(trainer.device)
            self._pipe = self.spec.build_pipeline(trainer.transformer, vae, self.spec.pipeline_scheduler(self.cfg),
                                                  self.conditioning)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def settings(self, prompt: Any) -> SamplingSettings:
        return SamplingSettings(*prompt.size, num_inference_steps=prompt.num_inference_steps,
                                guidance_scale=prompt.guidance_scale, true_cfg_scale=prompt.true_cfg_scale,
                                frame_rate=prompt.frame_rate,
                                seed=self.cfg.seed if prompt.seed is None else prompt.seed)

    def validate(self, trainer: Any, step: int, run_log: RunLog) -> None:
        import torch

        started = time.perf_counter()
        pipe = self.pipeline(trainer)
        vae = pipe.vae
        rank, world = rank_and_world()
        # a context-parallel group generates one prompt together (its ranks' forwards are one forward)
        cp = trainer.layout.cp
        rank, world, group_leader = rank // cp, world // cp, rank % cp == 0
        defaults = pipeline_defaults(pipe)
        settings = [self.settings(p) for p in self.prompts]
        signatures = [(s.num_inference_steps or defaults["num_inference_steps"], s.forwards_per_step(self.spec, pipe))
                      for s in settings]
        autocast = (torch.autocast(trainer.device.split(":")[0], dtype=trainer.dtype) if trainer.autocast
                    else nullcontext())
        done = []
        was_training = trainer.transformer.training
        trainer.transformer.eval()
        try:
            with rng_untouched(trainer.device), torch.no_grad(), autocast:
                for index, keep in assign_prompts(signatures, rank, world):
                    prompt = self.prompts[index]
                    images, cond, negative = None, self.cond[prompt.caption], self.negative
                    if self.conditioning is not None:
                        row = self.images[index]
                        images = self.spec.image_pipeline_arguments(pipe, row, self.conditioning)
                        # a text encoder that reads the image with the prompt (HunyuanVideo-I2V): the row's own
                        cond = {**cond, **row_part(row, "prompt.")}
                        negative = {**negative, **row_part(row, "negative.")}
                    frames = sample_frames(self.spec, pipe, cond, negative, settings[index], trainer.model_dtype,
                                           before_decode=lambda: vae.to(trainer.device), images=images)
                    if keep:
                        done.append((index, frames))
        finally:
            trainer.transformer.train(was_training)
            if not self.cfg.validation_keep_vae:
                vae.to("cpu")
        gathered = gather_to_rank0(done if group_leader else [])
        from ft.train import dist

        dist.run_on_rank_zero(lambda: gathered is not None and self.write(  # rank 0 writes; a fault stops every rank
            step, sorted(gathered, key=lambda item: item[0]), settings, pipe, run_log, time.perf_counter() - started))

    def write(self, step: int, results: list[tuple[int, np.ndarray]], settings: list[SamplingSettings], pipe: Any,
              run_log: RunLog, seconds: float) -> None:
        final = Path(self.cfg.output_dir) / VALIDATION_DIR / f"step-{step:06d}"
        folder = aside_folder(final)  # renamed into place once whole: a kill never leaves half a step's videos
        videos, files = [], []
        for index, frames in results:
            prompt, values = self.prompts[index], settings[index].resolved(self.spec, pipe)
            path = write_video(folder / f"{index:02d}-{slug(prompt.caption)}.mp4", frames, values["fps"])
            kill_point("validation-video")  # test hook: a kill between two videos
            videos.append((f"validation/{index:02d}", frames, values["fps"], path))
            files.append({"file": str(path.relative_to(self.cfg.output_dir)), "caption": prompt.caption,
                          "num_frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                          "width": int(frames.shape[2]), "fps": values["fps"], "seed": settings[index].seed,
                          "num_inference_steps": values["num_inference_steps"],
                          "guidance_scale": values["guidance_scale"]})
        contact_sheet([(self.prompts[i].caption, frames) for i, frames in results], folder / SHEET_NAME)
        folder = publish_folder(folder, final)
        sheet = folder / SHEET_NAME
        videos = [(tag, frames, fps, folder / path.name) for tag, frames, fps, path in videos]
        for entry in files:
            entry["file"] = str((folder / Path(entry["file"]).name).relative_to(self.cfg.output_dir))
        run_log.write({"step": step, "validation": {"folder": str(folder.relative_to(self.cfg.output_dir)),
                                                    "videos": files, "contact_sheet": str(
                                                        sheet.relative_to(self.cfg.output_dir)),
                                                    "seconds": round(seconds, 3)}}, to_tracker=False)
        run_log.media(step, videos, [("validation/contact_sheet", sheet)])
        self.summary["validation"] = str(folder)
        log.info(f"step {step}: {len(results)} validation video(s) in {seconds:.1f}s -> {folder}")

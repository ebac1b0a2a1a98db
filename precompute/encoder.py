"""The stage-1 models and the batches they encode, for the precompute job (job.py).

`Models` loads the VAE, the text encoders and an image-to-video checkpoint's image encoder only when first asked
for (a rerun that encodes nothing loads nothing), and fingerprints them from their files when it can. `Encoder`
gathers the samples to write per bucket and encodes a bucket's batch when it is full: its clips through the VAE
(or their cached latents), its captions through the text encoders (or their cached text halves), and an
image-to-video sample's conditioning, then hands each sample to the shard writer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ft.common.logs import log
from ft.common.shards import ShardWriter
from ft.pipelines.base import ModelSpec
from ft.pipelines.fingerprint import FilesUnavailable
from ft.pipelines.image import ImageConditioning
from ft.precompute.media import effective_fps

from .config import PrecomputeConfig
from .planned_sample import PlannedSample, black_frame_note
from .policy import Rejected
from .reuse import TextHalves


class Encoder:
    """Batches the samples to write per bucket. A sample's video half is its clip's decoded frames to encode
    through the VAE, or latents read from the cache; its text half is encoded, or taken from `texts` (cached
    halves by text_key). The models load on their first use (`models`): a run that needs none loads none."""

    def __init__(self, spec: ModelSpec, models: Models, writer: ShardWriter, seq_len: int, batch_size: int,
                 shapes: dict[str, Any], texts: TextHalves, image: ImageConditioning | None = None,
                 read_frames: Callable[[PlannedSample, list[int]], Any] | None = None):
        self.spec, self.models, self.writer = spec, models, writer
        self.seq_len, self.batch_size, self.shapes, self.texts = seq_len, batch_size, dict(shapes), texts
        # an image-to-video run: how the checkpoint is conditioned, and how a sample whose video latents are reused
        # gets its conditioning frames (decoded alone)
        self.image, self.read_frames = image, read_frames
        self.pending: dict[tuple, list] = defaultdict(list)
        self.written: set[str] = set()
        self.images_encoded = 0
        self.notes: list[Rejected] = []  # warnings found while encoding (a black conditioning frame)

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
                encoded = self.spec.encode_video(self.models.vae(), frames)
                for j, i in enumerate(clips):
                    latents[i] = {k: v[j].detach().clone() for k, v in encoded.items()}
            if captions:
                text = {s.text_key: s.item.caption for s, _, _ in batch}
                cond = self.spec.encode_prompts(self.models.text_encoders(), [text[k] for k in captions],
                                                self.seq_len)
                new = {key: {k: v[j].detach().clone() for k, v in cond.items()} for j, key in enumerate(captions)}
                conds = [c if c is not None else new[s.text_key] for (s, _, _), c in zip(batch, conds, strict=True)]
            images = self.encode_images(batch) if self.image is not None else [{}] * len(batch)
        if not self.shapes:
            self.shapes = {"latent_channels": int(next(iter(latents[0].values())).shape[0]),
                                    **{name: list(t.shape) for name, t in conds[0].items()}}
        for (sample, _, _), lat, con, img in zip(batch, latents, conds, images, strict=True):
            meta = {
                "key": sample.key, "caption": sample.item.caption, "source": str(sample.item.path),
                "source_fps": sample.fps, "source_frames": sample.source_frames, "frame_indices": sample.indices,
                "fps": effective_fps(sample.fps, sample.indices),
                "bucket": list(sample.bucket), "latent_shape": list(next(iter(lat.values())).shape),
                "model_family": self.spec.name, "video_key": sample.video_key, "text_key": sample.text_key,
            }
            groups = {"latents": lat, "cond": con}
            if img:
                meta["image_key"], meta["image_frames"] = sample.image_key, self.condition_indices(sample)
                if sample.image_digest:
                    meta["conditioning_image"] = str(sample.item.image)
                groups["image"] = img
            self.writer.write(sample.key, groups, meta)
            self.written.add(sample.key)

    def condition_indices(self, sample: PlannedSample) -> list[int]:
        assert self.image is not None
        return sample.conditioning_frames(self.image.frames)

    def encode_images(self, batch: list) -> list[dict[str, Any]]:
        """The batch's image halves (`ModelSpec.encode_image`) from its conditioning frames: taken from the decoded
        clip, or decoded alone where the clip's latents were reused."""
        import torch

        assert self.image is not None and self.read_frames is not None
        pixels = []
        for sample, frames, _ in batch:
            wanted = [sample.indices.index(i) for i in self.condition_indices(sample)]
            own = frames[wanted] if frames is not None else self.read_frames(sample, self.condition_indices(sample))
            if sample.image_digest:  # a named conditioning image in place of the first frame
                own = torch.cat([self.read_frames(sample, []), own[1:]])
            note = black_frame_note(sample.item, ((own[0] + 1) * 127.5).round().permute(1, 2, 0))
            if note:
                self.notes.append(Rejected(str(sample.item.path), note[1], note[0]))
            pixels.append(own)
        stacked = torch.stack([p.permute(1, 0, 2, 3) for p in pixels])  # [B, C, N, H, W]
        models = {"vae": self.models.vae(), **self.models.image_encoders(self.image)}
        text: dict[str, Any] = {}
        if self.image.caption:  # the conditioning reads the caption too (HunyuanVideo-I2V's Llava)
            models |= self.models.text_encoders()
            text = {"captions": [s.item.caption for s, _, _ in batch], "max_sequence_length": self.seq_len}
        encoded = self.spec.encode_image(models, stacked, batch[0][0].bucket[0], self.image, **text)
        self.images_encoded += len(batch)
        return [{k: v[j].detach().clone() for k, v in encoded.items()} for j in range(len(batch))]

    def flush_all(self) -> None:
        for bucket in list(self.pending):
            self.flush(bucket)


class Models:
    """The stage-1 models, loaded only when asked for. The fingerprint comes from the files when they can be read
    (pipelines/fingerprint.py); otherwise every encoder is loaded to fingerprint it, as before."""

    def __init__(self, spec: ModelSpec, cfg: PrecomputeConfig, device: Any):
        self.spec, self.cfg, self.device = spec, cfg, device
        self._vae: Any = None
        self._encoders: dict | None = None
        self._image_encoders: dict | None = None

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

    def image_encoders(self, image: ImageConditioning) -> dict:
        """The image encoder and processor of an image-to-video checkpoint that has one."""
        if self._image_encoders is None:
            self._image_encoders = self.spec.load_image_encoders(self.cfg, self.device, image)
        return self._image_encoders

    def image_fingerprints(self, image: ImageConditioning | None) -> dict[str, Any]:
        """The image encoder's and processor's fingerprints, from their files (loaded where they cannot be read)."""
        if image is None or not image.image_encoder:
            return {}
        names = tuple(self.spec.image_component_classes)
        try:
            return self.spec.fingerprints_from_files(self.cfg, names)
        except (FilesUnavailable, OSError, ValueError):
            return self.spec.module_fingerprints(self.image_encoders(image), self.cfg)

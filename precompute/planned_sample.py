"""What one dataset item becomes: its `PlannedSample` (media probed, bucket and frames chosen) and its keys.

This file holds the plan of a single item: `plan_item` probes the media (or takes its facts from the media cache,
media_cache.py, when the file's stat is unchanged), picks a bucket and the frames, or says why the item cannot be
used; `SampleKeys` names the sample by its content (`sample_encoding` is what of the run enters the keys). The
pipeline that runs this over a job's items (screen, plan, the checks of the whole plan, up front or streamed into
the encode loop) is planning.py; `ft check-data` (check_data.py) and the precompute job (job.py) both run it.

Planning runs before any model is loaded, so a dataset's problems (missing files, unreadable or too-short
videos) show up in seconds, as rejected inputs with reasons, not after the encoders have taken the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ft.common.shards import file_digest, sample_key
from ft.common.shards.prompts import text_key
from ft.precompute.media import (
    MediaError,
    bucket_pool,
    choose_bucket,
    frame_indices,
    frames_needed,
    is_image,
    open_media,
    upscale_factor,
)

from .datasets import DatasetItem
from .media_cache import MediaCache, MediaFacts, signature
from .policy import Rejected

RESIZE_MODE = "center-crop"
BucketCheck = Callable[[tuple[int, int, int]], "str | None"]


class _HexKey:
    """A key held as 16 bytes in field `field`, read and set as the 32 hex characters the files use."""

    def __init__(self, field: str):
        self.field = field

    def __get__(self, sample: Any, owner: type | None = None) -> Any:
        return self if sample is None else getattr(sample, self.field).hex()

    def __set__(self, sample: Any, value: str) -> None:
        setattr(sample, self.field, bytes.fromhex(value))


@dataclass(slots=True)
class PlannedSample:
    """One item with its bucket and frames chosen; `key` is set once the encoders' fingerprint is known. A rerun
    plans every item of the dataset before it encodes, so this is held once per item: slots, no per-instance dict,
    and the frame indices and notes shared between samples that have the same (read-only, never mutated)."""

    item: DatasetItem
    bucket: tuple[int, int, int]
    indices: list[int]
    fps: float
    source_frames: int
    media_digest: str
    # the sample's key and its halves' keys (precompute/reuse.py; an image-to-video run's third half: the
    # conditioning frames' encoding, pipelines/image.py), set by `SampleKeys`: held as their 16 bytes, read and
    # set as the 32 hex characters every file names them by (`key`, `video_key`, `text_key`, `image_key`)
    key_bytes: bytes = b""
    video_key_bytes: bytes = b""
    text_key_bytes: bytes = b""
    image_key_bytes: bytes = b""
    height: int = 0  # the source's size, for reports
    width: int = 0
    image_digest: str = ""  # the named conditioning image's bytes (`item.image`), when an I2V run uses it
    # kept with a note: (kind, reason) from decoding (alpha composited, variable frame rate); become warnings
    notes: tuple[tuple[str, str], ...] = ()

    key = _HexKey("key_bytes")
    video_key = _HexKey("video_key_bytes")
    text_key = _HexKey("text_key_bytes")
    image_key = _HexKey("image_key_bytes")

    def key_parts(self, encoder_fingerprint: str, encoding: dict[str, Any]) -> dict[str, Any]:
        """Everything that determines this sample's tensors; its hash is the sample key. `encoding` is the run's
        `sample_encoding`: the one place the encoding choices enter keys (and the manifest)."""
        parts = {"media": self.media_digest, "frames": self.indices, "bucket": list(self.bucket),
                 "resize": encoding["resize_mode"], "caption": self.item.caption, "encoders": encoder_fingerprint,
                 "max_sequence_length": encoding["max_sequence_length"]}
        if encoding.get("family_choices"):  # absent for CogVideoX, so its existing keys stay valid
            parts["family_choices"] = encoding["family_choices"]
        if self.image_key:  # an image-to-video sample: its conditioning too (text-to-video keys are unchanged)
            parts["image"] = self.image_key
        return parts

    def conditioning_frames(self, frames: tuple[str, ...]) -> list[int]:
        """The clip's frame indices that condition an image-to-video model: its first (and last) sampled frame."""
        return [self.indices[0] if which == "first" else self.indices[-1] for which in frames]

    def image_half_key(self, video_fingerprint: str, encoding: dict[str, Any]) -> str:
        """The key of the image half: the conditioning frames (media digest, their indices, bucket and resize), the
        clip's frame count (the VAE encodes the frames padded to it), the VAE and the image conditioning of the
        manifest (kind, frames, the image encoder's fingerprint), and the text half's key where the conditioning
        reads the caption too; "" for a text-to-video run."""
        image = encoding.get("image")
        if not image:
            return ""
        frames: list[Any] = self.conditioning_frames(tuple(image["frames"]))
        if self.image_digest:  # a named image in place of the first frame
            frames[0] = {"image": self.image_digest}
        return sample_key({"half": "image", "media": self.media_digest,
                           "frames": frames, "bucket": list(self.bucket),
                           "resize": encoding["resize_mode"], "vae": video_fingerprint, "image": image,
                           "family_choices": encoding.get("family_choices") or {},
                           # a conditioning that reads the caption too (HunyuanVideo-I2V): the text half's key
                           **({"text": self.text_key} if image.get("caption") else {})})

    def half_keys(self, video_fingerprint: str, text_fingerprint: str, encoding: dict[str, Any]) -> tuple[str, str]:
        """The keys of the video half (what the VAE saw, and the VAE) and the text half (the caption, the text
        encoders and the text length); the family's choices enter both. The text key is the prompt table's
        (common/shards/prompts.py), so a validation prompt is keyed as a sample with its caption would be."""
        choices = encoding.get("family_choices") or {}
        video = {"half": "video", "media": self.media_digest, "frames": self.indices, "bucket": list(self.bucket),
                 "resize": encoding["resize_mode"], "vae": video_fingerprint, "family_choices": choices}
        return sample_key(video), text_key(self.item.caption, text_fingerprint, encoding)


def sample_encoding(max_sequence_length: int, family_choices: dict[str, Any], resize_mode: str = RESIZE_MODE
                    ) -> dict[str, Any]:
    """The encoding parameters that shape every sample's tensors: they are written to the manifest and hashed
    into every sample key, so a rerun with other choices (the family's template, crop, layer, normalisation via
    `ModelSpec.encoding_choices`) never reuses samples made with the old ones."""
    return {"max_sequence_length": max_sequence_length, "resize_mode": resize_mode,
            "family_choices": dict(sorted(family_choices.items()))}


def _no_bucket(path: str, frames: int, height: int, width: int, buckets: list[tuple[int, int, int]],
               sampling: str, stride: int, image: bool, max_upscale: float) -> Rejected:
    """Why no bucket takes the item: too short for every bucket it may take, or too small for the ones it fills."""
    pool = bucket_pool(buckets, image)
    if image or choose_bucket(frames, height, width, buckets, sampling, stride) is not None:
        least = min(upscale_factor(height, width, b) for b in pool)
        return Rejected(path, f"too small: {width}x{height} would be enlarged {least:.1f}x even for the smallest "
                              f"bucket it fits (more than --max-upscale {max_upscale:g})", "too-small")
    shortest = min(frames_needed(b[0], sampling, stride) for b in pool)
    what = "video bucket" if any(b[0] == 1 for b in buckets) else "bucket"
    return Rejected(path, f"too short: {frames} frames, the shortest {what} needs {shortest} (with --frame-sampling "
                          f"{sampling} --frame-stride {stride})", "too-short")


def media_facts(path: Path, decoder: str, cache: MediaCache | None = None) -> MediaFacts:
    """A file's probe and digest: from the cache when its stat is unchanged, else probed and hashed (and cached).
    Raises MediaError for a file that cannot be used."""
    found = cache.get(path) if cache is not None else None
    if found is not None:
        return found
    before = signature(path)
    media = open_media(path, decoder)
    facts = MediaFacts(media.num_frames, media.fps, media.height, media.width, file_digest(path),
                       media.timestamps if media.variable_rate else None, tuple(media.notes))
    if cache is not None:
        cache.put(path, facts, before)
    return facts


BLACK = 16  # a conditioning frame whose brightest pixel is below this (of 255) is black


def black_frame_note(item: DatasetItem, frame: Any) -> tuple[str, str] | None:
    """A warning for an image-to-video sample whose conditioning frame (uint8 [H, W, 3]) is black: a fade-in
    trains the model to start every video from black. None for any other frame."""
    if int(frame.max()) >= BLACK:
        return None
    what = f"its conditioning image {item.image}" if item.image else "its first frame"
    return ("black-first-frame", f"{what} is black (brightest pixel {int(frame.max())} of 255): an image-to-video "
                                 "model learns to start from black; trim the fade-in or name another image")


def plan_image(item: DatasetItem, bucket: tuple[int, int, int], decoder: str, cache: MediaCache | None
               ) -> tuple[str, list[tuple[str, str]]] | Rejected:
    """An item's named conditioning image (`item.image`), probed: (its digest, notes), or why it cannot be used. Its
    aspect against the bucket's is a note: it is centre-cropped to the bucket as the clip's frames are."""
    try:
        facts = media_facts(item.image, decoder, cache)
    except MediaError as e:
        return Rejected(str(item.path), f"its conditioning image {item.image}: {e}; fix the file or the row's image "
                                        "column", "conditioning-image")
    notes = []
    aspect, wanted = facts.width / max(1, facts.height), bucket[2] / bucket[1]
    if abs(aspect / wanted - 1) > 0.02:
        notes.append(("conditioning-image-aspect", f"its conditioning image {item.image} is {facts.width}x"
                      f"{facts.height}, another aspect than its {bucket[2]}x{bucket[1]} bucket: centre-cropped to "
                      "it, as the clip's frames are; crop it to the clip's framing to keep what matters"))
    return facts.digest, notes


@lru_cache(maxsize=4096)
def shared_frame_indices(num_frames: int, frames: int, sampling: str, stride: int) -> list[int]:
    """`frame_indices`, one list for every sample with the same source length and bucket frames (most of a large
    dataset shares a few): a planned sample holds it read-only, and a rerun holds a planned sample per item."""
    return frame_indices(num_frames, frames, sampling, stride)


def plan_item(item: DatasetItem, buckets: list[tuple[int, int, int]], sampling: str, stride: int,
              decoder: str, check: BucketCheck, max_upscale: float = 2.0, cache: MediaCache | None = None,
              images: bool = False) -> PlannedSample | Rejected:
    """`images`: an image-to-video run, whose named conditioning images (`item.image`) are probed too."""
    try:
        media = media_facts(item.path, decoder, cache)
    except MediaError as e:
        return Rejected(str(item.path), str(e), e.kind)
    image = is_image(item.path)
    bucket = choose_bucket(media.num_frames, media.height, media.width, buckets, sampling, stride, image=image,
                           max_upscale=max_upscale)
    if bucket is None:
        return _no_bucket(str(item.path), media.num_frames, media.height, media.width, buckets, sampling, stride,
                          image, max_upscale)
    problem = check(bucket)  # an image's 1-frame bucket may be derived, not one the user gave
    if problem:
        return Rejected(str(item.path), f"no bucket for it: {problem}", "no-bucket")
    indices = shared_frame_indices(media.num_frames, bucket[0], sampling, stride)
    notes = list(media.notes)
    reader = media.reader(item.path)
    fps = reader.span_fps(indices)  # a variable-frame-rate clip: measured from its timestamps
    if reader.variable_rate:
        lo, hi = reader.variable_rate
        notes.append(("variable-frame-rate", f"variable frame rate (frames {lo * 1000:.0f} to {hi * 1000:.0f} ms "
                      f"apart; container average {media.fps:.2f} fps): the sampled frames' rate, {fps:.2f} fps, "
                      "is measured from their timestamps; re-encode at a constant rate to train on even spacing"))
    image_digest = ""
    if images and item.image is not None:
        found = plan_image(item, bucket, decoder, cache)
        if isinstance(found, Rejected):
            return found
        image_digest, image_notes = found
        notes += image_notes
    return PlannedSample(item, bucket, indices, fps, media.num_frames, media.digest,
                         height=media.height, width=media.width, notes=tuple(notes), image_digest=image_digest)


class SampleKeys:
    """Sets each sample's content key, and its halves' keys from `halves` (the VAE's and the text encoders'
    fingerprints), one sample at a time; the second of two exact duplicates (same media bytes, frames and caption,
    under any names) is reported, and the first kept."""

    def __init__(self, encoder_fingerprint: str, encoding: dict[str, Any], halves: tuple[str, str] = ("", "")):
        self.encoder_fingerprint, self.encoding, self.halves = encoder_fingerprint, encoding, halves
        self.seen: dict[bytes, Path] = {}  # key (its bytes) -> the path that has it

    def assign(self, p: PlannedSample) -> Rejected | None:
        """Key `p`; a Rejected (kind "duplicate") when its key was seen already, else None."""
        self.key(p)
        if p.key_bytes in self.seen:
            return repeated_key(str(p.item.path), str(self.seen[p.key_bytes]))
        self.seen[p.key_bytes] = p.item.path
        return None

    def key(self, p: PlannedSample) -> None:
        """Set `p`'s key and its halves' keys (its duplicates are the caller's to find: plan_table.first_rows)."""
        p.video_key, p.text_key = p.half_keys(*self.halves, self.encoding)
        p.image_key = p.image_half_key(self.halves[0], self.encoding)
        p.key = sample_key(p.key_parts(self.encoder_fingerprint, self.encoding))


def repeated_key(path: str, first: str) -> Rejected:
    """The warning for a sample whose key an earlier sample (of media `first`) has."""
    return Rejected(path, f"same media bytes, frames and caption as {first}; trained once", "duplicate")


def assign_keys(planned: list[PlannedSample], encoder_fingerprint: str, encoding: dict[str, Any],
                halves: tuple[str, str] = ("", "")) -> tuple[list[PlannedSample], list[Rejected]]:
    """Key every sample (SampleKeys); returns the samples without exact duplicates, and the duplicates as
    warnings."""
    keys = SampleKeys(encoder_fingerprint, encoding, halves)
    out, duplicates = [], []
    for p in planned:
        duplicate = keys.assign(p)
        if duplicate is None:
            out.append(p)
        else:
            duplicates.append(duplicate)
    return out, duplicates

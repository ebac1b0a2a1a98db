"""Which sample each dataset item becomes: probe the media, pick a bucket and frames, and name it by content.

Planning runs before any model is loaded, so a dataset's problems (missing files, unreadable or too-short
videos) show up in seconds, as rejected inputs with reasons, not after the encoders have taken the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ft.common.datasets import DatasetItem
from ft.common.runtime import prefetch_map
from ft.common.shards import file_digest, sample_key
from ft.common.video import MediaError, choose_bucket, frame_indices, frames_needed, is_image, open_media

RESIZE_MODE = "center-crop"
BucketCheck = Callable[[tuple[int, int, int]], "str | None"]


@dataclass
class PlannedSample:
    """One item with its bucket and frames chosen; `key` is set once the encoders' fingerprint is known."""

    item: DatasetItem
    bucket: tuple[int, int, int]
    indices: list[int]
    fps: float
    source_frames: int
    media_digest: str
    key: str = ""

    def key_parts(self, encoder_fingerprint: str, encoding: dict[str, Any]) -> dict[str, Any]:
        """Everything that determines this sample's tensors; its hash is the sample key. `encoding` is the run's
        `sample_encoding`: the one place the encoding choices enter keys (and the manifest)."""
        parts = {"media": self.media_digest, "frames": self.indices, "bucket": list(self.bucket),
                 "resize": encoding["resize_mode"], "caption": self.item.caption, "encoders": encoder_fingerprint,
                 "max_sequence_length": encoding["max_sequence_length"]}
        if encoding.get("family_choices"):  # absent for CogVideoX, so its existing keys stay valid
            parts["family_choices"] = encoding["family_choices"]
        return parts


def sample_encoding(max_sequence_length: int, family_choices: dict[str, Any], resize_mode: str = RESIZE_MODE
                    ) -> dict[str, Any]:
    """The encoding parameters that shape every sample's tensors: they are written to the manifest and hashed
    into every sample key, so a rerun with other choices (the family's template, crop, layer, normalisation via
    `ModelSpec.encoding_choices`) never reuses samples made with the old ones."""
    return {"max_sequence_length": max_sequence_length, "resize_mode": resize_mode,
            "family_choices": dict(sorted(family_choices.items()))}


@dataclass
class Rejected:
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


def plan_item(item: DatasetItem, buckets: list[tuple[int, int, int]], sampling: str, stride: int,
              decoder: str, check: BucketCheck) -> PlannedSample | Rejected:
    try:
        media = open_media(item.path, decoder)
    except MediaError as e:
        return Rejected(str(item.path), str(e))
    image = is_image(item.path)
    bucket = choose_bucket(media.num_frames, media.height, media.width, buckets, sampling, stride, image=image)
    if bucket is None:
        shortest = min(frames_needed(b[0], sampling, stride) for b in buckets)
        return Rejected(str(item.path), f"too short: {media.num_frames} frames, the smallest bucket needs {shortest}"
                                        f" (with --frame-sampling {sampling} --frame-stride {stride})")
    problem = check(bucket)  # an image's 1-frame bucket may be derived, not one the user gave
    if problem:
        return Rejected(str(item.path), f"no bucket for it: {problem}")
    indices = frame_indices(media.num_frames, bucket[0], sampling, stride)
    return PlannedSample(item, bucket, indices, media.fps, media.num_frames, file_digest(item.path))


def plan_samples(items: list[DatasetItem], buckets: list[tuple[int, int, int]], sampling: str, stride: int,
                 decoder: str, workers: int, check: BucketCheck) -> tuple[list[PlannedSample], list[Rejected]]:
    """Plan every item (in parallel threads); rejected items come back with their reasons. `check` says why the
    model cannot take a bucket (None when it can)."""
    planned, rejected = [], []
    for result in prefetch_map(lambda it: plan_item(it, buckets, sampling, stride, decoder, check), items, workers,
                               ahead=max(4, workers * 4)):
        (rejected if isinstance(result, Rejected) else planned).append(result)
    return planned, rejected


def assign_keys(planned: list[PlannedSample], encoder_fingerprint: str, encoding: dict[str, Any]
                ) -> list[PlannedSample]:
    """Set each sample's content key; drop exact duplicates (same media, frames and caption twice)."""
    seen, out = set(), []
    for p in planned:
        p.key = sample_key(p.key_parts(encoder_fingerprint, encoding))
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out

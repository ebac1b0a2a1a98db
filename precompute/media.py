"""Video and image decoding, frame sampling, bucketing and resize/crop: stage 1's view of media (train/video_writer.py
writes mp4s).

Decoding uses decord when it is installed (fast, seeks by index) and PyAV otherwise; images (png, jpg, webp) are
1-frame videos. `open_media` probes a file from its container's headers; `MediaReader.read(indices)` decodes just
the frames a bucket needs. Frames are returned as uint8 tensors [F, H, W, 3].

The probe decodes no frame of an mp4/mov: size and frame rate come from PyAV's stream header, the display rotation
from the track header (display_matrix.py), the frame count from the header (else the packets), the frames'
timestamps from the packets (demuxed, not decoded). A frame is decoded only where the header cannot say: the
rotation of a video in another container (Matroska can carry one), a frame count no header or packet gives, and
an image (a still is its one frame: its EXIF orientation may trail the pixels in a PNG, and whether it has
transparent pixels, which the alpha note reports, is in the pixels).

Media are decoded as people see them, whichever decoder runs:
- a video's rotation (the mp4/mov display matrix a phone writes) is applied: decord does it itself, PyAV does not,
  so PyAV's frames are turned by the angle each frame carries (`frame.rotation`); both give the same frames;
- an image's EXIF orientation is applied (`ImageOps.exif_transpose`);
- 16-bit images (`I;16`, `I`) are scaled to 8 bits (65535 -> 255), never clipped to white; greyscale and
  palette images become RGB;
- transparency (RGBA, LA, a palette or colour key with transparency) is composited on WHITE, the background
  image viewers and web pages show, and noted (`alpha-composited`): the model trains on what a viewer sees, and
  the note says so rather than silently dropping the alpha channel (which turns transparent pixels black);
- a variable-frame-rate video (frame intervals differing by more than 10%) is measured from its timestamps: the
  frame rate recorded for a sample is that of its sampled frames' time span, and the clip is noted
  (`variable-frame-rate`).
Notes travel in `MediaReader.notes` as (kind, reason); the data policy turns them into manifest warnings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .display_matrix import quarter_turns

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif"}
FRAME_SAMPLING = ("head", "uniform")
# how a frame becomes a bucket's size: scale to cover then centre-crop; scale to the size (aspect not kept, as
# finetrainers' "bicubic"); or centre-crop without scaling (finetrainers' "center_crop")
RESIZE_MODES = ("center-crop", "stretch", "crop")


class MediaError(Exception):
    """A media file could not be read; precompute records it as a rejected input with this reason and `kind`
    (missing, zero-byte, not-media, truncated, decode-failed)."""

    def __init__(self, reason: str, kind: str = "not-media"):
        super().__init__(reason)
        self.kind = kind


# frame intervals that differ by more than this share of the shortest make a clip variable-frame-rate
VFR_TOLERANCE = 0.1
# what transparent pixels are composited on (see the module docstring)
ALPHA_BACKGROUND = 255


# the first bytes of container formats we read: a file that starts like one but does not open is cut short
_SIGNATURES = ((4, b"ftyp", "mp4/mov"), (0, b"\x1a\x45\xdf\xa3", "mkv/webm"), (0, b"RIFF", "avi"),
               (0, b"GIF8", "gif"), (0, b"\x89PNG", "png"), (0, b"\xff\xd8\xff", "jpeg"))


def _unreadable(path: Path, what: str, error: Exception) -> MediaError:
    """A MediaError saying whether the file looks cut short (a known container's start) or is no media at all."""
    with open(path, "rb") as f:
        head = f.read(16)
    for offset, magic, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return MediaError(f"truncated or damaged {name} file: {error}", "truncated")
    return MediaError(f"not a readable {what}: {error}", "not-media")


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class MediaReader:
    """A probed media file: its frame count, fps and size, and a way to decode chosen frames."""

    path: Path
    num_frames: int
    fps: float
    height: int  # as displayed: after rotation / EXIF orientation
    width: int
    backend: str = "auto"  # which decoder `read` uses: auto (decord, else PyAV), decord or pyav
    # each frame's presentation time in seconds from the first, when the container gives them
    timestamps: list[float] | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)  # (kind, reason): kept, with a note

    def read(self, indices: list[int]) -> np.ndarray:
        """Decode the frames at `indices` as uint8 [F, H, W, 3]."""
        if is_image(self.path):
            return _read_image(self.path)[0][None].repeat(len(indices), 0)
        if self.backend in ("auto", "decord") and _have_decord():
            import decord

            try:
                reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=1)
                return reader.get_batch(indices).asnumpy()
            except Exception:  # decord fails on some frame sizes (row alignment) and files; PyAV decodes them
                pass
        return _pyav_read(self.path, indices)

    @property
    def variable_rate(self) -> tuple[float, float] | None:
        """(shortest, longest) frame interval in seconds when they differ by more than VFR_TOLERANCE, else None."""
        if not self.timestamps or len(self.timestamps) < 3:
            return None
        gaps = [b - a for a, b in zip(self.timestamps[:-1], self.timestamps[1:], strict=True) if b > a]
        if len(gaps) < 2:
            return None
        lo, hi = min(gaps), max(gaps)
        return (lo, hi) if hi > lo * (1 + VFR_TOLERANCE) and hi - lo > 1e-3 else None

    def span_fps(self, indices: list[int]) -> float:
        """The frame rate to record for a sample of `indices`: for a variable-frame-rate clip, measured from the
        timestamps (the sampled frames' index span over their time span), else the container's average."""
        if self.variable_rate and len(indices) > 1 and self.timestamps and max(indices) < len(self.timestamps):
            first, last = min(indices), max(indices)
            seconds = self.timestamps[last] - self.timestamps[first]
            if seconds > 0:
                return (last - first) / seconds
        return self.fps


def _image_to_rgb(im: object) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """A PIL image as displayed, uint8 [H, W, 3]: EXIF orientation applied, 16-bit scaled, alpha on white."""
    from PIL import Image, ImageOps

    assert isinstance(im, Image.Image)
    im = ImageOps.exif_transpose(im) or im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":  # float greyscale: 0..1 when it fits there, else 0..255
            peak = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        else:  # 16-bit: I;16*, or I as Pillow opens some 16-bit files (values above 255 say so)
            peak = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1), []
    transparent = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not transparent:
        return np.asarray(im.convert("RGB")), []
    rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    if alpha.min(initial=1.0) >= 1.0:
        return np.ascontiguousarray(rgba[..., :3].astype(np.uint8)), []
    rgb = rgba[..., :3] * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
    share = float((alpha < 1.0).mean())
    return np.round(rgb).astype(np.uint8), [("alpha-composited", f"has transparency ({share:.0%} of its pixels): "
                                            "composited on white, as viewers show it; flatten it yourself to "
                                            "choose another background")]


def _read_image(path: Path) -> tuple[np.ndarray, list[tuple[str, str]]]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _image_to_rgb(im)
    except Exception as e:  # PIL raises many types for bad files
        raise _unreadable(path, "image", e) from e


def _rotated(frame: object) -> np.ndarray:
    """A PyAV frame as RGB, turned by its display rotation (counter-clockwise degrees) as decord turns it."""
    image = frame.to_ndarray(format="rgb24")  # type: ignore[attr-defined]
    turns = round(getattr(frame, "rotation", 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _have_decord() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def open_media(path: str | Path, backend: str = "auto") -> MediaReader:
    """Probe a video or image (see the module docstring: a video's headers, no frame decoded for mp4/mov).
    `backend` is the decoder `read` uses: 'auto' (decord, else PyAV), 'decord' or 'pyav'. The probe's answers are
    the decoder's: the displayed size (decord turns rotated frames itself, PyAV's are turned by `_rotated`),
    the frame count each indexes frames by."""
    path = Path(path)
    if not path.is_file():
        raise MediaError("file not found", "missing")
    if path.stat().st_size == 0:
        raise MediaError("zero-byte file", "zero-byte")
    if is_image(path):
        frame, notes = _read_image(path)
        return MediaReader(path, 1, 0.0, frame.shape[0], frame.shape[1], backend, notes=notes)
    return _probe_video(path, backend)


# FFmpeg's stream probing (avformat_find_stream_info) decodes up to 7 H.264 frames to guess the decoder's delay,
# which a probe does not need: 250 ms of a 1080p probe's 251 (bench/probe.py). With the probing decoder told to
# skip every frame, the header gives the same size, rate, count and time base (compared on mp4, mov, mkv, webm,
# avi, gif); a header without the size (a bare stream) is probed again the usual way.
_HEADER_ONLY = {"skip_frame": "all"}


def _probe_video(path: Path, backend: str) -> MediaReader:
    import av

    try:
        container = av.open(str(path), options=_HEADER_ONLY)
        if container.streams.video and not (container.streams.video[0].codec_context.width
                                            and container.streams.video[0].codec_context.height):
            container.close()
            container = av.open(str(path))
        with container:
            if not container.streams.video:  # also what a cut-off mp4 without its index looks like
                raise _unreadable(path, "video", MediaError("the file has no video stream"))
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            n = stream.frames
            h, w = stream.codec_context.height, stream.codec_context.width
            turns = quarter_turns(path, container.format.name)
            if turns is None:  # a container whose header this does not read: the first frame says
                turns = _first_frame_quarter_turns(container)
            if turns % 2:
                h, w = w, h
            pts = _packet_times(container, stream)
            if not n:  # the header does not say: decord indexes the packets; PyAV counts decoded frames
                if pts and backend != "pyav" and _have_decord():
                    n = len(pts)
                else:
                    container.seek(0)
                    n = sum(1 for _ in container.decode(video=0))
            base = float(stream.time_base or 0)
    except MediaError:
        raise
    except Exception as e:  # av.error.* and friends
        raise _unreadable(path, "video", e) from e
    if n == 0:
        raise MediaError("the video has no frames")
    times = [float(t - pts[0]) * base for t in pts] if base and len(pts) == n else None
    return MediaReader(path, n, fps, h, w, backend, timestamps=times)


def _first_frame_quarter_turns(container: object) -> int:
    """The display rotation in quarter turns, read from the first frame (PyAV carries it on frames); 0 when the
    first frame does not decode (reading the frames then names the problem)."""
    try:
        first = next(container.decode(video=0), None)  # type: ignore[attr-defined]
    except Exception:  # av.error.*
        return 0
    return round(getattr(first, "rotation", 0) / 90) % 4 if first is not None else 0


def _packet_times(container: object, stream: object) -> list[int]:
    """The video packets' presentation times (in the stream's time base), sorted: the frames' timestamps without
    decoding. A file damaged further on gives none (decoding it names the problem later, as mid-file)."""
    try:
        container.seek(0)  # type: ignore[attr-defined]
        return sorted(p.pts for p in container.demux(stream) if p.pts is not None)  # type: ignore[attr-defined]
    except Exception:  # av.error.*: the timestamps are a refinement, not a requirement
        return []


def _pyav_read(path: Path, indices: list[int]) -> np.ndarray:
    import av

    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = _rotated(frame)
                if i >= max(indices):
                    break
    except Exception as e:
        raise MediaError(f"decoding frames failed mid-file: {e}", "decode-failed") from e
    missing = wanted - frames.keys()
    if missing:
        raise MediaError(f"decoding failed mid-file: the video ended before frame {min(missing)} (it claims "
                         f"more frames; truncated?)", "decode-failed")
    return np.stack([frames[i] for i in indices])


# ---------------------------------------------------------------------------------------------- buckets


def frames_needed(frames: int, sampling: str, stride: int) -> int:
    """How many source frames a bucket of `frames` frames consumes."""
    return (frames - 1) * stride + 1 if sampling == "head" else frames


def upscale_factor(height: int, width: int, bucket: tuple[int, int, int]) -> float:
    """How much resize-to-cover enlarges a height x width frame to fill `bucket` (1.0 or less: no upscaling)."""
    return max(bucket[1] / height, bucket[2] / width)


def bucket_pool(buckets: list[tuple[int, int, int]], image: bool) -> list[tuple[int, int, int]]:
    """The buckets an item may take: an image the 1-frame ones (else 1-frame versions of all), a video the
    multi-frame ones when there are any."""
    if image:
        return [b for b in buckets if b[0] == 1] or [(1, h, w) for _, h, w in buckets]
    return [b for b in buckets if b[0] > 1] or buckets


def choose_bucket(num_frames: int, height: int, width: int, buckets: list[tuple[int, int, int]], sampling: str,
                  stride: int, image: bool = False, max_upscale: float = math.inf) -> tuple[int, int, int] | None:
    """The bucket nearest in aspect ratio among those whose frame count the clip can fill and which need no
    more than `max_upscale` enlargement.

    Ties go to more frames, then more pixels. An image takes a 1-frame bucket when there is one, else the size of
    the nearest-aspect bucket with 1 frame; a video takes a multi-frame bucket when there is one. None when the
    clip is too short (or too small) for every bucket it may take.
    """
    aspect = math.log(width / height)
    # 1-frame buckets are for images, unless they are all there is (training on stills of videos)
    pool = [b for b in bucket_pool(buckets, image) if (image or frames_needed(b[0], sampling, stride) <= num_frames)
            and upscale_factor(height, width, b) <= max_upscale + 1e-9]
    if not pool:
        return None
    return min(pool, key=lambda b: (round(abs(math.log(b[2] / b[1]) - aspect), 6), -b[0], -b[1] * b[2]))


def frame_indices(num_frames: int, frames: int, sampling: str, stride: int) -> list[int]:
    """Which source frames fill a bucket of `frames`: the head of the clip at `stride`, or spread uniformly."""
    if frames == 1:
        return [0]
    if sampling == "head":
        return list(range(0, (frames - 1) * stride + 1, stride))
    return [int(round(x)) for x in np.linspace(0, num_frames - 1, frames)]


def resize_to_bucket(frames: np.ndarray, height: int, width: int, mode: str = "center-crop") -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, height, width] in [-1, 1], by `mode` (one of RESIZE_MODES).

    A frame smaller than the bucket cannot be `crop`ped: that raises MediaError (the clip is rejected).
    """
    import torch
    import torch.nn.functional as F

    if mode == "center-crop":
        return resize_center_crop(frames, height, width)
    assert mode in RESIZE_MODES, mode
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if mode == "stretch":
        if (h, w) != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
    else:
        if h < height or w < width:
            raise MediaError(f"{w}x{h} frames are smaller than the {width}x{height} bucket and --resize-mode crop "
                             "does not scale")
        top, left = (h - height) // 2, (w - width) // 2
        x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1)


def effective_fps(source_fps: float, indices: list[int]) -> float | None:
    """The frame rate of the sampled frames: the source fps over their mean spacing (a stride of 2 halves it).
    None for a single frame (a still) or a source whose fps is unknown."""
    if len(indices) < 2 or not source_fps or source_fps <= 0 or indices[-1] == indices[0]:
        return None
    return float(source_fps) * (len(indices) - 1) / (indices[-1] - indices[0])


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, height, width] in [-1, 1]: scaled to cover, then centre-cropped."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1)

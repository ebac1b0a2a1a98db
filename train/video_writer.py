"""Writing frames as an H.264 mp4: what `ft generate` and validation make, and what tests and the demo use to make
clips for stage 1 to read (PyAV, libx264)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8.0, reproducible: bool = False,
                faststart: bool = False, rotation: int = 0, frame_times: list[float] | None = None) -> Path:
    """Write uint8 [F, H, W, 3] frames as an H.264 mp4 (yuv420p; odd sizes are padded to even).

    `reproducible`: the same frames give the same bytes in any process. x264's SIMD code gave another byte
    stream for the same frames once the process had decoded video (seen on the test fixtures, whose sample keys
    hash the bytes), so this turns it off: slower, for small generated datasets. `faststart`: the index (moov)
    before the frames, as streaming sites write mp4s. `rotation`: a display rotation (counter-clockwise degrees) in
    the container, as a phone records a portrait clip. `frame_times`: each frame's time in seconds (a variable frame
    rate), instead of 1/fps apart."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, dtype=np.uint8)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), mode="w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001) if fps > 0 else 8)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"crf": "18", "threads": "1"}  # x264 with threads gave different bytes run to run
        if reproducible:
            stream.options = {**stream.options, "x264-params": "asm=0"}
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if frame_times is not None:
                picture.pts, picture.time_base = round(frame_times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path

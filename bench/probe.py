"""What planning pays per clip to probe it: the probe before (it decoded frame 0) against the header-only probe.

    python bench/probe.py [--frames 49] [--repeats 15] [--no-save]

Writes a 480x720 and a 1080x1920 H.264 clip (fine noise that moves, so frame 0 is a real-sized I-frame; one
plain, one with a 90-degree display rotation, as a phone writes), then times, per clip, the median of
`--repeats` calls of:
- before, decord: what `open_media` did with decord installed: open a VideoReader, decode frame 0 for its
  displayed size, read the frame timestamps (copied here as it was, as the baseline);
- before, PyAV: open the container, decode frame 0 for its rotation, demux every packet for the timestamps;
- now: `ft.precompute.media.open_media` (headers: the stream header, the mp4 display matrix, packet timestamps), for
  the decord and the PyAV backend; both give the sizes, frame count and rate the old probes gave (checked).
The file's sha256 (the other half of planning a new file) is timed beside them. All from the page cache.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from report import save_result

from ft.precompute.media import open_media
from ft.train.video_writer import write_video

SIZES = {"480p": (480, 720), "1080p": (1080, 1920)}


def make_clip(path: Path, height: int, width: int, frames: int, rotation: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 2, width // 2, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)
    clip = np.stack([np.roll(base, 2 * i, axis=1) for i in range(frames)])
    if rotation:  # the pixels a camera stores for a portrait clip: the picture turned the other way
        clip = np.stack([np.rot90(f, -rotation // 90) for f in clip])
    return write_video(path, clip, fps=24, rotation=rotation)


def before_decord(path: Path) -> tuple:
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    h, w = vr[0].shape[:2]
    vr.seek(0)
    vr.get_frame_timestamp(range(n))
    return n, float(vr.get_avg_fps()), int(h), int(w)


def before_pyav(path: Path) -> tuple:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps, n = float(stream.average_rate), stream.frames
        h, w = stream.codec_context.height, stream.codec_context.width
        turns = round(next(container.decode(video=0)).rotation / 90) % 4
        if turns % 2:
            h, w = w, h
        container.seek(0)
        sorted(p.pts for p in container.demux(stream) if p.pts is not None)
    return n, fps, h, w


def now(backend: str):
    def probe(path: Path) -> tuple:
        m = open_media(path, backend)
        return m.num_frames, m.fps, m.height, m.width
    return probe


def sha256(path: Path) -> tuple:
    return (hashlib.sha256(path.read_bytes()).hexdigest(),)


def median_ms(fn, path: Path, repeats: int) -> tuple[float, tuple]:
    result = fn(path)  # warm: page cache, imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    ways = [("before, decord (frame 0 decoded)", before_decord), ("now, decord backend (headers)", now("decord")),
            ("before, PyAV (frame 0 decoded)", before_pyav), ("now, PyAV backend (headers)", now("pyav")),
            ("sha256 of the file", sha256)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (h, w) in SIZES.items():
            for rotation in (0, 90):
                path = make_clip(Path(tmp) / f"{name}-{rotation}.mp4", h, w, args.frames, rotation)
                timed = {label: median_ms(fn, path, args.repeats) for label, fn in ways}
                answers = {r for label, (_, r) in timed.items() if not label.startswith("sha")}
                assert len(answers) == 1, answers  # every probe: the same frames, fps and displayed size
                rows.append((f"{name}{' rotated 90' if rotation else ''}", path.stat().st_size / 2**20,
                             [timed[label][0] for label, _ in ways]))
    head = "| clip | MB | " + " | ".join(label for label, _ in ways) + " | decord: now / before |"
    lines = [head, "|" + "---|" * (len(ways) + 3)]
    for clip, mb, ms in rows:
        lines.append(f"| {clip} | {mb:.1f} | " + " | ".join(f"{v:.1f} ms" for v in ms) + f" | {ms[1] / ms[0]:.2f} |")
    body = (f"Probe time per clip ({args.frames} frames, H.264, median of {args.repeats}; the same answers from "
            "every probe, checked):\n\n" + "\n".join(lines) + "\n")
    if args.no_save:
        print(body)
    else:
        save_result("probe", body)


if __name__ == "__main__":
    main()

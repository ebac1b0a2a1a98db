"""The display rotation an mp4/mov header records, read from the header alone (no frame decoded).

A phone stores a portrait clip as landscape pixels plus a display matrix in the track header (`tkhd`), combined
with the movie header's (`mvhd`); players turn the picture by it. FFmpeg reads it into the stream's coded side
data, but PyAV 18 exposes it only on decoded frames (`VideoFrame.rotation`; the stream getter was removed with
AVStream.side_data), and decoding a frame is most of a probe's cost (3-5x a header read at 1080p). So the probe
reads the matrix here, as FFmpeg's mov demuxer does (`mov_read_tkhd`: the track matrix times the movie matrix,
16.16 / 2.30 fixed point) and turns it into an angle as `av_display_rotation_get` does: the same number
`VideoFrame.rotation` gives (tests compare the two). Only ISO base media files (mp4, mov, m4v, 3gp) are read;
for other containers `quarter_turns` returns None and the caller decodes a frame.

The walk reads box headers only (8-16 bytes each, seeking over `mdat`), so a file whose index sits at its end
costs a few small reads, not a read of the file.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

IDENTITY = (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)
_SHIFTS = (16, 16, 30)  # the matrix's columns: 16.16, 16.16 and 2.30 fixed point
# where the matrix sits in each box's payload, for box versions 0 and 1 (64-bit times)
_MVHD_MATRIX = (36, 48)
_TKHD_MATRIX = (40, 52)


def boxes(f: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of each box between `start` and `end`; stops at a damaged header."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        head = f.read(16)
        if len(head) < 8:
            return
        size, kind = struct.unpack(">I4s", head[:8])
        body = pos + 8
        if size == 1:  # a 64-bit size follows
            if len(head) < 16:
                return
            size, body = struct.unpack(">Q", head[8:16])[0], pos + 16
        elif size == 0:  # to the end of the enclosing box (or file)
            size = end - pos
        if size < body - pos:
            return
        yield kind, body, min(pos + size, end)
        pos += size


def _matrix(f: BinaryIO, body: int, offsets: tuple[int, int]) -> tuple[int, ...] | None:
    f.seek(body)
    version = f.read(1)
    if not version:
        return None
    f.seek(body + offsets[1 if version[0] == 1 else 0])
    data = f.read(36)
    return struct.unpack(">9i", data) if len(data) == 36 else None


def _video_track_matrix(f: BinaryIO, body: int, end: int) -> tuple[int, ...] | None:
    """The `tkhd` matrix of a `trak` whose handler is `vide`, else None."""
    matrix, video = None, False
    for kind, child, child_end in boxes(f, body, end):
        if kind == b"tkhd":
            matrix = _matrix(f, child, _TKHD_MATRIX)
        elif kind == b"mdia":
            for sub, sub_body, _ in boxes(f, child, child_end):
                if sub == b"hdlr":
                    f.seek(sub_body + 8)  # version/flags, pre_defined, then the handler type
                    video = f.read(4) == b"vide"
    return matrix if video else None


def display_matrix(path: str | Path) -> tuple[int, ...] | None:
    """The first video track's display matrix (track x movie, as FFmpeg combines them), row-major; None when the
    file has no readable `moov` with a video track."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        for kind, body, end in boxes(f, 0, size):
            if kind != b"moov":
                continue
            movie, track = IDENTITY, None
            for sub, sub_body, sub_end in boxes(f, body, end):
                if sub == b"mvhd":
                    movie = _matrix(f, sub_body, _MVHD_MATRIX) or IDENTITY
                elif sub == b"trak" and track is None:
                    track = _video_track_matrix(f, sub_body, sub_end)
            if track is None:
                return None
            return tuple(sum((track[i * 3 + e] * movie[e * 3 + j]) >> _SHIFTS[e] for e in range(3))
                         for i in range(3) for j in range(3))
    return None


def rotation_degrees(matrix: tuple[int, ...]) -> float:
    """The counter-clockwise rotation of a display matrix, as FFmpeg's av_display_rotation_get (NaN when
    degenerate)."""
    a, b, c, d = (v / 65536.0 for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if scale_x == 0 or scale_y == 0:
        return math.nan
    return -math.degrees(math.atan2(b / scale_y, a / scale_x))


def quarter_turns(path: str | Path, format_names: str) -> int | None:
    """The display rotation of a video in quarter turns (counter-clockwise), read from its header; None when the
    container (PyAV's `container.format.name`, e.g. "mov,mp4,m4a,3gp,3g2,mj2") is not one whose header this
    reads, or the header cannot be read (the caller then reads a decoded frame's rotation)."""
    if not {"mov", "mp4"} & set(format_names.split(",")):
        return None
    try:
        matrix = display_matrix(path)
    except (OSError, struct.error):
        return None
    if matrix is None:
        return None
    degrees = rotation_degrees(matrix)
    return 0 if math.isnan(degrees) else round(degrees / 90) % 4

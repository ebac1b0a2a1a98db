"""Small real datasets made on the spot: mp4 clips of moving coloured shapes with captions that describe them.

Used by `ft demo` and by the tests (real files, decoded for real). Deterministic for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ft.pipelines.tiny import COLORS, MOTIONS, SHAPES
from ft.train.video_writer import write_video

LAYOUTS = ("list", "sidecar", "csv", "jsonl", "json", "parquet")


def shape_clip(shape: str, color: str, motion: str, frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [frames, height, width, 3]: a shape crossing a dark background."""
    yy, xx = np.mgrid[0:height, 0:width]
    r = max(3, min(height, width) // 5)
    dx, dy = MOTIONS[motion]
    out = np.zeros((frames, height, width, 3), dtype=np.uint8)
    out[...] = (20, 20, 30)
    for t in range(frames):
        p = t / max(1, frames - 1)
        cx = width / 2 + dx * (p - 0.5) * (width - 2 * r)
        cy = height / 2 + dy * (p - 0.5) * (height - 2 * r)
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            mask = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
        out[t][mask] = COLORS[color]
    return out


def make_shapes_dataset(folder: str | Path, num_clips: int = 8, frames: int = 17, sizes: tuple = ((32, 32),),
                        layout: str = "list", num_images: int = 0, seed: int = 0, fps: float = 8.0) -> Path:
    """Write `num_clips` mp4 clips (and `num_images` png stills) with captions in the given layout.

    `sizes` are (height, width) pairs, cycled, so a dataset can span several aspect ratios.
    """
    from PIL import Image

    assert layout in LAYOUTS, layout
    folder = Path(folder)
    media_dir = folder / "videos"
    media_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_clips + num_images):
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
        h, w = sizes[i % len(sizes)]
        if i < num_clips:
            clip = shape_clip(shape, color, motion, frames, h, w)
            path = write_video(media_dir / f"clip_{i:03d}.mp4", clip, fps, reproducible=True)
            caption = f"a {color} {shape} moving {motion} on a dark background"
        else:
            still = shape_clip(shape, color, motion, 3, h, w)[1]
            path = media_dir / f"still_{i:03d}.png"
            Image.fromarray(still).save(path)
            caption = f"a {color} {shape} on a dark background"
        rows.append({"video": str(path.relative_to(folder)), "caption": caption})
    _write_layout(folder, rows, layout)
    return folder


def _write_layout(folder: Path, rows: list[dict], layout: str) -> None:
    if layout == "list":
        (folder / "videos.txt").write_text("".join(r["video"] + "\n" for r in rows))
        (folder / "prompts.txt").write_text("".join(r["caption"] + "\n" for r in rows))
    elif layout == "sidecar":
        for r in rows:
            (folder / r["video"]).with_suffix(".txt").write_text(r["caption"] + "\n")
    elif layout == "csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.Table.from_pylist(rows), folder / "metadata.csv")
    elif layout == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "json":
        (folder / "metadata.json").write_text(json.dumps(rows, indent=1))
    elif layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), folder / "metadata.parquet")

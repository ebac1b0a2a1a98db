"""Shared fixtures for the media tests: small real mp4 clips, written once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ft.cli.synthetic import shape_clip
from ft.train.video_writer import write_video


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def clip_32x32(media_dir: Path) -> tuple[Path, np.ndarray]:
    """A 9-frame 32x32 mp4 and the uint8 frames it was written from."""
    frames = shape_clip("square", "red", "left to right", 9, 32, 32)
    return write_video(media_dir / "sq_32x32.mp4", frames, fps=8.0), frames


@pytest.fixture(scope="session")
def clip_32x48(media_dir: Path) -> tuple[Path, np.ndarray]:
    """A 9-frame 32 (high) x 48 (wide) mp4: a size decord mis-decodes (row alignment), so PyAV must take over."""
    frames = shape_clip("circle", "blue", "top to bottom", 9, 32, 48)
    return write_video(media_dir / "circle_32x48.mp4", frames, fps=8.0), frames

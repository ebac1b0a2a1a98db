"""Decoding (decord and PyAV agree), frame sampling, bucketing and resize/crop, on real mp4 files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ft.cli.synthetic import COLORS, shape_clip
from ft.common.errors import UserError
from ft.common.shards import parse_bucket
from ft.precompute.media import (
    MediaError,
    choose_bucket,
    frame_indices,
    frames_needed,
    is_image,
    open_media,
    resize_center_crop,
)
from ft.train.video_writer import write_video

BACKENDS = ("auto", "decord", "pyav")


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_32x32(clip_32x32: tuple[Path, np.ndarray], backend: str) -> None:
    path, src = clip_32x32
    r = open_media(path, backend)
    assert (r.num_frames, r.height, r.width) == (9, 32, 32)
    assert r.fps == pytest.approx(8.0)
    frames = r.read(list(range(9)))
    assert frames.dtype == np.uint8 and frames.shape == (9, 32, 32, 3)
    # lossy H.264 (yuv420p chroma subsampling smears the shape's edges), but the picture is the one written
    assert np.abs(frames.astype(np.int32) - src.astype(np.int32)).mean() < 8


def test_backends_decode_the_same_frames(clip_32x32: tuple[Path, np.ndarray]) -> None:
    path, _ = clip_32x32
    indices = [0, 3, 4, 8]
    decoded = {b: open_media(path, b).read(indices) for b in BACKENDS}
    for b in BACKENDS:
        assert decoded[b].shape == (4, 32, 32, 3)
    assert _max_diff(decoded["auto"], decoded["pyav"]) <= 3
    assert _max_diff(decoded["decord"], decoded["pyav"]) <= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_picks_the_requested_frames_in_order(clip_32x32: tuple[Path, np.ndarray], backend: str) -> None:
    path, _ = clip_32x32
    r = open_media(path, backend)
    every = r.read(list(range(9)))
    picked = r.read([8, 2, 5])
    assert _max_diff(picked, every[[8, 2, 5]]) <= 3
    # the clip moves, so different frames really differ
    assert _max_diff(every[0], every[8]) > 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_32x48_decodes_with_the_right_shape(clip_32x48: tuple[Path, np.ndarray], backend: str) -> None:
    path, src = clip_32x48
    r = open_media(path, backend)
    assert (r.num_frames, r.height, r.width) == (9, 32, 48)
    frames = r.read([0, 4, 8])
    assert frames.shape == (3, 32, 48, 3)
    assert np.abs(frames.astype(np.int32) - src[[0, 4, 8]].astype(np.int32)).mean() < 8
    reference = open_media(path, "pyav").read([0, 4, 8])
    assert _max_diff(frames, reference) <= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_past_the_end(clip_32x32: tuple[Path, np.ndarray], backend: str) -> None:
    path, _ = clip_32x32
    with pytest.raises(MediaError, match="ended before frame 100"):
        open_media(path, backend).read([0, 100])


def test_odd_sizes_are_padded_to_even(tmp_path: Path) -> None:
    src = shape_clip("circle", "green", "right to left", 3, 33, 47)
    r = open_media(write_video(tmp_path / "odd.mp4", src), "pyav")
    assert (r.num_frames, r.height, r.width) == (3, 34, 48)
    frames = r.read([0, 1, 2])
    assert np.abs(frames[:, :33, :47].astype(np.int32) - src.astype(np.int32)).mean() < 8


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_images_are_one_frame(tmp_path: Path, suffix: str, backend: str) -> None:
    still = shape_clip("square", "yellow", "left to right", 3, 24, 40)[1]
    path = tmp_path / f"still{suffix}"
    Image.fromarray(still).save(path)
    assert is_image(path)
    r = open_media(path, backend)
    assert (r.num_frames, r.height, r.width) == (1, 24, 40)
    frames = r.read([0])
    assert frames.shape == (1, 24, 40, 3) and frames.dtype == np.uint8
    if suffix == ".png":
        np.testing.assert_array_equal(frames[0], still)
    # a bucket of several frames repeats the still
    assert r.read([0, 0, 0]).shape == (3, 24, 40, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path: Path, backend: str) -> None:
    with pytest.raises(MediaError, match="not found"):
        open_media(tmp_path / "absent.mp4", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_mp4(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MediaError, match="not a readable video"):
        open_media(path, backend)


def test_garbage_png(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x00not an image" * 50)
    with pytest.raises(MediaError, match="not a readable image"):
        open_media(path)


def test_media_error_is_not_a_user_error() -> None:
    assert not issubclass(MediaError, UserError)


# ---------------------------------------------------------------------------------------------- frame sampling


def test_frame_indices_head() -> None:
    assert frame_indices(17, 5, "head", 1) == [0, 1, 2, 3, 4]
    assert frame_indices(17, 5, "head", 2) == [0, 2, 4, 6, 8]
    assert frame_indices(17, 9, "head", 2) == list(range(0, 17, 2))


def test_frame_indices_uniform() -> None:
    assert frame_indices(17, 5, "uniform", 1) == [0, 4, 8, 12, 16]
    assert frame_indices(10, 4, "uniform", 1) == [0, 3, 6, 9]
    assert frame_indices(5, 5, "uniform", 3) == [0, 1, 2, 3, 4]  # stride does not matter to uniform
    idx = frame_indices(100, 7, "uniform", 1)
    assert idx[0] == 0 and idx[-1] == 99 and idx == sorted(set(idx))


@pytest.mark.parametrize("sampling", ["head", "uniform"])
def test_frame_indices_single_frame(sampling: str) -> None:
    assert frame_indices(50, 1, sampling, 4) == [0]


@pytest.mark.parametrize("sampling,stride", [("head", 1), ("head", 2), ("head", 3), ("uniform", 1), ("uniform", 2)])
@pytest.mark.parametrize("frames", [1, 2, 5, 9])
def test_frame_indices_fit_frames_needed(sampling: str, stride: int, frames: int) -> None:
    need = frames_needed(frames, sampling, stride)
    idx = frame_indices(need, frames, sampling, stride)
    assert len(idx) == frames
    assert 0 <= min(idx) and max(idx) < need


def test_frames_needed() -> None:
    assert frames_needed(49, "head", 1) == 49
    assert frames_needed(49, "head", 2) == 97
    assert frames_needed(49, "uniform", 2) == 49
    assert frames_needed(1, "head", 3) == 1


# ---------------------------------------------------------------------------------------------- buckets


BUCKETS = [(9, 32, 32), (9, 32, 48), (17, 32, 48), (9, 48, 32)]


def test_choose_bucket_nearest_aspect() -> None:
    assert choose_bucket(17, 320, 480, BUCKETS, "head", 1) == (17, 32, 48)
    assert choose_bucket(17, 480, 320, BUCKETS, "head", 1) == (9, 48, 32)
    assert choose_bucket(17, 100, 100, BUCKETS, "head", 1) == (9, 32, 32)
    # 16:9 is nearer 3:2 than 1:1
    assert choose_bucket(17, 720, 1280, BUCKETS, "head", 1) == (17, 32, 48)
    # 5:4 is nearer 3:2 than 1:1 in log-aspect (the midpoint is sqrt(1.5) = 1.22); 1.15:1 is nearer 1:1
    assert choose_bucket(9, 400, 500, BUCKETS, "head", 1) == (9, 32, 48)
    assert choose_bucket(9, 400, 460, BUCKETS, "head", 1) == (9, 32, 32)


def test_choose_bucket_only_buckets_the_clip_can_fill() -> None:
    # 10 frames cannot fill 17: the 9-frame bucket of the same aspect wins
    assert choose_bucket(10, 320, 480, BUCKETS, "head", 1) == (9, 32, 48)
    # only square 17-frame bucket fillable vs. nothing else -> nearest among what can be filled
    assert choose_bucket(17, 320, 480, [(9, 32, 48), (17, 32, 32)], "head", 2) == (9, 32, 48)
    assert choose_bucket(16, 320, 480, [(9, 32, 48), (5, 32, 32)], "head", 2) == (5, 32, 32)
    assert choose_bucket(16, 320, 480, [(9, 32, 48), (5, 32, 32)], "uniform", 2) == (9, 32, 48)


def test_choose_bucket_prefers_more_frames_then_more_pixels() -> None:
    assert choose_bucket(40, 32, 48, [(9, 32, 48), (33, 32, 48), (17, 32, 48)], "head", 1) == (33, 32, 48)
    assert choose_bucket(40, 32, 48, [(9, 32, 48), (9, 64, 96), (9, 16, 24)], "head", 1) == (9, 64, 96)


def test_choose_bucket_too_short() -> None:
    assert choose_bucket(8, 32, 48, BUCKETS, "head", 1) is None
    assert choose_bucket(16, 32, 48, [(9, 32, 48)], "head", 2) is None
    assert choose_bucket(17, 32, 48, [(9, 32, 48)], "head", 2) == (9, 32, 48)


def test_choose_bucket_images() -> None:
    with_singles = [(1, 32, 32), (1, 32, 48), (17, 32, 48)]
    assert choose_bucket(1, 320, 480, with_singles, "head", 1, image=True) == (1, 32, 48)
    assert choose_bucket(1, 300, 300, with_singles, "head", 1, image=True) == (1, 32, 32)
    # no 1-frame bucket: the nearest-aspect size, with 1 frame
    assert choose_bucket(1, 320, 480, BUCKETS, "head", 1, image=True) == (1, 32, 48)
    assert choose_bucket(1, 480, 320, BUCKETS, "head", 1, image=True) == (1, 48, 32)
    # the same image as a "video" of one frame fits no multi-frame bucket
    assert choose_bucket(1, 320, 480, BUCKETS, "head", 1) is None


def test_parse_bucket() -> None:
    assert parse_bucket("49x480x720") == (49, 480, 720)
    assert parse_bucket("1X32X48") == (1, 32, 48)


@pytest.mark.parametrize("text", ["49x480", "0x32x32", "49x0x32", "-1x32x32", "axbxc", "49x480x720x1", ""])
def test_parse_bucket_rejects(text: str) -> None:
    with pytest.raises(UserError, match="--buckets"):
        parse_bucket(text)


# ---------------------------------------------------------------------------------------------- resize / crop


def _left_red_right_blue(frames: int, height: int, width: int) -> np.ndarray:
    x = np.zeros((frames, height, width, 3), dtype=np.uint8)
    x[:, :, : width // 3] = COLORS["red"]
    x[:, :, width // 3 :] = COLORS["blue"]
    return x


def _norm(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1


def test_resize_center_crop_shape_and_range(clip_32x48: tuple[Path, np.ndarray]) -> None:
    _, src = clip_32x48
    out = resize_center_crop(src, 16, 16)
    assert out.shape == (9, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    out = resize_center_crop(src, 64, 40)
    assert out.shape == (9, 3, 64, 40)
    assert out.min() >= -1 and out.max() <= 1


def test_resize_center_crop_same_size_is_exact() -> None:
    src = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    out = resize_center_crop(src, 8, 12)
    expected = torch.from_numpy(src).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(out, expected)
    assert out.min() >= -1 and out.max() <= 1
    black_white = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    black_white[:, 2:] = 255
    out = resize_center_crop(black_white, 4, 4)
    assert out[0, :, :2].eq(-1).all() and out[0, :, 2:].eq(1).all()


def test_center_crop_keeps_the_centre() -> None:
    src = _left_red_right_blue(2, 30, 90)  # left third red, right two-thirds blue
    out = resize_center_crop(src, 32, 32)  # scaled to 32x96, the middle 32 columns kept
    assert out.shape == (2, 3, 32, 32)
    blue, red = _norm(COLORS["blue"]), _norm(COLORS["red"])
    torch.testing.assert_close(out[0, :, 16, 16], blue, atol=0.03, rtol=0)
    # the crop is entirely blue (the red third is cut away on the left)
    per_pixel_blue = (out[0] - blue[:, None, None]).abs().amax(0) < 0.05
    assert per_pixel_blue.float().mean() > 0.95
    assert not ((out[0] - red[:, None, None]).abs().amax(0) < 0.05).any()


def test_center_crop_of_a_tall_frame_keeps_the_vertical_centre() -> None:
    src = np.zeros((1, 90, 30, 3), dtype=np.uint8)
    src[:, :30] = COLORS["green"]
    src[:, 30:60] = COLORS["white"]
    src[:, 60:] = COLORS["green"]
    out = resize_center_crop(src, 20, 20)  # scale 2/3 -> 60x20, keep rows 20..39 (original 30..59: white)
    assert out.shape == (1, 3, 20, 20)
    torch.testing.assert_close(out[0, :, 10, 10], _norm(COLORS["white"]), atol=0.03, rtol=0)
    assert out[0, :, 2:18].sub(_norm(COLORS["white"])[:, None, None]).abs().max() < 0.05


def test_resize_upscales_to_cover() -> None:
    src = _left_red_right_blue(1, 10, 30)
    out = resize_center_crop(src, 40, 40)  # scale 4 -> 40x120, middle 40 columns
    assert out.shape == (1, 3, 40, 40)
    torch.testing.assert_close(out[0, :, 20, 20], _norm(COLORS["blue"]), atol=0.03, rtol=0)


def test_downscale_of_a_flat_colour_stays_flat() -> None:
    src = np.empty((1, 64, 64, 3), dtype=np.uint8)
    src[...] = COLORS["yellow"]
    out = resize_center_crop(src, 16, 16)
    torch.testing.assert_close(out[0], _norm(COLORS["yellow"])[:, None, None].expand(3, 16, 16), atol=1e-4, rtol=0)


def test_log_aspect_is_what_choose_bucket_compares() -> None:
    # a 2:1 clip sits exactly between 1:1 and 4:1 in log-aspect; ties go to more frames
    assert math.isclose(abs(math.log(2 / 1) - math.log(1)), abs(math.log(4 / 1) - math.log(2)))
    assert choose_bucket(20, 100, 200, [(9, 32, 32), (17, 32, 128)], "head", 1) == (17, 32, 128)
    assert choose_bucket(20, 100, 200, [(17, 32, 32), (9, 32, 128)], "head", 1) == (17, 32, 32)


def test_reproducible_writes_give_the_same_bytes_after_decoding(tmp_path):
    """Sample keys hash the media bytes: the generated datasets must not depend on what the process did before
    (x264's SIMD paths wrote other bytes once a video had been decoded)."""
    from ft.cli.synthetic import shape_clip

    clips = [shape_clip(shape, "red", "left to right", 17, 32, 64) for shape in ("circle", "square")]
    before = [write_video(tmp_path / f"a{i}.mp4", c, reproducible=True).read_bytes() for i, c in enumerate(clips)]
    for i in range(2):
        open_media(tmp_path / f"a{i}.mp4").read(list(range(9)))
    after = [write_video(tmp_path / f"b{i}.mp4", c, reproducible=True).read_bytes() for i, c in enumerate(clips)]
    assert before == after

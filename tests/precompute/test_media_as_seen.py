"""Media decoded as people see them: rotation metadata applied by every decoder, EXIF orientation, 16-bit and
greyscale images scaled, transparency composited on white (noted), variable frame rates measured from timestamps
(noted), and captions the tokenizer turns mostly into <unk> noted with the count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ft.cli.synthetic import shape_clip
from ft.precompute.display_matrix import boxes, quarter_turns
from ft.precompute.media import MediaError, open_media
from ft.train.video_writer import write_video

DECODERS = ("decord", "pyav")


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


@pytest.fixture(scope="module")
def upright(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 9-frame clip 32 high x 64 wide, written without rotation: the picture as it should be seen."""
    frames = shape_clip("square", "red", "left to right", 9, 64, 32)  # portrait: 64 high, 32 wide
    return write_video(tmp_path_factory.mktemp("rot") / "upright.mp4", frames), frames


@pytest.mark.parametrize("rotation", [90, 180, 270])
@pytest.mark.parametrize("decoder", DECODERS)
def test_rotated_clip_decodes_upright_with_every_decoder(tmp_path: Path, rotation: int, decoder: str) -> None:
    # a phone stores a portrait clip as landscape pixels plus a display rotation; the viewer turns it back
    seen = shape_clip("square", "red", "left to right", 9, 64, 32)  # what the viewer shows: 64 high, 32 wide
    stored = np.stack([np.rot90(f, -rotation // 90) for f in seen])  # the pixels the camera wrote
    path = write_video(tmp_path / f"rot{rotation}.mp4", stored, rotation=rotation)
    media = open_media(path, decoder)
    assert (media.height, media.width) == seen.shape[1:3]
    frames = media.read([0, 4, 8])
    assert frames.shape == (3, *seen.shape[1:])
    assert _diff(frames, seen[[0, 4, 8]]) < 8  # lossy H.264, but the picture the viewer sees


@pytest.mark.parametrize("rotation", [90, 270])
def test_decord_and_pyav_give_the_same_frames_of_a_rotated_clip(tmp_path: Path, rotation: int) -> None:
    stored = shape_clip("circle", "blue", "top to bottom", 9, 32, 64)
    path = write_video(tmp_path / "rotated.mp4", stored, rotation=rotation)
    decoded = {d: open_media(path, d).read(list(range(9))) for d in DECODERS}
    assert decoded["decord"].shape == decoded["pyav"].shape == (9, 64, 32, 3)
    assert int(np.abs(decoded["decord"].astype(int) - decoded["pyav"]).max()) <= 3



@pytest.mark.parametrize("faststart", [False, True])
@pytest.mark.parametrize("rotation", [0, 90, 180, 270, 45])
def test_header_rotation_is_the_decoded_frames_rotation(tmp_path: Path, rotation: int, faststart: bool) -> None:
    # the probe reads the display matrix from the mp4 header; PyAV reports it only on decoded frames
    import av

    path = write_video(tmp_path / "r.mp4", shape_clip("square", "red", "left to right", 3, 32, 64),
                       rotation=rotation, faststart=faststart)
    with av.open(str(path)) as container:
        frame_turns = round(next(container.decode(video=0)).rotation / 90) % 4
        assert quarter_turns(path, container.format.name) == frame_turns
    assert quarter_turns(path, "matroska,webm") is None  # another container: the caller decodes a frame


@pytest.mark.parametrize("decoder", DECODERS)
def test_probe_decodes_no_frame_of_an_mp4(tmp_path: Path, decoder: str) -> None:
    # every byte of the frame data zeroed: a probe that decoded a frame would fail or see no rotation
    path = write_video(tmp_path / "rot.mp4", shape_clip("square", "red", "left to right", 9, 32, 64), rotation=90)
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:
        mdat = [(body, end) for kind, body, end in boxes(f, 0, len(data)) if kind == b"mdat"]
    assert len(mdat) == 1
    data[mdat[0][0] : mdat[0][1]] = bytes(mdat[0][1] - mdat[0][0])
    blank = tmp_path / "blank.mp4"
    blank.write_bytes(bytes(data))
    intact, probed = open_media(path, decoder), open_media(blank, decoder)
    assert (probed.num_frames, probed.fps, probed.height, probed.width) == (9, 8.0, 64, 32)
    assert (probed.num_frames, probed.fps, probed.height, probed.width, probed.timestamps) == (
        intact.num_frames, intact.fps, intact.height, intact.width, intact.timestamps)
    with pytest.raises(MediaError, match="mid-file"):  # the frames themselves are gone: reading says so
        probed.read([0])

def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    seen = shape_clip("triangle", "green", "left to right", 3, 48, 32)[1]  # 48 high, 32 wide, as displayed
    stored = np.rot90(seen, 1)  # 32 high, 48 wide on disk; EXIF 6 says: turn 90 degrees clockwise to show
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif, quality=95)
    media = open_media(path)
    assert (media.height, media.width) == (48, 32)
    assert _diff(media.read([0])[0], seen) < 10


def test_16_bit_greyscale_png_is_scaled_not_white(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 64).reshape(32, 64).astype(np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    frame = open_media(path).read([0])[0]
    assert frame.shape == (32, 64, 3)
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert int(np.abs(frame[..., 0].astype(int) - expected).max()) <= 1
    assert (frame[..., 0] == frame[..., 2]).all() and frame.min() == 0 and frame.max() == 255
    assert (frame == 255).mean() < 0.01  # the bug was a pure white frame


def test_8_bit_greyscale_and_palette_images_become_rgb(tmp_path: Path) -> None:
    grey = (np.arange(32 * 32) % 256).reshape(32, 32).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    frame = open_media(tmp_path / "grey.png").read([0])[0]
    assert frame.shape == (32, 32, 3) and (frame[..., 1] == grey).all()
    colour = shape_clip("circle", "red", "left to right", 3, 32, 32)[1]
    Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    assert _diff(open_media(tmp_path / "palette.png").read([0])[0], colour) < 12


def test_rgba_png_is_composited_on_white_and_noted(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:, :16, 3] = 255  # left half opaque, right half fully transparent
    rgba[:, 16:24, 3] = 128  # a half-transparent band inside the right half
    rgba[:, 24:, 3] = 0
    path = tmp_path / "logo.png"
    Image.fromarray(rgba).save(path)
    media = open_media(path)
    frame = media.read([0])[0]
    assert (frame[:, :16] == [200, 0, 0]).all()
    assert (frame[:, 24:] == 255).all()  # transparent: the white background, not black
    assert np.abs(frame[:, 16:24].astype(int) - [228, 127, 127]).max() <= 1  # 50% red over white
    assert [kind for kind, _ in media.notes] == ["alpha-composited"]
    assert "white" in media.notes[0][1]
    opaque = rgba.copy()
    opaque[..., 3] = 255
    Image.fromarray(opaque).save(tmp_path / "opaque.png")
    assert open_media(tmp_path / "opaque.png").notes == []  # an alpha channel with nothing transparent: no note


@pytest.mark.parametrize("decoder", DECODERS)
def test_variable_frame_rate_is_measured_from_timestamps(tmp_path: Path, decoder: str) -> None:
    frames = shape_clip("square", "red", "left to right", 12, 32, 32)
    times = [0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # 25 fps, then 10 fps
    path = write_video(tmp_path / "vfr.mp4", frames, frame_times=times)
    media = open_media(path, decoder)
    lo, hi = media.variable_rate
    assert lo == pytest.approx(0.04, abs=2e-3) and hi == pytest.approx(0.1, abs=2e-3)
    assert media.span_fps([0, 1, 2, 3]) == pytest.approx(25, rel=0.02)
    assert media.span_fps([6, 8, 10]) == pytest.approx(10, rel=0.02)
    steady = open_media(write_video(tmp_path / "cfr.mp4", frames, fps=8.0), decoder)
    assert steady.variable_rate is None and steady.span_fps([0, 5]) == pytest.approx(8.0)


def test_check_data_notes_alpha_vfr_and_unknown_token_captions(tmp_path: Path, tiny_cog: Path) -> None:
    from helpers import run_cli

    data = tmp_path / "data"
    data.mkdir()
    clip = shape_clip("square", "red", "left to right", 12, 32, 32)
    write_video(data / "vfr.mp4", clip, frame_times=[0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                     0.8])
    (data / "vfr.txt").write_text("a red square moving left to right")
    rgba = np.full((32, 32, 4), 255, np.uint8)
    rgba[:8, :, 3] = 0
    Image.fromarray(rgba).save(data / "logo.png")
    (data / "logo.txt").write_text("a white square")
    write_video(data / "cjk.mp4", clip, fps=8.0)
    (data / "cjk.txt").write_text("一只红色的正方形从左向右移动 🐶🐱")
    write_video(data / "mixed.mp4", clip[::-1], fps=8.0)
    (data / "mixed.txt").write_text("a red square 狗")  # one unknown character of 12: no note
    report = tmp_path / "report.json"
    run_cli(["check-data", "--model", "cogvideox", "--pretrained", tiny_cog, "--dataset", data, "--buckets",
             "9x32x32", "1x32x32", "--report", report])
    warnings = {Path(w["path"]).name: w for w in json.loads(report.read_text())["warnings"]}
    assert warnings["vfr.mp4"]["kind"] == "variable-frame-rate"
    assert "measured from their timestamps" in warnings["vfr.mp4"]["reason"]
    assert warnings["logo.png"]["kind"] == "alpha-composited"
    assert "mixed.mp4" not in warnings
    assert warnings["cjk.mp4"]["kind"] == "caption-unknown-tokens"
    assert warnings["cjk.mp4"]["reason"].startswith("16 of the caption's 16 characters are unknown")
    assert "<unk> tokens" in warnings["cjk.mp4"]["reason"]
    rows = {Path(r["path"]).name: r for r in json.loads(report.read_text())["rows"]}
    assert rows["vfr.mp4"]["fps"] == pytest.approx(16, rel=0.02)  # frames 0..8 span 0.5 s: measured, not 14.9

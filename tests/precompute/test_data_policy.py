"""The data policy end to end: each kind of bad input, made as its own small file, is rejected (or kept with a
note) with a reason and a kind, recorded in the manifest, summarized, and the rest is encoded; `ft check-data`
finds the same without loading a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ft.cli.synthetic import make_shapes_dataset, shape_clip
from ft.common.errors import UserError
from ft.common.shards import Manifest
from ft.train.video_writer import write_video
from helpers import BUCKETS, FP32, run_cli

LONG_CAPTION = "a red square moving left to right on a dark background " * 6  # far more than 16 tokens


def write_faststart_mp4(path: Path, frames: np.ndarray) -> Path:
    """An mp4 with its index first: cut short, it still probes (17 frames) but its frames fail mid-file."""
    return write_video(path, frames, fps=8, faststart=True)


def cut(path: Path, fraction: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory, shapes_data: Path) -> Path:
    """Three good clips, then one line per kind of bad input (videos.txt / prompts.txt).

    `shapes_data` is made first on purpose: libx264 (through PyAV) wrote different bytes for one of its clips
    after this module's decoding in the same process, which moved the golden loss curve; see the report of issue 7.
    """
    root = tmp_path_factory.mktemp("bad")
    data = make_shapes_dataset(root / "data", num_clips=3, seed=21)
    videos = data / "videos"
    clip = shape_clip("square", "red", "left to right", 17, 32, 32)
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "notmedia.mp4").write_text("this is a text file, not a video\n" * 20)
    cut(write_video(videos / "truncated.mp4", clip))
    cut(write_faststart_mp4(videos / "midfile.mp4", clip))
    write_video(videos / "short.mp4", clip[:5])
    write_video(videos / "tiny.mp4", shape_clip("circle", "blue", "top to bottom", 17, 8, 8))
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(videos / "onepixel.png")
    for name in ("cp1252.mp4", "empty_caption.mp4", "long_caption.mp4", "dup.mp4"):
        write_video(videos / name, clip)
    write_video(root / "outside.mp4", clip)
    lines = [
        (b"videos/missing.mp4", b"missing"), (b"videos/zero.mp4", b"zero bytes"),
        (b"videos/notmedia.mp4", b"not media"), (b"videos/truncated.mp4", b"truncated"),
        (b"videos/midfile.mp4", b"mid-file"), (b"videos/short.mp4", b"five frames"),
        (b"videos/tiny.mp4", b"eight pixels"), (b"videos/onepixel.png", b"one pixel"),
        (b"videos/cp1252.mp4", "caf\u00e9 cr\u00e8me".encode("cp1252")), (b"videos/empty_caption.mp4", b""),
        (b"videos/long_caption.mp4", LONG_CAPTION.encode()), (b"videos/dup.mp4", b"a duplicate row"),
        (b"videos/dup.mp4", b"a duplicate row"), (b"", b"a caption without its path"),
        (b"../outside.mp4", b"a clip outside the dataset folder"),
    ]
    with open(data / "videos.txt", "ab") as f:
        f.write(b"".join(v + b"\n" for v, _ in lines))
    with open(data / "prompts.txt", "ab") as f:
        f.write(b"".join(c + b"\n" for _, c in lines))
    return data


@pytest.fixture(scope="module")
def policy_run(bad_data: Path, tiny_cog: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    out = tmp_path_factory.mktemp("policy") / "shards"
    manifest = run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", bad_data,
                        "--out", out, *BUCKETS, "--decoder", "auto"])
    return manifest, out


def by_name(records: list[dict]) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in records}


@pytest.mark.parametrize(("name", "kind", "reason"), [
    ("missing.mp4", "missing", "file not found"),
    ("zero.mp4", "zero-byte", "zero-byte file"),
    ("notmedia.mp4", "not-media", "not a readable video"),
    ("truncated.mp4", "truncated", "truncated or damaged mp4/mov file"),
    ("midfile.mp4", "decode-failed", "mid-file"),
    ("short.mp4", "too-short", "too short: 5 frames, the shortest video bucket needs 9"),
    ("tiny.mp4", "too-small", "too small: 8x8 would be enlarged 4.0x"),
    ("onepixel.png", "too-small", "too small: 1x1 would be enlarged 32.0x"),
    ("cp1252.mp4", "caption-not-utf8", "prompts.txt line 12 is not UTF-8 (byte 0xe9"),
    ("empty_caption.mp4", "empty-caption", "empty caption"),
    ("videos.txt", "empty-cell", "videos.txt line 17 is blank"),
    ("outside.mp4", "outside-dataset", "outside the dataset folder"),
])
def test_each_bad_kind_is_rejected_with_its_reason(policy_run, name, kind, reason):
    manifest, _ = policy_run
    record = by_name(manifest.rejected)[name]
    assert record["kind"] == kind
    assert reason in record["reason"]


def test_the_rest_is_encoded_and_notes_are_kept(policy_run, bad_data):
    manifest, out = policy_run
    assert manifest.complete and not manifest.missing
    # 3 good clips + the long caption + one of the duplicate rows
    assert manifest.active["samples"] == 5 and len(manifest.rejected) == 12
    notes = by_name(manifest.warnings)
    assert notes["long_caption.mp4"]["kind"] == "caption-truncated"
    assert "is cut to --max-sequence-length 16" in notes["long_caption.mp4"]["reason"]
    assert notes["dup.mp4"]["kind"] == "duplicate" and "repeats" in notes["dup.mp4"]["reason"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["inputs"]["rejected"]["count"] == 12 and on_disk["inputs"]["warnings"]["count"] == 2
    assert sum(on_disk["inputs"]["rejected"]["kinds"].values()) == 12  # the records: rejected.jsonl, beside it
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 12 and "reason" not in json.dumps(on_disk)


def test_inspect_shows_the_summary_grouped_by_kind(policy_run):
    from ft.cli.inspect_shards import describe

    _, out = policy_run
    text = describe(str(out))
    assert "status         complete" in text
    assert "rejected: 12" in text and "kept with a note: 2" in text
    assert "      2  too small (would be upscaled beyond --max-upscale)" in text
    assert "      1  frames failing to decode mid-file" in text


def test_allow_flags_keep_empty_captions_and_outside_paths(policy_run, bad_data, tiny_cog):
    _, out = policy_run
    manifest = run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", bad_data,
                        "--out", out, *BUCKETS, "--allow-empty-captions", "--allow-outside-paths",
                        "--max-upscale", "4"])
    kinds = {r["kind"] for r in manifest.rejected}
    assert not kinds & {"empty-caption", "outside-dataset"}
    assert "tiny.mp4" not in by_name(manifest.rejected)  # 4x is allowed now; the 1x1 image still is not
    assert by_name(manifest.rejected)["onepixel.png"]["kind"] == "too-small"
    assert manifest.active["samples"] == 8


def test_on_error_fail_stops_before_anything_is_encoded(bad_data, tmp_path, tiny_cog):
    with pytest.raises(UserError, match=r"--on-error fail: 11 bad input\(s\)(.|\n)*zero-byte file"):
        run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", bad_data,
                 "--out", tmp_path / "out", *BUCKETS, "--on-error", "fail"])
    assert not (tmp_path / "out").exists()


def test_nothing_usable_is_an_error(tmp_path, tiny_cog):
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    (data / "videos" / "zero.mp4").write_bytes(b"")
    (data / "videos.txt").write_text("videos/zero.mp4\n")
    (data / "prompts.txt").write_text("nothing\n")
    with pytest.raises(UserError, match="no usable clips"):
        run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", data,
                 "--out", tmp_path / "out", *BUCKETS])


def test_check_data_reports_what_precompute_would(bad_data, tiny_cog, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    report = run_cli(["check-data", "--model", "cogvideox", "--pretrained", tiny_cog, "--dataset", bad_data,
                      *BUCKETS, "--report", report_path])
    assert json.loads(report_path.read_text()) == json.loads(json.dumps(report))
    assert report["usable"] == 5 and report["items"] == 18
    assert sorted(r["kind"] for r in report["rejected"]) == sorted(
        ["missing", "zero-byte", "not-media", "truncated", "decode-failed", "too-short", "too-small", "too-small",
         "caption-not-utf8", "empty-caption", "empty-cell", "outside-dataset"])
    ok = {Path(r["path"]).name: r for r in report["rows"] if r["status"] == "ok"}
    assert ok["long_caption.mp4"]["caption_tokens"] > 16 and ok["clip_000.mp4"]["bucket"] == "9x32x32"
    assert ok["clip_000.mp4"]["fps"] == 8.0 and ok["clip_000.mp4"]["frames"] == 17
    printed = capsys.readouterr().out
    assert "status" in printed and "too-small" in printed and "rejected: 12" in printed


def test_check_data_without_a_model_folder_uses_the_family_defaults(bad_data, tmp_path):
    report = run_cli(["check-data", "--model", "cogvideox", "--dataset", bad_data, *BUCKETS])
    assert report["usable"] == 5 and report["max_sequence_length"] == 226
    assert all(r.get("caption_tokens") is None for r in report["rows"])
    with pytest.raises(UserError, match="--on-error fail"):
        run_cli(["check-data", "--model", "cogvideox", "--dataset", bad_data, *BUCKETS, "--on-error", "fail"])


def test_sidecar_caption_not_utf8_is_rejected_naming_the_file(tmp_path, tiny_cog):
    data = make_shapes_dataset(tmp_path / "data", num_clips=2, layout="sidecar", seed=5)
    bad = data / "videos" / "clip_001.txt"
    bad.write_bytes("\u00e9t\u00e9".encode("latin-1"))
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
    report = run_cli(["check-data", "--model", "cogvideox", "--dataset", data, *BUCKETS])
    (rejected,) = report["rejected"]
    assert rejected["kind"] == "caption-not-utf8" and str(bad) in rejected["reason"]

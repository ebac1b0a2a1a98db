"""The conditioning images of an image-to-video precompute and check-data: an image named per sample by a table's
image column (in place of the clip's first frame), a missing one (rejected, in an I2V run only), one of another
aspect than its bucket (a warning), and a clip whose first frame is black (a warning, counted)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from ft.common.shards import iter_shard, load_manifest
from ft.pipelines.registry import save_tiny_model
from ft.train.video_writer import write_video
from helpers import FP32, run_cli

BUCKETS = ["--buckets", "9x32x32"]


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory):
    return save_tiny_model("wan:i2v", tmp_path_factory.mktemp("wan-i2v") / "model")


def clip(path, first_black=False, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(40, 255, (9, 32, 32, 3), dtype=np.uint8)
    if first_black:
        frames[0] = 0
    return write_video(path, frames, 8.0)


def table(folder, rows):
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_a_named_image_conditions_in_place_of_the_first_frame(i2v_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    clip(data / "a.mp4", seed=1)
    clip(data / "b.mp4", seed=2)
    Image.fromarray(np.full((32, 32, 3), 77, np.uint8)).save(data / "a.png")
    table(data, [{"video": "a.mp4", "caption": "a red circle", "image": "a.png"},
                 {"video": "b.mp4", "caption": "a blue square", "image": ""}])
    manifest = run_cli(["precompute", "--model", "wan", "--pretrained", i2v_model, *FP32, "--dataset", data, "--out",
                        tmp_path / "shards", *BUCKETS])
    samples = {s.meta["source"]: s for shard in manifest.shards for s in iter_shard(tmp_path / "shards" / shard.name)}
    named, first = samples[str(data / "a.mp4")], samples[str(data / "b.mp4")]
    assert named.meta["conditioning_image"] == str(data / "a.png") and "conditioning_image" not in first.meta
    # the stored condition is the named image's (encoded as precompute encodes it), not the clip's first frame's
    import torch

    from ft.common.model_args import ModelArgs
    from ft.pipelines.registry import get_spec
    from ft.precompute.media import open_media, resize_to_bucket

    spec = get_spec("wan")
    args = ModelArgs(model="wan", pretrained=str(i2v_model), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32")
    models = {"vae": spec.load_component("vae", args), "image_encoder": spec.load_component("image_encoder", args),
              "image_processor": spec.load_component("image_processor", args)}
    conditioning = spec.image_conditioning(spec.load_config("transformer", args), {})
    for source, index in ((data / "a.png", 0), (data / "a.mp4", 0)):
        pixels = resize_to_bucket(open_media(source).read([index]), 32, 32)
        with torch.no_grad():
            encoded = spec.encode_image(models, pixels.permute(1, 0, 2, 3)[None], 9, conditioning)
        same = torch.equal(encoded["condition_mean"][0], named.tensors["image"]["condition_mean"])
        assert same == (source.suffix == ".png")
    manifest2 = run_cli(["precompute", "--model", "wan", "--pretrained", i2v_model, *FP32, "--dataset", data,
                         "--out", tmp_path / "shards", *BUCKETS])
    assert manifest2.num_samples == 2  # an unchanged rerun encodes nothing
    (data / "a.png").unlink()
    with pytest.raises(Exception, match="no usable|conditioning image"):
        run_cli(["precompute", "--model", "wan", "--pretrained", i2v_model, *FP32, "--dataset", data, "--out",
                 tmp_path / "other", *BUCKETS, "--on-error", "fail"])
    # a text-to-video run does not read the image column's files
    t2v = save_tiny_model("wan", tmp_path / "t2v")
    assert run_cli(["precompute", "--model", "wan", "--pretrained", t2v, *FP32, "--dataset", data, "--out",
                    tmp_path / "t2v-shards", *BUCKETS]).num_samples == 2


def test_check_data_reports_each_samples_conditioning_and_warns_of_black_and_odd_images(i2v_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    clip(data / "fade.mp4", first_black=True, seed=3)
    clip(data / "wide.mp4", seed=4)
    clip(data / "gone.mp4", seed=5)
    Image.fromarray(np.full((32, 64, 3), 200, np.uint8)).save(data / "wide.png")
    table(data, [{"video": "fade.mp4", "caption": "a fade in", "image_path": ""},
                 {"video": "wide.mp4", "caption": "a wide still", "image_path": "wide.png"},
                 {"video": "gone.mp4", "caption": "a lost still", "image_path": "missing.png"}])
    report = run_cli(["check-data", "--model", "wan", "--pretrained", i2v_model, "--dataset", data, *BUCKETS,
                      "--report", tmp_path / "check.json"])
    assert report["mode"].startswith("image-to-video")
    rows = {r["path"]: r for r in report["rows"]}
    assert rows[str(data / "fade.mp4")]["condition"] == "frame 0"
    assert rows[str(data / "wide.mp4")]["condition"] == str(data / "wide.png")
    assert rows[str(data / "gone.mp4")]["status"] == "conditioning-image"
    kinds = {w["kind"] for w in report["warnings"]}
    assert {"black-first-frame", "conditioning-image-aspect"} <= kinds
    # precompute counts the black first frame among its warnings too
    manifest = run_cli(["precompute", "--model", "wan", "--pretrained", i2v_model, *FP32, "--dataset", data, "--out",
                        tmp_path / "shards", *BUCKETS])
    assert manifest.inputs["warnings"]["kinds"].get("black-first-frame") == 1
    assert load_manifest(tmp_path / "shards").num_samples == 2
    # for a text-to-video checkpoint the image column is not read: nothing rejected for it, no condition column
    t2v = run_cli(["check-data", "--model", "wan", "--pretrained", save_tiny_model("wan", tmp_path / "t2v"),
                   "--dataset", data, *BUCKETS])
    assert t2v["mode"] == "text-to-video" and t2v["usable"] == 3 and "condition" not in t2v["rows"][0]

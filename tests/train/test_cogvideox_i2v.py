"""CogVideoX image-to-video end to end on the tiny CogVideoX1.5-5B-I2V layout: precompute stores the image's
posterior beside the video latents, a LoRA lowers the fixed-noise loss, loads into diffusers'
CogVideoXImageToVideoPipeline and changes its output, `ft generate --image` samples, and a resumed run (with
--image-noise, whose draws are the samples' own) ends bitwise equal to a straight one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from helpers import BUCKETS, FP32, LORA_RUN, run_cli, train, train_log

PROMPT = "a red circle moving left to right on a dark background"


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory):
    from ft.pipelines.registry import save_tiny_model

    return save_tiny_model("cogvideox:i2v-1.5", tmp_path_factory.mktemp("models") / "tiny-cog-i2v-1.5")


@pytest.fixture(scope="module")
def i2v_shards(tmp_path_factory, i2v_model, shapes_data):
    out = tmp_path_factory.mktemp("shards") / "cog-i2v"
    run_cli(["precompute", "--model", "cogvideox", "--pretrained", i2v_model, *FP32, "--dataset", shapes_data,
             "--out", out, *BUCKETS, "--batch-size", "2"])
    return out


@pytest.fixture(scope="module")
def i2v_lora(tmp_path_factory, i2v_model, i2v_shards):
    out = tmp_path_factory.mktemp("lora-cog-i2v") / "out"
    return out, train("cogvideox", i2v_model, i2v_shards, out, *LORA_RUN, "--train-steps", "50", "--eval-batches",
                      "4")


def test_precompute_stores_the_images_posterior(i2v_shards):
    from ft.common.shards import Manifest

    manifest = Manifest.read(i2v_shards)
    image = manifest.encoding["image"]
    assert (image["kind"], image["frames"], image["pipeline_class"][1]) == (
        "channel-concat", ["first"], "CogVideoXImageToVideoPipeline")
    assert manifest.shapes["latent_channels"] == 4


def test_a_lora_lowers_the_fixed_noise_loss(i2v_lora):
    _, summary = i2v_lora
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def test_the_lora_loads_into_the_i2v_pipeline_and_changes_its_output(i2v_lora, i2v_model):
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    out, _ = i2v_lora
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    def render(pipe):
        return pipe(image=image, prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16).frames[0]

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(i2v_model)
    base = render(pipe)
    pipe.load_lora_weights(out)
    assert len(pipe.get_active_adapters()) == 1
    assert np.abs(render(pipe) - base).max() > 1e-3


def test_generate_starts_from_an_image(i2v_lora, i2v_model, shapes_data, tmp_path):
    out, _ = i2v_lora
    still = sorted(shapes_data.rglob("still_*.png"))[0]
    size = ["--num-frames", "9", "--height", "32", "--width", "32", "--num-inference-steps", "2"]
    video = run_cli(["generate", "--model", "cogvideox", "--pretrained", i2v_model, *FP32, "--lora", out,
                     "--prompt", PROMPT, "--image", still, *size, "--out", tmp_path / "i2v.mp4"])
    assert video.is_file() and video.stat().st_size > 0
    with pytest.raises(UserError, match="--image PATH"):
        run_cli(["generate", "--model", "cogvideox", "--pretrained", i2v_model, *FP32, "--prompt", PROMPT, *size,
                 "--out", tmp_path / "none.mp4"])


def test_a_resumed_run_with_image_noise_ends_bitwise_equal_to_a_straight_run(i2v_model, i2v_shards, tmp_path):
    base = ["--train-steps", "4", "--batch-size", "2", "--lr", "3e-3", "--rank", "4", "--lora-alpha", "8",
            "--seed", "9", "--checkpointing-steps", "2", "--report-to", "none"]
    steps = [*base, "--image-noise", "--noised-image-dropout", "0.5"]
    straight = tmp_path / "straight"
    train("cogvideox", i2v_model, i2v_shards, straight, *steps)
    log = train_log(straight)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-000002", resumed / "checkpoints" / "checkpoint-000002")
    (resumed / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:2]))
    train("cogvideox", i2v_model, i2v_shards, resumed, *steps, "--resume-from-checkpoint", "latest")
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_log(resumed)] == [r["loss"] for r in log]
    # the noise and the dropout coin are draws of their own: the same run without them trains on other conditioning
    plain = tmp_path / "plain"
    train("cogvideox", i2v_model, i2v_shards, plain, *base)
    assert [r["loss"] for r in train_log(plain)] != [r["loss"] for r in log]


def test_image_noise_is_refused_where_there_is_no_image(tiny_cog, cog_shards, tmp_path):
    with pytest.raises(UserError, match="--image-noise"):
        train("cogvideox", tiny_cog, cog_shards, tmp_path / "out", "--train-steps", "1", "--image-noise")
    with pytest.raises(UserError, match="--image-noise"):
        train("wan", tiny_cog, cog_shards, tmp_path / "wan", "--train-steps", "1", "--image-noise")
    with pytest.raises(UserError, match="--noised-image-dropout drops the conditioning image .* text-to-video"):
        train("cogvideox", tiny_cog, cog_shards, tmp_path / "out", "--train-steps", "1", "--noised-image-dropout",
              "0.1")
    with pytest.raises(UserError, match="--noised-image-dropout: ft's Wan"):
        train("wan", tiny_cog, cog_shards, tmp_path / "wan", "--train-steps", "1", "--noised-image-dropout", "0.1")
    with pytest.raises(UserError, match="between 0 and 1"):
        train("cogvideox", tiny_cog, cog_shards, tmp_path / "out", "--train-steps", "1", "--noised-image-dropout",
              "1.5")


def test_held_out_i2v_shards_give_an_eval_loss_with_their_images(i2v_model, i2v_shards, tmp_path):
    """--eval-shards of an image-to-video set: the fixed-noise eval feeds the transformer its images too (a call
    without them would not fit its input channels)."""
    from ft.cli.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "clips", num_clips=3, frames=9, sizes=((32, 32), (32, 64)), seed=11)
    held_out = tmp_path / "held-out"
    run_cli(["precompute", "--model", "cogvideox", "--pretrained", i2v_model, *FP32, "--dataset", data, "--out",
             held_out, *BUCKETS])
    flags = ["--train-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--rank", "4", "--eval-shards", held_out,
             "--eval-steps", "1", "--report-to", "none"]
    train("cogvideox", i2v_model, i2v_shards, tmp_path / "out", *flags)
    losses = [r["eval_loss"] for r in train_log(tmp_path / "out") if "eval_loss" in r]
    assert len(losses) == 2 and np.isfinite(losses).all()

"""The "first-frame" image-to-video of checkpoints that serve both modes (Wan 2.2 TI2V-5B's layout, LTX-Video) end to
end through the CLI: `ft precompute --mode i2v` stores the image group, a LoRA run on it lowers the fixed-noise loss,
the LoRA loads into the family's image-to-video pipeline and changes its output, `ft generate --image` runs that
pipeline, and a resumed run ends bitwise equal to a straight one. The transformer call itself is checked against
the pipelines in tests/pipelines/test_first_frame_i2v.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.shards import iter_shard, load_manifest
from helpers import BUCKETS, FP32, run_cli, train, train_log

PROMPT = "a red circle moving left to right on a dark background"
RUN = ["--rank", "8", "--lora-alpha", "16", "--batch-size", "2", "--lr", "3e-3", "--lr-warmup-steps", "0",
       "--report-to", "none"]
# family -> (its tiny model's fixture, the pipeline class, steps of the LoRA run, generation size flags)
FAMILIES = {"wan": ("tiny_wan_ti2v", "WanImageToVideoPipeline", 40, ["--num-frames", "5", "--height", "32",
                                                                       "--width", "32"]),
            "ltx_video": ("tiny_ltx", "LTXImageToVideoPipeline", 20, ["--num-frames", "9", "--height", "32",
                                                                        "--width", "32"])}


@pytest.fixture(scope="module")
def i2v_shards(request, tmp_path_factory, shapes_data):
    """`i2v_shards(family)`: (the tiny model, `shapes_data` precomputed with --mode i2v), made once a module."""
    made: dict[str, tuple] = {}

    def get(family: str) -> tuple:
        if family not in made:
            model = request.getfixturevalue(FAMILIES[family][0])
            out = tmp_path_factory.mktemp("i2v-shards") / family
            run_cli(["precompute", "--model", family, "--pretrained", model, *FP32, "--dataset", shapes_data,
                     "--out", out, *BUCKETS, "--batch-size", "2", "--mode", "i2v"])
            made[family] = model, out
        return made[family]

    return get


def test_precompute_i2v_stores_the_image_alone_beside_the_video(i2v_shards):
    for family in FAMILIES:
        _, shards = i2v_shards(family)
        manifest = load_manifest(shards)
        entry = manifest.encoding["image"]
        assert (entry["kind"], entry["frames"], entry["text_to_video"]) == ("first-frame", ["first"], True)
        assert entry["pipeline_class"][1] == FAMILIES[family][1]
        sample = next(iter_shard(shards / manifest.shards[0].name))
        image = sample.tensors["image"]
        assert image["condition_mean"].shape[1] == 1  # one latent frame: the first frame encoded alone
        assert image["condition_mean"].shape[2:] == sample.tensors["latents"]["mean"].shape[2:]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_i2v_lora_lowers_the_loss_changes_the_i2v_pipeline_and_generates(family, i2v_shards, tmp_path):
    from PIL import Image

    from ft.pipelines.loading import import_class
    from ft.pipelines.registry import get_spec

    model, shards = i2v_shards(family)
    _, pipeline_class, steps, size = FAMILIES[family]
    out = tmp_path / "out"
    summary = train(family, model, shards, out, *RUN, "--train-steps", steps, "--eval-batches", "4", "--seed", "0")
    assert summary["steps"] == steps
    assert summary["eval_loss_after"] < 0.95 * summary["eval_loss_before"], summary  # as test_lora_families.py
    # the LoRA in the family's image-to-video pipeline: loaded (diffusers' layout), it changes the output
    pipe = import_class("diffusers", pipeline_class).from_pretrained(model)
    spec = get_spec(family)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        text = spec.encode_prompts({"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}, [PROMPT],
                                   spec.default_text_tokens)

    def sample():
        with torch.no_grad():
            return pipe(image=image, **text, num_frames=9, height=32, width=32, num_inference_steps=2,
                        guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames

    before = sample()
    pipe.load_lora_weights(out)
    assert not torch.allclose(before, sample())
    image_file = tmp_path / "first.png"
    image.save(image_file)
    video = run_cli(["generate", "--model", family, "--pretrained", model, *FP32, "--lora", out, "--prompt", PROMPT,
                     *size, "--num-inference-steps", "2", "--image", image_file, "--out", tmp_path / "i2v.mp4"])
    assert video.is_file() and video.stat().st_size > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_resumed_i2v_run_ends_bitwise_equal_to_a_straight_run(family, i2v_shards, tmp_path):
    """LTX-Video conditions half its samples (--first-frame-conditioning-p 0.5: the coin is in the resumed draws)."""
    model, shards = i2v_shards(family)
    flags = [*RUN, "--train-steps", "4", "--checkpointing-steps", "2", "--seed", "9",
             *(["--first-frame-conditioning-p", "0.5"] if family == "ltx_video" else [])]
    straight = tmp_path / "straight"
    train(family, model, shards, straight, *flags)
    log = train_log(straight)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-000002", resumed / "checkpoints" / "checkpoint-000002")
    (resumed / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:2]))
    train(family, model, shards, resumed, *flags, "--resume-from-checkpoint", "latest")
    a, b = (load_file(run / "pytorch_lora_weights.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_log(resumed)] == [r["loss"] for r in log]


def test_the_held_out_loss_of_an_i2v_run_conditions_on_the_image(i2v_shards, tmp_path):
    """--eval-shards of an image-to-video run is scored as it trains: every sample conditioned on its image (the
    same set scored by a text-to-video run of the same weights, --mode t2v, gives another loss)."""
    model, shards = i2v_shards("ltx_video")
    held_out = tmp_path / "held-out"
    shutil.copytree(shards, held_out)
    losses = {}
    for mode in ("i2v", "t2v"):
        out = tmp_path / mode
        train("ltx_video", model, shards, out, *RUN, "--train-steps", "1", "--lr", "1e-12", "--seed", "0",
              "--eval-shards", held_out, "--eval-steps", "1", "--mode", mode)
        losses[mode] = [r["eval_loss"] for r in train_log(out) if "eval_loss" in r]
    assert len(losses["i2v"]) == 1 and np.isfinite(losses["i2v"][0])
    assert losses["i2v"] != losses["t2v"]

"""Wan 2.1 image-to-video through the command line on a tiny I2V checkpoint: a text-to-video set then an image-to-video
set of the same clips encode no video latent and no caption twice; training holds only the transformer; a LoRA run
lowers the fixed-noise loss, loads into WanImageToVideoPipeline and changes its output; `ft generate --image` is the
pipeline's own video; a resumed run is bitwise equal to a straight one; 2 processes follow 1; and each mismatch
between a checkpoint and a shard set, or a bad image, is one message."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from ft.common.shards import iter_shard, load_manifest
from ft.pipelines.registry import save_tiny_model
from ft.pipelines.wan import WanSpec
from helpers import BUCKETS, FP32, run_cli, torchrun, train, train_args, train_log

PROMPT = "a red circle moving left to right on a dark background"
RUN = ["--rank", "8", "--lora-alpha", "16", "--batch-size", "2", "--lr", "3e-3", "--lr-warmup-steps", "0",
       "--report-to", "none", "--seed", "0"]
FP32_I2V = [*FP32, "--image-encoder-dtype", "fp32"]


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory):
    return save_tiny_model("wan:i2v", tmp_path_factory.mktemp("wan-i2v") / "model")


@pytest.fixture(scope="module")
def counted(tmp_path_factory, tiny_wan, i2v_model, shapes_data):
    """A text-to-video precompute of the shapes clips, then an image-to-video one into the same --out, each one's
    stage-1 calls counted (clips through the VAE, captions through the text encoder, conditionings encoded, models
    loaded)."""
    out = tmp_path_factory.mktemp("wan-i2v-shards") / "shards"
    counts: list[Counter] = []
    originals = {name: getattr(WanSpec, name) for name in ("encode_video", "encode_prompts", "encode_image",
                                                            "load_component")}

    def counting(name, unit):
        def wrapped(self, *args, **kwargs):
            if unit is not None:
                counts[-1][name] += unit(*args)
            elif not args[0].startswith("tokenizer"):
                counts[-1]["load " + args[0]] += 1
            return originals[name](self, *args, **kwargs)
        return wrapped

    mp = pytest.MonkeyPatch()
    mp.setattr(WanSpec, "encode_video", counting("encode_video", lambda vae, frames: frames.shape[0]))
    mp.setattr(WanSpec, "encode_prompts", counting("encode_prompts", lambda encoders, prompts, n: len(prompts)))
    mp.setattr(WanSpec, "encode_image", counting("encode_image", lambda models, frames, *a: frames.shape[0]))
    mp.setattr(WanSpec, "load_component", counting("load_component", None))
    try:
        manifests = []
        for model in (tiny_wan, i2v_model):
            counts.append(Counter())
            manifests.append(run_cli(["precompute", "--model", "wan", "--pretrained", model, *FP32_I2V, "--dataset",
                                      shapes_data, "--out", out, *BUCKETS, "--batch-size", "2"]))
    finally:
        mp.undo()
    return out, manifests, counts


def test_an_i2v_set_after_a_t2v_set_encodes_only_the_image_conditioning(counted):
    out, (t2v, i2v), (first, second) = counted
    assert first["encode_video"] == 10 and first["encode_prompts"] >= 10 and first["encode_image"] == 0
    assert second["encode_video"] == 0 and second["encode_prompts"] == 0 and second["encode_image"] == 10
    assert second["load text_encoder"] == 0 and second["load image_encoder"] == 1
    assert t2v.encoding.get("image") is None and i2v.encoding["image"]["kind"] == "channel-concat"
    assert i2v.encoder_fingerprint == t2v.encoder_fingerprint  # the video and text halves are the same encoders'
    samples = [s for shard in load_manifest(out).shards for s in iter_shard(out / shard.name)]
    with_image = [s for s in samples if "image" in s.tensors]
    assert len(with_image) == 10 and len(samples) == 20
    sample = next(s for s in with_image if s.meta["bucket"] == [9, 32, 32])
    assert sample.meta["image_frames"] == sample.meta["frame_indices"][:1]
    assert sample.tensors["image"]["condition_mean"].shape == sample.tensors["latents"]["mean"].shape
    assert sample.tensors["image"]["image_embeds"].shape == (1, 17, 16)  # one image, CLIP's 16 patches + class
    twin = next(s for s in samples if "image" not in s.tensors and s.meta["video_key"] == sample.meta["video_key"])
    assert torch.equal(twin.tensors["latents"]["mean"], sample.tensors["latents"]["mean"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, i2v_model, counted):
    out = tmp_path_factory.mktemp("wan-i2v-lora") / "out"
    summary = train("wan", i2v_model, counted[0], out, *RUN, *FP32_I2V[6:], "--train-steps", "30",
                    "--eval-batches", "4")
    return out, summary


def test_a_lora_run_lowers_the_fixed_noise_loss_and_loads_into_the_i2v_pipeline(lora_run, i2v_model):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    out, summary = lora_run
    # the same eval batches, the same noise and timesteps, before and after training
    assert summary["eval_loss_after"] < 0.9 * summary["eval_loss_before"], summary
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    def sample(pipe):
        return pipe(image=image, prompt=None, prompt_embeds=torch.zeros(1, 512, 32), negative_prompt_embeds=torch.zeros(
            1, 512, 32), num_frames=5, height=32, width=32, num_inference_steps=2, output_type="np",
            generator=torch.Generator().manual_seed(0)).frames[0]

    pipe = WanImageToVideoPipeline.from_pretrained(i2v_model)
    before = sample(pipe)
    pipe.load_lora_weights(out)
    after = sample(pipe)
    assert np.abs(after - before).max() > 1e-3


def test_generate_with_an_image_is_the_pipelines_video(lora_run, i2v_model, tmp_path):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from ft.pipelines.registry import spec_for
    from ft.train.generate import (
        GenerateConfig,
        generate_frames,
        generation_conditioning,
        load_pipeline_with_lora,
        resolve_size,
    )

    out, _ = lora_run
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    size = ["--num-frames", "5", "--height", "32", "--width", "32", "--num-inference-steps", "2"]
    video = run_cli(["generate", "--model", "wan", "--pretrained", i2v_model, *FP32_I2V, "--lora", out, "--prompt",
                     PROMPT, "--image", tmp_path / "a.png", *size, "--out", tmp_path / "i2v.mp4"])
    assert video.is_file()
    cfg = GenerateConfig(model="wan", pretrained=str(i2v_model), transformer_dtype="fp32", vae_dtype="fp32",
                         text_encoder_dtype="fp32", image_encoder_dtype="fp32", lora=str(out), prompt=PROMPT,
                         image=str(tmp_path / "a.png"), num_frames=5, height=32, width=32, num_inference_steps=2)
    spec = spec_for(cfg)
    conditioning = generation_conditioning(spec, cfg)
    ours = generate_frames(spec, cfg, load_pipeline_with_lora(spec, cfg, "cpu", conditioning), resolve_size(spec, cfg),
                           conditioning).astype(np.float32) / 255
    pipe = WanImageToVideoPipeline.from_pretrained(i2v_model)
    pipe.load_lora_weights(out)
    encoders = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}
    embeds = {k: spec.encode_prompts(encoders, [p], 512)["prompt_embeds"] for k, p in (("prompt_embeds", PROMPT),
                                                                                       ("negative_prompt_embeds", ""))}
    theirs = pipe(image=Image.open(tmp_path / "a.png").convert("RGB"), **embeds, num_frames=5, height=32, width=32,
                  num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def test_a_resumed_i2v_run_is_bitwise_the_straight_run(i2v_model, counted, tmp_path):
    steps = [*RUN, *FP32_I2V[6:], "--train-steps", "4", "--checkpointing-steps", "2"]
    train("wan", i2v_model, counted[0], tmp_path / "straight", *steps)
    train("wan", i2v_model, counted[0], tmp_path / "resumed", *steps[:-4], "--train-steps", "2",
          "--checkpointing-steps", "2")
    train("wan", i2v_model, counted[0], tmp_path / "resumed", *steps, "--resume-from-checkpoint", "latest")
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_i2v_curve(i2v_model, counted, tmp_path):
    steps = [*RUN, *FP32_I2V[6:], "--train-steps", "3"]
    train("wan", i2v_model, counted[0], tmp_path / "one", *steps, "--batch-size", "2")
    proc = torchrun(2, train_args("wan", i2v_model, counted[0], tmp_path / "two", *steps, "--batch-size", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r["loss"] for r in train_log(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in train_log(tmp_path / "two") if "loss" in r]
    np.testing.assert_allclose(two, one, rtol=1e-5)


def test_a_checkpoint_and_shards_that_do_not_fit_are_one_message(i2v_model, tiny_wan, counted, shapes_data, tmp_path):
    t2v_only = tmp_path / "t2v"
    run_cli(["precompute", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--dataset", shapes_data, "--out",
             t2v_only, *BUCKETS, "--batch-size", "2"])
    with pytest.raises(UserError, match="holds text-to-video samples .* image-to-video .* same --out"):
        train("wan", i2v_model, t2v_only, tmp_path / "a", *RUN, "--train-steps", "1")
    with pytest.raises(UserError, match="holds image-to-video samples .* text-to-video checkpoint.*--mode t2v"):
        train("wan", tiny_wan, counted[0], tmp_path / "b", *RUN, "--train-steps", "1")
    # the T2V checkpoint on the I2V set's latents and captions, when asked
    assert train("wan", tiny_wan, counted[0], tmp_path / "c", *RUN, "--train-steps", "1", "--mode", "t2v")["steps"] == 1
    with pytest.raises(UserError, match="--mode t2v: .* image-to-video checkpoint"):
        train("wan", i2v_model, counted[0], tmp_path / "d", *RUN, "--train-steps", "1", "--mode", "t2v")


def test_generate_refuses_a_missing_or_bad_image(i2v_model, tiny_wan, tmp_path):
    base = ["generate", "--model", "wan", "--pretrained", i2v_model, "--prompt", PROMPT, "--out", tmp_path / "v.mp4"]
    with pytest.raises(UserError, match="pass --image PATH"):
        run_cli(base)
    with pytest.raises(UserError, match="--image .*missing.png: no such file"):
        run_cli([*base, "--image", tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="--image .*bad.png: not a readable image"):
        run_cli([*base, "--image", tmp_path / "bad.png"])
    with pytest.raises(UserError, match="--last-image: .* first frame only"):
        run_cli([*base, "--image", tmp_path / "bad.png", "--last-image", tmp_path / "bad.png"])
    with pytest.raises(UserError, match="--image: .* text-to-video checkpoint"):
        run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan, "--prompt", PROMPT, "--image",
                 tmp_path / "bad.png", "--out", tmp_path / "v.mp4"])
    with pytest.raises(UserError, match="^--last-image: .* text-to-video checkpoint.*drop --last-image"):
        run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan, "--prompt", PROMPT, "--last-image",
                 tmp_path / "bad.png", "--out", tmp_path / "v.mp4"])


def test_validation_of_an_i2v_run_samples_each_rows_image_with_no_image_encoder(i2v_model, counted, shapes_data,
                                                                                tmp_path):
    """finetrainers' validation columns: image_path (beside the file) and video_path (its first frame); stage 1 stores
    each row's frames and CLIP embeddings, so training loads no image encoder and writes the videos."""
    import json

    from PIL import Image

    from helpers import BuiltClasses

    Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(tmp_path / "still.png")
    clip = sorted(shapes_data.glob("**/*.mp4"))[0]
    rows = [{"caption": PROMPT, "image_path": "still.png", "num_frames": 5, "height": 32, "width": 32,
             "num_inference_steps": 2},
            {"caption": "a blue square", "video_path": str(clip), "num_frames": 5, "height": 32, "width": 32,
             "num_inference_steps": 2}]
    (tmp_path / "validation.json").write_text(json.dumps(rows))
    shards = counted[0]
    run_cli(["precompute", "--model", "wan", "--pretrained", i2v_model, *FP32_I2V, "--dataset", shapes_data, "--out",
             shards, *BUCKETS, "--batch-size", "2", "--validation-dataset-file", tmp_path / "validation.json"])
    with BuiltClasses() as built:
        train("wan", i2v_model, shards, tmp_path / "out", *RUN, "--train-steps", "2", "--validation-steps", "2",
              "--validation-dataset-file", tmp_path / "validation.json")
    assert not {"CLIPVisionModel", "UMT5EncoderModel"} & set(built)
    videos = sorted((tmp_path / "out" / "validation" / "step-000002").glob("*.mp4"))
    assert len(videos) == 2
    (tmp_path / "other.png").write_bytes((tmp_path / "still.png").read_bytes()[:-1] + b"x")
    rows[0]["image_path"] = "other.png"  # another image: not stored yet
    (tmp_path / "validation.json").write_text(json.dumps(rows))
    with pytest.raises(UserError, match="holds no conditioning for the image.* row 1.*ft precompute"):
        train("wan", i2v_model, shards, tmp_path / "out2", *RUN, "--train-steps", "1", "--validation-dataset-file",
              tmp_path / "validation.json")
    rows[0].pop("image_path")
    (tmp_path / "validation.json").write_text(json.dumps(rows))
    with pytest.raises(UserError, match="row 1: an image-to-video run samples from an image"):
        train("wan", i2v_model, shards, tmp_path / "out3", *RUN, "--train-steps", "1", "--validation-dataset-file",
              tmp_path / "validation.json")


def test_wan_2_2_i2v_a14b_trains_each_expert_on_one_image_shard_set(shapes_data, tmp_path):
    """Wan 2.2 I2V-A14B: one precompute (the first frame's VAE encoding, no image encoder) serves both experts; each
    `--expert` run trains its transformer on the image conditioning, and `ft generate --image --lora --lora-2`
    samples with both LoRAs."""
    model = save_tiny_model("wan:a14b-i2v", tmp_path / "model")
    manifest = run_cli(["precompute", "--model", "wan", "--pretrained", model, *FP32, "--dataset", shapes_data,
                        "--out", tmp_path / "shards", *BUCKETS, "--batch-size", "2"])
    image = manifest.encoding["image"]
    assert (image["kind"], image["image_encoder"], image["pipeline_class"][1]) == ("channel-concat", False,
                                                                                   "WanImageToVideoPipeline")
    for expert in ("high", "low"):
        summary = train("wan", model, tmp_path / "shards", tmp_path / expert, *RUN, "--train-steps", "2",
                        "--expert", expert)
        assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "first.png")
    video = run_cli(["generate", "--model", "wan", "--pretrained", model, *FP32, "--lora", tmp_path / "high",
                     "--lora-2", tmp_path / "low", "--image", tmp_path / "first.png", "--prompt", PROMPT,
                     "--num-frames", "5", "--height", "32", "--width", "32", "--num-inference-steps", "2", "--out",
                     tmp_path / "v.mp4"])
    assert video.is_file()


def test_generate_says_when_the_image_is_stretched_to_another_aspect(lora_run, i2v_model, tmp_path, caplog):
    from PIL import Image

    Image.fromarray(np.full((32, 64, 3), 128, np.uint8)).save(tmp_path / "wide.png")
    with caplog.at_level("WARNING", logger="ft"):
        run_cli(["generate", "--model", "wan", "--pretrained", i2v_model, *FP32_I2V, "--prompt", PROMPT, "--image",
                 tmp_path / "wide.png", "--num-frames", "5", "--height", "32", "--width", "32",
                 "--num-inference-steps", "1", "--out", tmp_path / "v.mp4"])
    assert "wide.png is 64x32: the pipeline stretches it to 32x32" in caplog.text

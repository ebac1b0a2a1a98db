"""HunyuanVideo-I2V (token_replace) and -33ch (latent_concat) through the command line on tiny checkpoints: precompute
stores the Llava's image+caption embeddings and the image latents in the image half (CLIP's pooled embeddings in
the text half), a LoRA run lowers the fixed-noise loss, loads into HunyuanVideoImageToVideoPipeline and changes its
output, `ft generate --image` is the pipeline's own video (the pipeline encoding the prompt with the image itself),
and a resumed run is bitwise equal to a straight one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.shards import iter_shard, load_manifest
from ft.pipelines.registry import save_tiny_model
from helpers import HUNYUAN_FP32, HUNYUAN_TEXT, run_cli, train

PROMPT = "a red circle moving left to right on a dark background"
RUN = ["--rank", "8", "--lora-alpha", "16", "--batch-size", "2", "--lr", "3e-3", "--lr-warmup-steps", "0",
       "--report-to", "none", "--seed", "0"]
BUCKETS = ["--buckets", "9x32x32", "9x32x64"]  # token_replace takes no 1-frame sample (its one frame is the image)
VARIANTS = {"i2v": "first-frame", "i2v-33ch": "channel-concat"}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory, variant):
    return save_tiny_model(f"hunyuan_video:{variant}", tmp_path_factory.mktemp(f"hunyuan-{variant}") / "model")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, i2v_model, variant, shapes_data):
    out = tmp_path_factory.mktemp(f"hunyuan-{variant}-shards") / "shards"
    run_cli(["precompute", "--model", "hunyuan_video", "--pretrained", i2v_model, *HUNYUAN_FP32, *HUNYUAN_TEXT,
             "--dataset", shapes_data, "--out", out, *BUCKETS, "--batch-size", "2"])
    return out


def test_precompute_stores_the_llava_embeddings_with_the_image(shards, variant):
    manifest = load_manifest(shards)
    image = manifest.encoding["image"]
    assert (image["kind"], image["caption"], image["pipeline_class"][1]) == (VARIANTS[variant], True,
                                                                              "HunyuanVideoImageToVideoPipeline")
    samples = [s for shard in manifest.shards for s in iter_shard(shards / shard.name)]
    # the two stills are 1-frame samples, which token_replace refuses (their one frame is the image) and -33ch takes
    assert len(samples) == (8 if variant == "i2v" else 10) and all("image" in s.tensors for s in samples)
    if variant == "i2v":
        assert sum("no frame to learn" in r.get("reason", "") for r in manifest.rejected) == 2, manifest.rejected
    sample = next(s for s in samples if s.meta["bucket"] == [9, 32, 32])
    assert set(sample.tensors["cond"]) == {"pooled_prompt_embeds"}
    group = sample.tensors["image"]
    image_tokens = 576 // (4 if variant == "i2v" else 2)
    assert group["prompt_embeds"].shape == (image_tokens + 32 - 4, 16)
    assert group["image_latents"].shape == (4, 1, 4, 4)
    # samples with other captions, the same image-token count: the caption's tokens differ
    other = next(s for s in samples if s.meta["caption"] != sample.meta["caption"])
    assert not torch.equal(other.tensors["image"]["prompt_embeds"], group["prompt_embeds"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, i2v_model, shards, variant):
    out = tmp_path_factory.mktemp(f"hunyuan-{variant}-lora") / "out"
    summary = train("hunyuan_video", i2v_model, shards, out, *RUN, "--train-steps", "40", "--eval-batches", "4")
    return out, summary


def pipeline_video(model, lora, image, guidance):
    from diffusers import HunyuanVideoImageToVideoPipeline

    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(model)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe(image=image, prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2,
                max_sequence_length=32, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
                output_type="np").frames[0]


def test_a_lora_run_lowers_the_fixed_noise_loss_and_loads_into_the_i2v_pipeline(lora_run, i2v_model):
    from PIL import Image

    out, summary = lora_run
    # 40 steps: -33ch's curve is the slower (0.90 of the start here, i2v's 0.83)
    assert summary["eval_loss_after"] < 0.93 * summary["eval_loss_before"], summary
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    before, after = pipeline_video(i2v_model, None, image, 1.0), pipeline_video(i2v_model, out, image, 1.0)
    assert np.abs(after - before).max() > 1e-3


def test_generate_with_an_image_is_the_pipelines_video(lora_run, i2v_model, tmp_path):
    from PIL import Image

    out, _ = lora_run
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    video = run_cli(["generate", "--model", "hunyuan_video", "--pretrained", i2v_model, *HUNYUAN_FP32,
                     *HUNYUAN_TEXT, "--lora", out, "--prompt", PROMPT, "--image", tmp_path / "a.png",
                     "--num-frames", "9", "--height", "32", "--width", "32", "--num-inference-steps", "2",
                     "--out", tmp_path / "i2v.mp4"])
    assert video.is_file()

    from ft.pipelines.registry import spec_for
    from ft.train.generate import (
        GenerateConfig,
        generate_frames,
        generation_conditioning,
        load_pipeline_with_lora,
        resolve_size,
    )

    cfg = GenerateConfig(model="hunyuan_video", pretrained=str(i2v_model), transformer_dtype="fp32",
                         vae_dtype="fp32", text_encoder_dtype="fp32", text_encoder_2_dtype="fp32", lora=str(out),
                         prompt=PROMPT, image=str(tmp_path / "a.png"), num_frames=9, height=32, width=32,
                         num_inference_steps=2, max_sequence_length=32)
    spec = spec_for(cfg)
    conditioning = generation_conditioning(spec, cfg)
    ours = generate_frames(spec, cfg, load_pipeline_with_lora(spec, cfg, "cpu", conditioning), resolve_size(spec, cfg),
                           conditioning).astype(np.float32) / 255
    theirs = pipeline_video(i2v_model, out, Image.open(tmp_path / "a.png").convert("RGB"), 1.0)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def test_a_resumed_i2v_run_is_bitwise_the_straight_run(i2v_model, shards, tmp_path):
    steps = [*RUN, "--train-steps", "4", "--checkpointing-steps", "2"]
    train("hunyuan_video", i2v_model, shards, tmp_path / "straight", *steps)
    train("hunyuan_video", i2v_model, shards, tmp_path / "resumed", *steps[:-4], "--train-steps", "2",
          "--checkpointing-steps", "2")
    train("hunyuan_video", i2v_model, shards, tmp_path / "resumed", *steps, "--resume-from-checkpoint", "latest")
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_reads_the_rows_image_and_prompt_embeddings_from_stage_one(i2v_model, shards, shapes_data,
                                                                               tmp_path):
    """The Llava reads each validation row's image with its prompt (and a black image with the negative prompt, for
    true CFG): stage 1 stores both in the row, so training builds no Llava and still writes the videos."""
    import json

    from PIL import Image

    from helpers import BuiltClasses

    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(tmp_path / "first.png")
    rows = [{"caption": PROMPT, "image_path": "first.png", "num_frames": 9, "height": 32, "width": 32,
             "num_inference_steps": 2, "true_cfg_scale": 2.0}]
    (tmp_path / "validation.json").write_text(json.dumps(rows))
    run_cli(["precompute", "--model", "hunyuan_video", "--pretrained", i2v_model, *HUNYUAN_FP32, *HUNYUAN_TEXT,
             "--dataset", shapes_data, "--out", shards, *BUCKETS, "--batch-size", "2", "--validation-dataset-file",
             tmp_path / "validation.json"])
    with BuiltClasses() as built:
        train("hunyuan_video", i2v_model, shards, tmp_path / "out", *RUN, "--train-steps", "1",
              "--validation-dataset-file", tmp_path / "validation.json")
    assert not {"LlavaForConditionalGeneration", "CLIPTextModel", "CLIPVisionModel"} & set(built)
    assert len(list((tmp_path / "out" / "validation" / "step-000001").glob("*.mp4"))) == 1

"""Wan 2.1 image-to-video (and first-last-frame) against diffusers' own WanImageToVideoPipeline: which checkpoints
are image-conditioned, what stage 1 stores from the conditioning frames, and the transformer call stage 2 makes
from it, captured on a real pipeline run and compared bitwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.pipelines.base import StepInputs
from ft.pipelines.image import resolve_conditioning
from ft.pipelines.registry import get_spec, save_tiny_model
from helpers import Calls, assert_same_call

PROMPT = "a red circle moving left to right on a dark background"


@pytest.fixture(scope="module")
def i2v_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-i2v")
    return {variant: save_tiny_model(f"wan:{variant}", root / variant) for variant in ("i2v", "flf2v")}


def fp32_args(folder, mode="auto"):
    return ModelArgs(model="wan", pretrained=str(folder), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32", image_encoder_dtype="fp32", mode=mode)


def frame_images(seed: int, count: int):
    """`count` random 32x32 RGB frames: as uint8 images and as stage 1's pixels ([-1, 1], [1, C, N, H, W])."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]
    return [Image.fromarray(a) for a in arrays], arrays


def conditioning_of(spec, folder, mode="auto"):
    args = fp32_args(folder, mode)
    from ft.pipelines.image import read_model_index

    return resolve_conditioning(spec, mode, spec.load_config("transformer", args), read_model_index(str(folder)),
                                str(folder))


def test_which_checkpoints_are_image_conditioned(tiny_wan, i2v_models):
    spec = get_spec("wan")
    assert conditioning_of(spec, tiny_wan) is None
    i2v, flf2v = conditioning_of(spec, i2v_models["i2v"]), conditioning_of(spec, i2v_models["flf2v"])
    assert (i2v.kind, i2v.frames, i2v.image_encoder, i2v.text_to_video) == ("channel-concat", ("first",), True, False)
    assert flf2v.frames == ("first", "last") and flf2v.pipeline_class[1] == "WanImageToVideoPipeline"
    # Wan 2.2 I2V-A14B: 36 input channels and no image encoder
    assert spec.image_conditioning({"in_channels": 36, "out_channels": 16}, {}).image_encoder is False
    with pytest.raises(UserError, match="--mode i2v: .* text-to-video"):
        conditioning_of(spec, tiny_wan, "i2v")
    with pytest.raises(UserError, match="--mode t2v: .* image-to-video checkpoint"):
        conditioning_of(spec, i2v_models["i2v"], "t2v")


@pytest.mark.parametrize("variant", ["i2v", "flf2v"])
def test_predict_makes_the_transformer_call_the_i2v_pipeline_makes(variant, i2v_models):
    """A real 2-step WanImageToVideoPipeline run with guidance on an image (and a last image): ft's stage 1 on the
    pipeline's own pixels (the VAE condition, CLIP's embeddings), then prepare_image and predict on each captured
    step's noisy latents and sigma: the same keyword arguments, bitwise, and the same output."""
    from diffusers import WanImageToVideoPipeline

    from ft.train.objectives import FlowMatching, SigmaSampler

    folder = i2v_models[variant]
    spec = get_spec("wan").with_pretrained(str(folder))
    conditioning = conditioning_of(spec, folder)
    pipe = spec.load_pipeline(fp32_args(folder), "cpu", conditioning)
    assert isinstance(pipe, WanImageToVideoPipeline)
    images, _ = frame_images(0, len(conditioning.frames))
    extra = {"last_image": images[1]} if variant == "flf2v" else {}
    with torch.no_grad():
        # WanPipeline's embeddings (tests/pipelines/test_wan.py: equal); this pipeline's own prompt_clean needs ftfy
        encoders = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}
        cond = spec.encode_prompts(encoders, [PROMPT], 512)["prompt_embeds"]
        uncond = spec.encode_prompts(encoders, [""], 512)["prompt_embeds"]
        with Calls(pipe.transformer) as theirs:
            pipe(image=images[0], prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=9, height=32,
                 width=32, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                 output_type="latent", **extra)
        pixels = torch.stack([pipe.video_processor.preprocess(img, height=32, width=32)[0] for img in images], 1)
        models = {"vae": pipe.vae, "image_encoder": pipe.image_encoder, "image_processor": pipe.image_processor}
        stored = spec.encode_image(models, pixels[None], 9, conditioning)
    assert stored["image_embeds"].shape[:2] == (1, len(images))
    vae_config, transformer_config = dict(pipe.vae.config), dict(pipe.transformer.config)
    image = spec.prepare_image(stored, vae_config, transformer_config, [torch.Generator()], conditioning)
    sigmas = pipe.scheduler.sigmas[:2]
    objective = FlowMatching(None, SigmaSampler())
    assert len(theirs) == 4
    for i, call in enumerate(theirs):
        noisy = call["hidden_states"][:, :4]
        sigma = sigmas[i // 2].view(1)
        _, timesteps = objective.noised(noisy, torch.zeros_like(noisy), sigma)
        step = StepInputs(noisy, torch.zeros_like(noisy), noisy, sigma, timesteps,
                          {"prompt_embeds": cond if i % 2 == 0 else uncond}, [{}], [torch.Generator()],
                          image=image, image_conditioning=conditioning)
        with torch.no_grad(), Calls(pipe.transformer) as ours:
            output, _ = spec.predict(pipe.transformer, step, torch.float32)
            expected = pipe.transformer(**call)[0]
        assert_same_call(ours[0], call)
        assert torch.equal(output, expected)


def test_stage_one_pixels_are_the_pipelines(i2v_models):
    """Precompute's frames ([-1, 1] from uint8 by resize_to_bucket) are the pixels the pipeline makes of the same
    image, so the stored condition is the pipeline's."""
    from diffusers import WanImageToVideoPipeline

    from ft.precompute.media import resize_to_bucket

    pipe = WanImageToVideoPipeline.from_pretrained(i2v_models["i2v"])
    images, arrays = frame_images(1, 1)
    ours = resize_to_bucket(np.stack(arrays), 32, 32)
    theirs = pipe.video_processor.preprocess(images[0], height=32, width=32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_an_i2v_model_refuses_what_does_not_fit(i2v_models, tiny_wan):
    spec = get_spec("wan")
    args = ModelArgs(model="wan", pretrained=str(tiny_wan), image_encoder_id=str(i2v_models["i2v"]))
    spec.check_args(args)  # Wan has an image encoder (its I2V checkpoints)
    with pytest.raises(UserError, match="--image-encoder-id: CogVideoX has no image_encoder"):
        get_spec("cogvideox").check_args(ModelArgs(model="cogvideox", pretrained=str(tiny_wan),
                                                   image_encoder_id="x"))
    with pytest.raises(UserError, match="mode"):
        ModelArgs(model="wan", pretrained=str(tiny_wan), mode="video")


def test_each_wan_2_2_i2v_a14b_experts_call_is_the_pipelines(tmp_path):
    """Wan 2.2 I2V-A14B (36 channels, no CLIP, boundary 0.9): a real 6-step WanImageToVideoPipeline run calls the
    high-noise expert and then the low-noise one; each call, redone through ft's stage 1 and predict on the expert the
    pipeline called, is the pipeline's, bitwise."""
    folder = save_tiny_model("wan:a14b-i2v", tmp_path / "model")
    spec = get_spec("wan").with_pretrained(str(folder))
    conditioning = conditioning_of(spec, folder)
    assert conditioning.kind == "channel-concat" and not conditioning.image_encoder
    pipe = spec.load_pipeline(fp32_args(folder), "cpu", conditioning)
    images, _ = frame_images(2, 1)
    with torch.no_grad():
        encoders = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}
        cond = spec.encode_prompts(encoders, [PROMPT], 512)["prompt_embeds"]
        uncond = spec.encode_prompts(encoders, [""], 512)["prompt_embeds"]
        with Calls(pipe.transformer) as high, Calls(pipe.transformer_2) as low:
            pipe(image=images[0], prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=9, height=32,
                 width=32, num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                 output_type="latent")
        pixels = pipe.video_processor.preprocess(images[0], height=32, width=32)[:, :, None]
        stored = spec.encode_image({"vae": pipe.vae}, pixels, 9, conditioning)
    assert high and low and set(stored) == {"condition_mean", "condition_logvar"}
    image = spec.prepare_image(stored, dict(pipe.vae.config), {}, [torch.Generator()], conditioning)
    for transformer, calls in ((pipe.transformer, high), (pipe.transformer_2, low)):
        for i, call in enumerate(calls):
            noisy = call["hidden_states"][:, :4]
            step = StepInputs(noisy, torch.zeros_like(noisy), noisy, call["timestep"] / 1000, call["timestep"],
                              {"prompt_embeds": cond if i % 2 == 0 else uncond}, [{}], [torch.Generator()],
                              image=image, image_conditioning=conditioning)
            with torch.no_grad(), Calls(transformer) as ours:
                output, _ = spec.predict(transformer, step, torch.float32)
                expected = transformer(**call)[0]
            assert_same_call(ours[0], call)
            assert torch.equal(output, expected)


def test_flf2v_refuses_one_frame_buckets():
    """A first-last-frame model needs two frames to condition on: a 1-frame bucket is refused when the buckets are
    checked (before, stage 1 failed inside encode_image, the VAE input padded to -1 zero frames)."""
    spec = get_spec("wan")
    i2v, flf2v = ({"in_channels": 36, "out_channels": 16, "image_dim": 1280, **extra}
                  for extra in ({}, {"pos_embed_seq_len": 514}))
    assert "first and last" in spec.check_bucket((1, 32, 32), {}, flf2v)
    assert spec.check_bucket((5, 32, 32), {}, flf2v) is None
    assert spec.check_bucket((1, 32, 32), {}, i2v) is None  # Wan 2.1 I2V samples one frame from its image

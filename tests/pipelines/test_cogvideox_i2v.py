"""CogVideoX image-to-video (CogVideoX-5b-I2V and CogVideoX1.5-5B-I2V layouts) against diffusers' own
CogVideoXImageToVideoPipeline: which checkpoints are image-conditioned, what stage 1 stores of the image, and the
transformer call stage 2 makes from it, captured on a real pipeline run and compared bitwise; --image-noise's draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ft.common.model_args import ModelArgs
from ft.pipelines.base import StepInputs, TrainOptions
from ft.pipelines.image import read_model_index, resolve_conditioning
from ft.pipelines.registry import get_spec, save_tiny_model
from helpers import Calls, assert_same_call

PROMPT = "a red circle moving left to right on a dark background"
VARIANTS = ("i2v", "i2v-1.5")


@pytest.fixture(scope="module")
def i2v_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cog-i2v")
    return {variant: save_tiny_model(f"cogvideox:{variant}", root / variant) for variant in VARIANTS}


def fp32_args(folder):
    return ModelArgs(model="cogvideox", pretrained=str(folder), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32")


def conditioning_of(spec, folder, mode="auto"):
    return resolve_conditioning(spec, mode, spec.load_config("transformer", fp32_args(folder)),
                                read_model_index(str(folder)), str(folder))


def an_image(seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_which_checkpoints_are_image_conditioned(tiny_cog, i2v_models):
    spec = get_spec("cogvideox")
    assert conditioning_of(spec, tiny_cog) is None
    for variant in VARIANTS:
        found = conditioning_of(spec, i2v_models[variant])
        assert (found.kind, found.frames, found.image_encoder, found.text_to_video) == (
            "channel-concat", ("first",), False, False)
        assert found.pipeline_class == ("diffusers", "CogVideoXImageToVideoPipeline")
    for checkpoint in spec.checkpoints:  # the published configs say what they are
        config = {"in_channels": 16, "out_channels": 16, **checkpoint.configs["transformer"]}
        assert (spec.image_conditioning(config, {}) is not None) == checkpoint.image_to_video
    assert [c.display_name for c in spec.checkpoints if c.image_to_video] == ["CogVideoX-5b-I2V",
                                                                              "CogVideoX1.5-5B-I2V"]


def test_learned_positional_embeddings_take_only_the_sample_size(i2v_models):
    """CogVideoX-5b-I2V's patch embedding refuses any other size: so does the bucket check, before any encoding."""
    spec = get_spec("cogvideox")
    args = fp32_args(i2v_models["i2v"])
    transformer, vae = spec.load_config("transformer", args), spec.load_config("vae", args)
    assert spec.check_bucket((9, 32, 32), vae, transformer) is None
    assert "takes only 32x32" in spec.check_bucket((9, 32, 64), vae, transformer)
    args_15 = fp32_args(i2v_models["i2v-1.5"])
    assert spec.check_bucket((9, 32, 64), spec.load_config("vae", args_15),
                             spec.load_config("transformer", args_15)) is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_makes_the_transformer_call_the_i2v_pipeline_makes(variant, i2v_models):
    """A real 2-step CogVideoXImageToVideoPipeline run with guidance on an image: ft's stage 1 on the pipeline's own
    pixels (the image's VAE posterior), then prepare_image with the pipeline's generator (the pipeline samples the
    posterior with it, first) and predict on each captured step's noisy latents: the same keyword arguments,
    bitwise (the padded image latents, ofs for 1.5, the rotary tables), and the same output."""
    from diffusers import CogVideoXImageToVideoPipeline

    folder = i2v_models[variant]
    spec = get_spec("cogvideox")
    conditioning = conditioning_of(spec, folder)
    pipe = spec.load_pipeline(fp32_args(folder), "cpu", conditioning)
    assert isinstance(pipe, CogVideoXImageToVideoPipeline)
    image = an_image()
    with torch.no_grad():
        encoders = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}
        cond = spec.encode_prompts(encoders, [PROMPT], 16)["prompt_embeds"]
        uncond = spec.encode_prompts(encoders, [""], 16)["prompt_embeds"]
        with Calls(pipe.transformer) as theirs:
            pipe(image=image, prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=9, height=32, width=32,
                 num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                 output_type="latent", max_sequence_length=16)
        pixels = pipe.video_processor.preprocess(image, height=32, width=32)[:, :, None]  # [1, C, 1, H, W]
        stored = spec.encode_image({"vae": pipe.vae}, pixels, 9, conditioning)
    # a posterior with real variance: the pipeline's draw is not its mean, so matching it needs its generator
    assert stored["image_mean"].shape == (1, 4, 1, 4, 4) and stored["image_logvar"].exp().mean() > 1e-3
    vae_config, transformer_config = dict(pipe.vae.config), dict(pipe.transformer.config)
    # classifier-free guidance batches the uncond and cond halves: the image twice, drawn with the same generator
    both = {k: v.repeat(2, 1, 1, 1, 1) for k, v in stored.items()}
    image_inputs = spec.prepare_image(both, vae_config, transformer_config,
                                      [torch.Generator().manual_seed(0) for _ in range(2)], conditioning)
    latent_frames = 4 if variant == "i2v-1.5" else 3  # 3 latent frames, padded to the temporal patch for 1.5
    assert len(theirs) == 2
    for call in theirs:
        assert call["hidden_states"].shape == (2, latent_frames, 8, 4, 4)
        assert ("ofs" in call and call["ofs"] is not None) == (variant == "i2v-1.5")
        noisy = call["hidden_states"][:, :, :4]
        step = StepInputs(noisy, torch.zeros_like(noisy), noisy, call["timestep"] / 1000, call["timestep"],
                          {"prompt_embeds": torch.cat([uncond, cond])}, [{}, {}], [torch.Generator()] * 2,
                          image=image_inputs, image_conditioning=conditioning)
        with torch.no_grad(), Calls(pipe.transformer) as ours:
            output, _ = spec.predict(pipe.transformer, step, torch.float32)
            expected = pipe.transformer(**call)[0]
        assert_same_call(ours[0], call)
        assert torch.equal(output, expected)


def test_image_noise_is_a_log_normal_sigma_drawn_after_the_posterior(i2v_models):
    """--image-noise: sigma = exp(N(-3, 0.5)), then sigma x N(0, 1) on the scaled image latents, both from the
    sample's generator after its posterior draw; off, prepare_image is the pipeline's draw alone."""
    spec = get_spec("cogvideox")
    args = fp32_args(i2v_models["i2v-1.5"])
    vae, transformer = spec.load_config("vae", args), spec.load_config("transformer", args)
    conditioning = spec.image_conditioning(transformer, {})
    stored = {"image_mean": torch.randn(2, 4, 1, 4, 4), "image_logvar": torch.randn(2, 4, 1, 4, 4)}

    def prepare(noise: bool):
        return spec.prepare_image(stored, vae, transformer, [torch.Generator().manual_seed(s) for s in (3, 4)],
                                  conditioning, TrainOptions(image_noise=noise))["image_latents"]

    plain, noised = prepare(False), prepare(True)
    assert torch.equal(plain, spec.prepare_image(stored, vae, transformer, [torch.Generator().manual_seed(s)
                                                                           for s in (3, 4)], conditioning)[
        "image_latents"])
    for i, seed in enumerate((3, 4)):
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn((4, 1, 4, 4), generator=g)
        draw = stored["image_mean"][i] + torch.exp(0.5 * stored["image_logvar"][i]) * eps
        # the 1.5 VAE's invert_scale_latents: divided by its scaling factor, as the pipeline does
        torch.testing.assert_close(plain[i], (1 / 0.7 * draw).permute(1, 0, 2, 3), rtol=0, atol=1e-6)
        sigma = torch.exp(torch.randn((), generator=g) * 0.5 - 3.0)
        expected = plain[i] + sigma * torch.randn((1, 4, 4, 4), generator=g)
        torch.testing.assert_close(noised[i], expected, rtol=0, atol=1e-6)
        assert 0.001 < float(sigma) < 1.0


def test_noised_image_dropout_zeroes_a_samples_image_latents_on_its_own_coin(i2v_models):
    """--noised-image-dropout p: a coin from the sample's generator, drawn after its posterior (and noise) draws,
    zeroes that sample's image latents when it falls under p; the other samples keep the pipeline's latents."""
    spec = get_spec("cogvideox")
    args = fp32_args(i2v_models["i2v-1.5"])
    vae, transformer = spec.load_config("vae", args), spec.load_config("transformer", args)
    conditioning = spec.image_conditioning(transformer, {})
    stored = {"image_mean": torch.randn(6, 4, 1, 4, 4), "image_logvar": torch.randn(6, 4, 1, 4, 4)}
    seeds = range(6)

    def prepare(p: float):
        return spec.prepare_image(stored, vae, transformer, [torch.Generator().manual_seed(s) for s in seeds],
                                  conditioning, TrainOptions(noised_image_dropout=p))["image_latents"]

    plain, dropped = prepare(0.0), prepare(0.5)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        torch.randn((4, 1, 4, 4), generator=g)  # the posterior's draw
        zeroed = float(torch.rand((), generator=g)) < 0.5
        assert torch.equal(dropped[i], torch.zeros_like(plain[i]) if zeroed else plain[i])
    assert 0 < sum(bool((dropped[i] == 0).all()) for i in range(6)) < 6  # seeds 0-5 give both outcomes
    assert torch.count_nonzero(prepare(1.0)) == 0

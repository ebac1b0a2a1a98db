"""The "first-frame" kind of image-to-video (checkpoints that serve text- and image-to-video: Wan 2.2 TI2V-5B and
LTX-Video) against diffusers' own image-to-video pipelines: which checkpoints take an image and how `--mode` picks,
and the transformer call stage 2 makes from what stage 1 stores, captured on a real pipeline run (an image, CFG)
and redone through ft's encode_image -> prepare_image -> predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.pipelines.base import StepInputs, TrainOptions
from ft.pipelines.image import read_model_index, resolve_conditioning
from ft.pipelines.registry import get_spec
from helpers import Calls, assert_same_call

PROMPT = "a red circle moving left to right on a dark background"


def fp32_args(family, folder, mode="auto"):
    return ModelArgs(model=family, pretrained=str(folder), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32", mode=mode)


def conditioning_of(spec, folder, mode="auto"):
    config = spec.load_config("transformer", fp32_args(spec.name, folder, mode))
    return resolve_conditioning(spec, mode, config, read_model_index(str(folder)), str(folder))


def an_image(seed: int, size: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_which_checkpoints_serve_both_modes(tiny_wan, tiny_wan_ti2v, tiny_ltx):
    wan, ltx = get_spec("wan"), get_spec("ltx_video")
    for spec, folder, pipeline in ((wan, tiny_wan_ti2v, "WanImageToVideoPipeline"),
                                   (ltx, tiny_ltx, "LTXImageToVideoPipeline")):
        assert conditioning_of(spec, folder) is None  # auto: text-to-video where a checkpoint serves both
        assert conditioning_of(spec, folder, "t2v") is None
        found = conditioning_of(spec, folder, "i2v")
        assert (found.kind, found.frames, found.image_encoder, found.text_to_video) == ("first-frame", ("first",),
                                                                                        False, True)
        assert found.pipeline_class == ("diffusers", pipeline)
    with pytest.raises(UserError, match=r"--mode i2v: .* text-to-video Wan checkpoint; .*I2V-14B-480P.*TI2V-5B"):
        conditioning_of(wan, tiny_wan, "i2v")  # Wan 2.1 T2V: no image conditioning
    assert [c.display_name for c in ltx.checkpoints if c.image_to_video] == ["LTX-Video 0.9"]


def run_capturing(pipe, **kwargs):
    with torch.no_grad(), Calls(pipe.transformer) as calls:
        pipe(**kwargs, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    return calls


def test_wan_ti2v_predict_makes_the_call_of_the_i2v_pipeline_with_expand_timesteps(tiny_wan_ti2v):
    """A real 2-step WanImageToVideoPipeline run (expand_timesteps, from the model's model_index.json) with CFG on
    an image: ft's stage 1 on the pipeline's own pixels, then prepare_image and predict on each captured step's
    latents, their first frame overwritten with noise as the trainer's noising leaves it: the same keyword
    arguments bitwise (the condition on the first frame, the per-token timesteps), the same output, and the first
    frame out of the loss."""
    from diffusers import WanImageToVideoPipeline

    spec = get_spec("wan").with_pretrained(str(tiny_wan_ti2v))
    conditioning = conditioning_of(spec, tiny_wan_ti2v, "i2v")
    pipe = spec.load_pipeline(fp32_args("wan", tiny_wan_ti2v), "cpu", conditioning)
    assert isinstance(pipe, WanImageToVideoPipeline) and pipe.config.expand_timesteps
    image = an_image(0, 64)
    encoders = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}
    with torch.no_grad():
        cond = spec.encode_prompts(encoders, [PROMPT], 512)["prompt_embeds"]
        uncond = spec.encode_prompts(encoders, [""], 512)["prompt_embeds"]
    theirs = run_capturing(pipe, image=image, prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=9,
                           height=64, width=64, guidance_scale=5.0)
    pixels = pipe.video_processor.preprocess(image, height=64, width=64)[:, :, None]  # [1, C, 1, H, W]
    with torch.no_grad():
        stored = spec.encode_image({"vae": pipe.vae}, pixels, 9, conditioning)
    assert stored["condition_mean"].shape == (1, 4, 1, 4, 4)  # the image alone: one latent frame
    image_inputs = spec.prepare_image(stored, dict(pipe.vae.config), dict(pipe.transformer.config),
                                      [torch.Generator()], conditioning)
    assert len(theirs) == 4
    for i, call in enumerate(theirs):
        noisy = call["hidden_states"].clone()
        noisy[:, :, :1] = torch.randn_like(noisy[:, :, :1])  # the trainer noised the first frame too
        t = pipe.scheduler.timesteps[i // 2].view(1)
        step = StepInputs(noisy, torch.zeros_like(noisy), noisy, t / 1000, t,
                          {"prompt_embeds": cond if i % 2 == 0 else uncond}, [{}], [torch.Generator()],
                          image=image_inputs, image_conditioning=conditioning)
        with torch.no_grad(), Calls(pipe.transformer) as ours:
            output, weights = spec.predict(pipe.transformer, step, torch.float32)
            expected = pipe.transformer(**call)[0]
        assert_same_call(ours[0], call)
        assert torch.equal(output, expected)
        assert weights.shape == (1, 1, 3, 4, 4) and weights[:, :, 0].sum() == 0 and bool((weights[:, :, 1:] == 1)
                                                                                         .all())
    assert bool((theirs[0]["timestep"][:, :4] == 0).all()) and bool((theirs[0]["timestep"][:, 4:] > 0).all())


def test_ltx_predict_makes_the_call_of_the_image_to_video_pipeline(tiny_ltx):
    """A real 2-step LTXImageToVideoPipeline run with CFG (one batched call per step) on an image: ft's stage 1 on
    the pipeline's pixels (the posterior, drawn in prepare_image from a generator seeded as the pipeline's, whose
    first draw is the condition's), then predict on each call's latents with the first frame overwritten: every
    keyword argument bitwise, the output bitwise. One exception, by design: ft gives rope_interpolation_scale
    per sample ([B, 1, 1, 1, 1], each sample's own frame rate) where the pipeline gives one tuple; its values are
    the pipeline's (in float32) and the output is still bitwise equal."""
    from diffusers import LTXImageToVideoPipeline

    from ft.pipelines.ltx_video import pack_latents, unpack_latents

    spec = get_spec("ltx_video")
    conditioning = conditioning_of(spec, tiny_ltx, "i2v")
    pipe = spec.load_pipeline(fp32_args("ltx_video", tiny_ltx), "cpu", conditioning)
    assert isinstance(pipe, LTXImageToVideoPipeline)
    image = an_image(1, 32)
    encoders = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}
    with torch.no_grad():
        cond = spec.encode_prompts(encoders, [PROMPT], 128)
        uncond = spec.encode_prompts(encoders, [""], 128)
    theirs = run_capturing(pipe, image=image, prompt_embeds=cond["prompt_embeds"],
                           prompt_attention_mask=cond["prompt_attention_mask"],
                           negative_prompt_embeds=uncond["prompt_embeds"],
                           negative_prompt_attention_mask=uncond["prompt_attention_mask"], num_frames=9, height=32,
                           width=32, guidance_scale=3.0)
    pixels = pipe.video_processor.preprocess(image, height=32, width=32)[:, :, None]
    with torch.no_grad():
        stored = spec.encode_image({"vae": pipe.vae}, pixels, 9, conditioning)
    assert stored["condition_mean"].shape == (1, 8, 1, 8, 8) and stored["condition_logvar"].shape == (1, 1, 1, 8, 8)
    # the CFG batch is [uncond, cond]: both rows the one image, drawn by generators seeded as the pipeline's
    batch = {k: v.repeat(2, 1, 1, 1, 1) for k, v in stored.items()}
    image_inputs = spec.prepare_image(batch, dict(pipe.vae.config) | vae_statistics(pipe.vae), {},
                                      [torch.Generator().manual_seed(0) for _ in range(2)], conditioning)
    text = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    meta = {"fps": 25.0, "bucket": [9, 32, 32], "latent_shape": [8, 3, 8, 8]}
    assert len(theirs) == 2
    for call in theirs:
        noisy = unpack_latents(call["hidden_states"], 3, 8, 8, 1, 1).clone()
        noisy[:, :, :1] = torch.randn_like(noisy[:, :, :1])
        t = call["timestep"].max().expand(2)
        step = StepInputs(noisy, torch.zeros_like(noisy), noisy, t / 1000, t, text, [meta, meta],
                          [torch.Generator(), torch.Generator()], image=image_inputs, image_conditioning=conditioning)
        with torch.no_grad(), Calls(pipe.transformer) as ours:
            output, weights = spec.predict(pipe.transformer, step, torch.float32)
            expected = pipe.transformer(**call)[0]
        rope, their_rope = ours[0].pop("rope_interpolation_scale"), call["rope_interpolation_scale"]
        assert rope[0].shape == (2, 1, 1, 1, 1) and bool((rope[0] == torch.tensor(their_rope[0])).all())
        assert tuple(rope[1:]) == tuple(their_rope[1:])
        assert_same_call(ours[0], {k: v for k, v in call.items() if k != "rope_interpolation_scale"})
        assert torch.equal(pack_latents(output, 1, 1), expected)
        assert weights[:, :, 0].sum() == 0 and bool((weights[:, :, 1:] == 1).all())


def vae_statistics(vae):
    return {"latents_mean": vae.latents_mean.tolist(), "latents_std": vae.latents_std.tolist()}


def ltx_step(spec, tiny_ltx, p):
    """A batch of two LTX samples in i2v mode with --first-frame-conditioning-p `p`."""
    from diffusers import AutoencoderKLLTXVideo

    conditioning = conditioning_of(spec, tiny_ltx, "i2v")
    vae = AutoencoderKLLTXVideo.from_pretrained(tiny_ltx, subfolder="vae")
    stored = {"condition_mean": torch.randn(2, 8, 1, 8, 8), "condition_logvar": torch.full((2, 1, 1, 8, 8), -3.0)}
    image = spec.prepare_image(stored, vae_statistics(vae), {}, [torch.Generator().manual_seed(i) for i in (3, 4)],
                               conditioning)
    latents = torch.randn(2, 8, 3, 8, 8)
    meta = {"fps": 25.0, "bucket": [9, 32, 32], "latent_shape": [8, 3, 8, 8]}
    return StepInputs(latents, latents, latents, torch.full((2,), 0.5), torch.full((2,), 500.0),
                      {"prompt_embeds": torch.randn(2, 16, 32), "prompt_attention_mask": torch.ones(2, 16).bool()},
                      [meta, meta], [torch.Generator(), torch.Generator()], TrainOptions(first_frame_conditioning_p=p),
                      image, conditioning)


def test_ltx_first_frame_conditioning_p_is_the_image_conditioning_probability_in_i2v_mode(tiny_ltx):
    """In i2v mode --first-frame-conditioning-p is the chance a sample is conditioned on its image (default 1): a
    sample whose coin falls above it trains as text-to-video (the plain timestep, its first frame a target)."""
    from diffusers import LTXVideoTransformer3DModel

    spec = get_spec("ltx_video")
    transformer = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx, subfolder="transformer")
    for p, expected in ((None, [True, True]), (1.0, [True, True]), (0.0, [False, False])):
        step = ltx_step(spec, tiny_ltx, p)
        with torch.no_grad():
            _, weights = spec.predict(transformer, step, torch.float32)
        conditioned = [False, False] if weights is None else [bool(w[:, 0].sum() == 0) for w in weights]
        assert conditioned == expected, p
    step = ltx_step(spec, tiny_ltx, None)
    coins = step.image["coin"].tolist()
    step = ltx_step(spec, tiny_ltx, (coins[0] + coins[1]) / 2)  # between the coins: one sample conditioned
    with torch.no_grad():
        _, weights = spec.predict(transformer, step, torch.float32)
    assert [bool(w[:, 0].sum() == 0) for w in weights] == [c < (coins[0] + coins[1]) / 2 for c in coins]

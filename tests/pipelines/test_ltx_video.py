"""LTXVideoSpec against diffusers' own LTXPipeline: what precompute stores and what the trainer feeds the
transformer must be what the pipeline makes and feeds."""

from __future__ import annotations

import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.common.shards import iter_shard, load_manifest
from ft.pipelines.base import StepInputs, TrainOptions
from ft.pipelines.registry import get_spec

PROMPTS = ["a red circle moving left to right on a dark background", "a blue square"]


@pytest.fixture(scope="module")
def spec():
    return get_spec("ltx_video")


@pytest.fixture(scope="module")
def pipe(spec, tiny_ltx):
    args = ModelArgs(model="ltx_video", pretrained=str(tiny_ltx), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32")
    return spec.load_pipeline(args, "cpu")


def meta(fps, bucket=(9, 32, 32), latent_shape=(8, 3, 8, 8)):
    return {"fps": fps, "bucket": list(bucket), "latent_shape": list(latent_shape)}


def step_inputs(latents, sigmas, cond, fps, conditioning_p=0.0, seed=0):
    noise = torch.randn_like(latents)
    s = sigmas.view(-1, 1, 1, 1, 1)
    return StepInputs(latents, noise, (1 - s) * latents + s * noise, sigmas, sigmas * 1000, cond,
                      [meta(f) for f in fps], [torch.Generator().manual_seed(seed + i) for i in range(len(fps))],
                      TrainOptions(first_frame_conditioning_p=conditioning_p))


def test_registry_names_and_aliases(spec):
    assert {get_spec(n).name for n in ("ltx_video", "ltx-video", "LTX", "LTX_Video")} == {"ltx_video"}
    with pytest.raises(UserError, match="ltx_video"):
        get_spec("ltxv")


def test_prompt_encoding_matches_the_pipeline(spec, pipe):
    ours = spec.encode_prompts({"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}, PROMPTS, 128)
    embeds, mask = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=128, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    assert ours["prompt_attention_mask"].dtype == torch.bool and torch.equal(ours["prompt_attention_mask"], mask)
    assert 0 < int(mask[1].sum()) < int(mask[0].sum()) < 128  # the mask is what tells captions apart in length


def test_shards_hold_the_posterior_the_prompt_and_the_frame_rate(spec, pipe, ltx_shards):
    from ft.precompute.media import open_media, resize_center_crop

    manifest = load_manifest(ltx_shards)
    assert manifest.model_family == "ltx_video"
    assert manifest.shapes == {"latent_channels": 8, "prompt_embeds": [128, 32], "prompt_attention_mask": [128]}
    assert manifest.encoding["max_sequence_length"] == 128
    assert manifest.encoding["family_choices"] == spec.encoding_choices({})
    from ft.cli.inspect_shards import describe

    assert "latent_normalisation: stage 2" in describe(str(ltx_shards))  # `ft inspect` shows the family's choices
    vae_config = manifest.encoders["vae"]["config"]
    assert torch.equal(torch.tensor(vae_config["latents_mean"]), pipe.vae.latents_mean)
    assert torch.equal(torch.tensor(vae_config["latents_std"]), pipe.vae.latents_std)
    samples = [s for shard in manifest.shards for s in iter_shard(ltx_shards / shard.name)]
    assert {s.meta["fps"] for s in samples} == {8.0, None}  # 8 fps clips at stride 1; stills have none
    video = next(s for s in samples if s.meta["bucket"] == [9, 32, 64])
    frames = open_media(video.meta["source"]).read(video.meta["frame_indices"])
    x = resize_center_crop(frames, 32, 64).permute(1, 0, 2, 3)[None]
    with torch.no_grad():
        posterior = pipe.vae.encode(x).latent_dist
        embeds, mask = pipe._get_t5_prompt_embeds([video.meta["caption"]], max_sequence_length=128, device="cpu",
                                                  dtype=torch.float32)
    stored = video.tensors["latents"]
    assert stored["logvar"].shape == (1, 3, 8, 16)  # one channel: the VAE repeats it over all 8
    assert torch.equal(posterior.logvar, posterior.logvar[:, :1].expand_as(posterior.logvar))
    torch.testing.assert_close(stored["mean"], posterior.mean[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stored["logvar"], posterior.logvar[0, :1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(video.tensors["cond"]["prompt_embeds"], embeds[0])
    assert torch.equal(video.tensors["cond"]["prompt_attention_mask"], mask[0])


def test_latents_are_normalised_as_the_pipeline_denormalises_them(spec, pipe, ltx_shards):
    vae_config = load_manifest(ltx_shards).encoders["vae"]["config"]
    mean = torch.randn(2, 8, 3, 4, 4)
    stored = {"mean": mean, "logvar": torch.full((2, 1, 3, 4, 4), -60.0)}  # no variance: the draw is the mean
    latents = spec.prepare_latents(stored, vae_config, {}, [torch.Generator().manual_seed(i) for i in range(2)])
    vae = pipe.vae
    torch.testing.assert_close(latents, pipe._normalize_latents(mean, vae.latents_mean, vae.latents_std,
                                                                vae.config.scaling_factor))
    torch.testing.assert_close(pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std,
                                                         vae.config.scaling_factor), mean, atol=1e-5, rtol=1e-5)
    # with variance, each sample's draw is its own generator's, whatever shares the batch
    stored["logvar"] = torch.zeros(2, 1, 3, 4, 4)
    a = spec.prepare_latents(stored, vae_config, {}, [torch.Generator().manual_seed(i) for i in range(2)])
    b = spec.prepare_latents({k: v[1:] for k, v in stored.items()}, vae_config, {}, [torch.Generator().manual_seed(1)])
    assert torch.equal(a[1:], b) and not torch.allclose(a, latents)


@pytest.mark.parametrize("p,p_t", [(1, 1), (2, 1), (2, 2)])
def test_packing_matches_the_pipeline(p, p_t):
    from diffusers import LTXPipeline

    from ft.pipelines.ltx_video import pack_latents, unpack_latents

    x = torch.randn(2, 8, 4, 8, 12)
    tokens = pack_latents(x, p, p_t)
    assert torch.equal(tokens, LTXPipeline._pack_latents(x, p, p_t))
    # diffusers' _unpack_latents takes the patch grid (the pipeline passes latent sizes: LTX has 1x1x1 patches)
    theirs = LTXPipeline._unpack_latents(tokens, 4 // p_t, 8 // p, 12 // p, p, p_t)
    assert torch.equal(unpack_latents(tokens, 4, 8, 12, p, p_t), theirs)
    assert torch.equal(theirs, x)


def pipeline_call(pipe, noisy, step, frame_rate):
    """The transformer call of LTXPipeline.__call__'s denoising loop, for these latents and frame rate."""
    _, _, frames, height, width = noisy.shape
    p, p_t = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
    rope = (pipe.vae_temporal_compression_ratio / frame_rate, pipe.vae_spatial_compression_ratio,
            pipe.vae_spatial_compression_ratio)
    output = pipe.transformer(hidden_states=pipe._pack_latents(noisy, p, p_t),
                              encoder_hidden_states=step.cond["prompt_embeds"], timestep=step.timesteps,
                              encoder_attention_mask=step.cond["prompt_attention_mask"], num_frames=frames,
                              height=height, width=width, rope_interpolation_scale=rope, return_dict=False)[0]
    return pipe._unpack_latents(output, frames, height, width, p, p_t)


@pytest.fixture(scope="module")
def cond(pipe):
    embeds, mask = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=16, device="cpu", dtype=torch.float32)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def test_predict_feeds_the_transformer_as_the_pipeline_does(spec, pipe, cond):
    step = step_inputs(torch.randn(2, 8, 3, 8, 8), torch.tensor([0.1, 0.9]), cond, [25.0, 25.0])
    with torch.no_grad():
        output, weights = spec.predict(pipe.transformer, step, torch.float32)
        expected = pipeline_call(pipe, step.noisy, step, 25)
    assert weights is None
    torch.testing.assert_close(output, expected)


def test_each_sample_keeps_its_own_frame_rate(spec, pipe, cond):
    step = step_inputs(torch.randn(2, 8, 3, 8, 8), torch.tensor([0.5, 0.5]), cond, [24.0, 12.0])
    with torch.no_grad():
        output, _ = spec.predict(pipe.transformer, step, torch.float32)
        for i, fps in enumerate((24.0, 12.0)):
            one = StepInputs(step.latents[i:i + 1], step.noise[i:i + 1], step.noisy[i:i + 1], step.sigmas[i:i + 1],
                             step.timesteps[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()}, step.meta[i:i + 1],
                             step.generators[i:i + 1])
            torch.testing.assert_close(output[i:i + 1], pipeline_call(pipe, one.noisy, one, fps))
        other = pipeline_call(pipe, step.noisy, step, 24.0)
    assert not torch.allclose(output[1], other[1])  # the frame rate reaches the rotary embeddings


def test_first_frame_conditioning_renoises_and_masks_the_first_frame(spec, pipe, cond):
    sigmas = torch.tensor([0.9, 0.1])
    step = step_inputs(torch.randn(2, 8, 3, 8, 8), sigmas, cond, [25.0, 25.0],
                       conditioning_p=1.0, seed=3)
    noisy, mask = spec.condition_first_frame(step)
    draws = torch.stack([torch.rand(2, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)])
    sigma_ff = torch.minimum(draws[:, 1] * sigmas, torch.tensor(0.25))
    assert bool((sigma_ff <= 0.25).all() and (sigma_ff <= sigmas).all())
    s = sigma_ff.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy[:, :, 0], (1 - s) * step.latents[:, :, 0] + s * step.noise[:, :, 0])
    assert torch.equal(noisy[:, :, 1:], step.noisy[:, :, 1:])
    assert mask.shape == (2, 1, 3, 8, 8)
    assert bool((mask[:, :, 0] == 1).all()) and mask[:, :, 1:].sum() == 0
    # the transformer sees the re-noised first frame and per-token timesteps (the same draws: fresh generators)
    step.generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    with torch.no_grad():
        output, weights = spec.predict(pipe.transformer, step, torch.float32)
    assert torch.equal(weights, 1 - mask)
    step.options = TrainOptions()  # p = 0: nothing changes
    assert spec.condition_first_frame(step) == (step.noisy, None)
    # a still's only latent frame is the whole sample: it is never conditioned away (its loss would be 0)
    still = step_inputs(torch.randn(2, 8, 1, 8, 8), sigmas, cond, [25.0, 25.0],
                        conditioning_p=1.0, seed=3)
    assert spec.condition_first_frame(still) == (still.noisy, None)


def transformer_calls(transformer):
    """A hook that records every call's keyword arguments (remove it with .remove())."""
    calls = []
    handle = transformer.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(dict(kwargs)),
                                                   with_kwargs=True)
    return calls, handle


def test_conditioned_tokens_get_the_image_to_video_pipelines_timesteps(spec, pipe, cond):
    """LTXImageToVideoPipeline feeds per-token timesteps t * (1 - conditioning_mask): 0 on the first frame's
    tokens. The trainer's conditioned sample, at the pipeline's first timestep, is fed exactly those."""
    from diffusers import LTXImageToVideoPipeline
    from PIL import Image

    i2v = LTXImageToVideoPipeline(**pipe.components)
    calls, handle = transformer_calls(pipe.transformer)
    try:
        with torch.no_grad():
            i2v(image=Image.new("RGB", (32, 32), (200, 40, 40)), prompt_embeds=cond["prompt_embeds"][:1],
                prompt_attention_mask=cond["prompt_attention_mask"][:1], num_frames=9, height=32, width=32,
                num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(0))
            theirs = calls[0]["timestep"]
            t = theirs.max().reshape(1)
            step = step_inputs(torch.randn(1, 8, 3, 8, 8), t / 1000, {k: v[:1] for k, v in cond.items()}, [25.0],
                               conditioning_p=1.0)
            step.timesteps = t
            calls.clear()
            _, weights = spec.predict(pipe.transformer, step, torch.float32)
    finally:
        handle.remove()
    ours = calls[0]["timestep"]
    assert theirs.shape == ours.shape == (1, 3 * 8 * 8)
    assert torch.equal(ours, theirs)
    assert bool((ours[:, :64] == 0).all() and (ours[:, 64:] == t).all())
    assert weights[:, :, 0].sum() == 0


def test_the_conditioned_frame_leaves_the_loss_denominator(spec):
    """A conditioned sample's loss is the mean over its target frames, not over all frames with zeros."""
    from ft.train.objectives import FlowMatching, SigmaSampler

    objective = FlowMatching(None, SigmaSampler())
    latents, noise, output = torch.randn(3, 2, 1, 3, 4, 4).unbind(0)
    sigmas = torch.tensor([0.5, 0.5])
    weights = torch.ones(2, 1, 3, 1, 1)
    weights[0, :, 0] = 0  # sample 0 conditioned on its first frame
    losses = objective.sample_losses(output, latents, noise, None, sigmas, sigmas * 1000, weights)
    error = (output - (noise - latents)) ** 2
    torch.testing.assert_close(losses, torch.stack([error[0, :, 1:].mean(), error[1].mean()]))
def test_first_frame_conditioning_is_refused_for_a_family_without_it():
    from ft.pipelines.registry import spec_for
    from ft.train.config import TrainConfig

    cfg = TrainConfig(model="cogvideox", pretrained="x", shards=["s"], output_dir="o", first_frame_conditioning_p=0.1)
    with pytest.raises(UserError, match="--first-frame-conditioning-p"):
        spec_for(cfg)
    with pytest.raises(UserError, match="between 0 and 1"):
        TrainConfig(model="ltx_video", pretrained="x", shards=["s"], output_dir="o", first_frame_conditioning_p=2)


@pytest.mark.parametrize("bucket,ok", [((49, 512, 768), True), ((1, 512, 704), True), ((161, 512, 704), True),
                                       ((48, 512, 768), False), ((49, 500, 768), False), ((45, 512, 768), False)])
def test_bucket_rules_of_the_real_vae(spec, bucket, ok):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLLTXVideo

    from ft.pipelines.ltx_video import compression_ratios

    with init_empty_weights():
        vae = AutoencoderKLLTXVideo()  # diffusers' defaults are LTX-Video's VAE
    config = dict(vae.config)
    assert compression_ratios(config) == (vae.temporal_compression_ratio, vae.spatial_compression_ratio) == (8, 32)
    assert (spec.check_bucket(bucket, config, {"patch_size": 1, "patch_size_t": 1}) is None) == ok


def test_generation_uses_the_pipelines_defaults_and_frame_rate(spec, pipe):
    import inspect

    from diffusers import CogVideoXPipeline, LTXPipeline

    from ft.train.generate import GenerateConfig, sampling_settings

    size = {"num_frames": 9, "height": 32, "width": 32}
    cfg = GenerateConfig(model="ltx_video", pretrained="x", prompt="p")
    call = inspect.signature(LTXPipeline.__call__).parameters
    assert sampling_settings(spec, cfg, size).resolved(spec, pipe) == {
        "num_inference_steps": 50, "guidance_scale": call["guidance_scale"].default,
        "frame_rate": call["frame_rate"].default, "fps": call["frame_rate"].default}
    assert (call["guidance_scale"].default, call["frame_rate"].default) == (3, 25)
    cfg = GenerateConfig(model="ltx_video", pretrained="x", prompt="p", fps=12, guidance_scale=0.0)
    assert sampling_settings(spec, cfg, size).resolved(spec, pipe) == {
        "num_inference_steps": 50, "guidance_scale": 0.0, "frame_rate": 12, "fps": 12}
    cog = get_spec("cogvideox")
    cog_pipe = CogVideoXPipeline.__new__(CogVideoXPipeline)  # only its __call__'s signature is read
    cog_cfg = GenerateConfig(model="cogvideox", pretrained="x", prompt="p")
    assert sampling_settings(cog, cog_cfg, size).resolved(cog, cog_pipe) == {
        "num_inference_steps": 50, "guidance_scale": 6, "fps": 8.0}


def test_effective_frame_rate_of_the_sampled_frames():
    from ft.precompute.media import effective_fps

    assert effective_fps(30.0, list(range(9))) == 30.0
    assert effective_fps(30.0, list(range(0, 17, 2))) == 15.0
    assert effective_fps(24.0, [0, 12, 24]) == 2.0  # uniform sampling over a long clip
    assert effective_fps(24.0, [0]) is None and effective_fps(0.0, [0, 1]) is None


def test_ft_models_lists_every_family_with_its_aliases():
    from typer.testing import CliRunner

    from ft.cli.main import app
    from ft.pipelines.registry import ALIASES, SPECS

    out = CliRunner().invoke(app, ["models"]).output
    lines = [line for line in out.splitlines() if not line.startswith(" ")]  # indented: a family's checkpoints
    assert [line.split()[0] for line in lines] == sorted(SPECS)
    assert "Wan2.1-I2V-14B-480P (image-to-video)" in out and "ft demo --model wan:VARIANT" in out
    for alias, name in ALIASES.items():
        assert alias in next(line for line in lines if line.startswith(name))

"""HunyuanVideo15Spec against diffusers' own HunyuanVideo15Pipeline: what stage 1 stores is what the pipeline's
encode_prompt computes (Qwen2.5-VL with its chat template and crop, byT5 on the quoted text), and every transformer
call of a real pipeline run is redone bitwise through ft's predict (the zero condition channels, the zero image
tokens, the timestep in the transformer's dtype, both prompts under the guider's classifier-free guidance)."""

from __future__ import annotations

import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.common.shards import Manifest
from ft.pipelines.base import StepInputs
from ft.pipelines.registry import get_spec
from helpers import Calls, assert_same_call

PROMPTS = ["a red circle moving left to right on a dark background", 'a sign that says "OPEN" on a street']


@pytest.fixture(scope="module")
def spec():
    return get_spec("hunyuan_video_1_5")


@pytest.fixture(scope="module")
def args(tiny_hv15):
    return ModelArgs(model="hunyuan_video_1_5", pretrained=str(tiny_hv15), transformer_dtype="fp32",
                     vae_dtype="fp32", text_encoder_dtype="fp32", text_encoder_2_dtype="fp32")


@pytest.fixture(scope="module")
def pipe(spec, args):
    return spec.load_pipeline(args, "cpu")


def encoders(spec, pipe):
    return {name: getattr(pipe, name) for name in spec.text_components}


def test_registry_names_and_aliases():
    for name in ("hunyuan_video_1_5", "hunyuanvideo-1.5", "hunyuan-video-1.5", "HV15", "hunyuanvideo15"):
        assert get_spec(name).name == "hunyuan_video_1_5", name


def test_the_folder_loads_as_the_pipeline_with_its_guider(pipe):
    from diffusers import ClassifierFreeGuidance, HunyuanVideo15Pipeline

    assert type(pipe) is HunyuanVideo15Pipeline
    assert isinstance(pipe.guider, ClassifierFreeGuidance) and pipe.guider.guidance_scale == 6.0


def test_prompt_encoding_equals_the_pipelines_encode_prompt(spec, pipe):
    with torch.no_grad():  # as precompute encodes, and the pipeline's __call__
        ours = spec.encode_prompts(encoders(spec, pipe), PROMPTS, 1000)
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(PROMPTS, device="cpu", dtype=torch.float32,
                                                            batch_size=len(PROMPTS))
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["prompt_embeds_2"], embeds_2)
    assert ours["prompt_embeds_mask"].dtype == ours["prompt_embeds_mask_2"].dtype == torch.bool
    assert torch.equal(ours["prompt_embeds_mask"].float(), mask)
    assert torch.equal(ours["prompt_embeds_mask_2"].float(), mask_2)
    assert ours["prompt_embeds"].shape == (2, 1000, 16) and ours["prompt_embeds_2"].shape == (2, 256, 32)
    # the glyph encoder reads only quoted text: none in the first caption (zeros, nothing valid), "OPEN" in the second
    assert ours["prompt_embeds_mask_2"][0].sum() == 0 and not ours["prompt_embeds_2"][0].any()
    assert ours["prompt_embeds_mask_2"][1].sum() > 0


def test_the_template_settings_are_the_pipelines_and_enter_the_sample_key(spec):
    choices = spec.encoding_choices({})
    assert choices["crop_start"] == 108 and choices["num_hidden_layers_to_skip"] == 2
    assert choices["system_message"].startswith("You are a helpful assistant. Describe the video")
    assert choices["glyph_tokens"] == 256


def test_latents_are_scaled_as_the_pipeline_decodes_them(spec, pipe):
    mean = torch.randn(2, 4, 3, 2, 2)
    stored = {"mean": mean, "logvar": torch.full_like(mean, -60.0)}  # no variance: the draw is the mean
    latents = spec.prepare_latents(stored, dict(pipe.vae.config), dict(pipe.transformer.config),
                                   [torch.Generator().manual_seed(i) for i in range(2)])
    torch.testing.assert_close(latents, mean * pipe.vae.config.scaling_factor)
    assert spec.latent_channels(dict(pipe.transformer.config)) == pipe.vae.config.latent_channels == 4


def test_every_transformer_call_of_a_pipeline_run_is_predict_bitwise(spec, pipe):
    """HunyuanVideo15Pipeline with its guider's CFG (6.0): per step a call with the prompt and one with the empty
    negative prompt. Each is redone through ft's predict from what ft stores and the call's noisy latents and
    timestep."""
    with Calls(pipe.transformer) as calls:
        pipe(prompt=PROMPTS[1], num_frames=9, height=32, width=64, num_inference_steps=2,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    assert len(calls) == 4  # 2 steps x (prompt, negative prompt)
    with torch.no_grad():  # as precompute encodes (byT5's kernels differ in the last bit with autograd on)
        positive = spec.encode_prompts(encoders(spec, pipe), PROMPTS[1:], 1000)
        negative = spec.encode_prompts(encoders(spec, pipe), [""], 1000)
    sigmas = pipe.scheduler.sigmas[:2]
    for i, theirs in enumerate(calls):
        noisy = theirs["hidden_states"][:, :4]
        assert not theirs["hidden_states"][:, 4:].any()  # text-to-video: zero condition latents and mask
        t = theirs["timestep"]
        torch.testing.assert_close(t, sigmas[i // 2:i // 2 + 1] * 1000)  # the objective's timestep: 1000 sigma
        step = StepInputs(noisy, noisy, noisy, t / 1000, t, positive if i % 2 == 0 else negative, [{}], [])
        with Calls(pipe.transformer) as ours:
            output, weights = spec.predict(pipe.transformer, step, torch.float32)
        assert weights is None and output.shape == noisy.shape
        assert_same_call(ours[0], theirs)


@pytest.mark.parametrize("bucket,ok", [((121, 480, 848), True), ((1, 32, 32), True), ((9, 32, 64), True),
                                       ((120, 480, 848), False), ((121, 488, 848), False), ((9, 32, 40), False)])
def test_bucket_rules(spec, bucket, ok):
    vae = {"temporal_compression_ratio": 4, "spatial_compression_ratio": 16}
    problem = spec.check_bucket(bucket, vae, {"patch_size": 1, "patch_size_t": 1})
    assert (problem is None) == ok, problem


def test_generation_defaults_are_the_pipelines(spec):
    assert spec.generation_defaults({"target_size": 640}, {"spatial_compression_ratio": 16}) == {
        "num_frames": 121, "height": 480, "width": 848}


def test_shards_that_do_not_fit_the_transformer_are_refused(spec, pipe):
    config = dict(pipe.transformer.config)
    good = {"latent_channels": 4, "prompt_embeds": [1000, 16], "prompt_embeds_mask": [1000],
            "prompt_embeds_2": [256, 32], "prompt_embeds_mask_2": [256]}
    spec.check_shards(Manifest("hunyuan_video_1_5", {}, "", {}, good), config)
    for shapes, message in [({**good, "latent_channels": 9}, "9 channels"),
                            ({**good, "prompt_embeds": [1000, 3584]}, "another text encoder"),
                            ({**good, "prompt_embeds_2": [256, 1472]}, "another second text encoder")]:
        with pytest.raises(UserError, match=message):
            spec.check_shards(Manifest("hunyuan_video_1_5", {}, "", {}, shapes), config)
    with pytest.raises(UserError, match="--model hunyuan_video_1_5"):
        spec.check_shards(Manifest("hunyuan_video", {}, "", {}, good), config)


def test_the_published_checkpoints_estimate_offline(spec):
    """The real-size transformer built from the checkpoint's config: 8.3B parameters, as the model card says."""
    from accelerate import init_empty_weights
    from diffusers import HunyuanVideo15Transformer3DModel

    checkpoint = spec.find_checkpoint("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v")
    with init_empty_weights():
        transformer = HunyuanVideo15Transformer3DModel(**checkpoint.configs["transformer"])
    params = sum(p.numel() for p in transformer.parameters())
    assert 8.2e9 < params < 8.4e9, params


def test_ft_estimate_prints_the_published_checkpoint_offline(capsys):
    from helpers import run_cli

    result = run_cli(["estimate", "--model", "hunyuan_video_1_5", "--pretrained",
                      "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v", "--buckets", "61x480x848"])
    assert [c.name for c in result.components] == ["text_encoder", "text_encoder_2", "vae", "transformer"]
    assert 8.3e9 < result.component("transformer").params < 8.4e9
    (bucket,) = result.buckets
    assert bucket.cond_shapes["prompt_embeds"] == (1000, 3584) and bucket.cond_shapes["prompt_embeds_2"] == (256, 1472)
    assert "HunyuanVideo15Transformer3DModel" in capsys.readouterr().out

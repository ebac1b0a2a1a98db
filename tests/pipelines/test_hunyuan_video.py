"""HunyuanVideoSpec against diffusers' own HunyuanVideoPipeline: what stage 1 stores and stage 2 feeds must be what
the pipeline computes (its prompt encoders with its template, its transformer call with mask, pooled projections
and guidance)."""

from __future__ import annotations

import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.common.shards import Manifest
from ft.pipelines.base import StepInputs, TrainOptions
from ft.pipelines.registry import get_spec

PROMPTS = ["a red circle moving left to right on a dark background", "a blue square"]
PLAIN_TEMPLATE = {"template": "{}", "crop_start": 0}


@pytest.fixture(scope="module")
def spec():
    return get_spec("hunyuan_video")


@pytest.fixture(scope="module")
def args(tiny_hunyuan):
    return ModelArgs(model="hunyuan_video", pretrained=str(tiny_hunyuan), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32", text_encoder_2_dtype="fp32")


@pytest.fixture(scope="module")
def pipe(spec, args):
    return spec.load_pipeline(args, "cpu")


def encoders(spec, pipe):
    return {name: getattr(pipe, name) for name in spec.text_components}


def test_registry_names_and_aliases():
    for name in ("hunyuan_video", "hunyuan-video", "hunyuan", "Hunyuan_Video"):
        assert get_spec(name).name == "hunyuan_video", name


def test_prompt_encoding_matches_the_pipeline_with_its_default_template(spec, pipe):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    ours = spec.encode_prompts(encoders(spec, pipe), PROMPTS, 256)
    embeds, mask = pipe._get_llama_prompt_embeds(PROMPTS, DEFAULT_PROMPT_TEMPLATE, device="cpu")
    pooled = pipe._get_clip_prompt_embeds(PROMPTS, device="cpu")
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    assert ours["prompt_attention_mask"].dtype == torch.bool
    assert torch.equal(ours["prompt_attention_mask"], mask.bool())
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    assert ours["prompt_embeds"].shape == (2, 256, 16) and ours["pooled_prompt_embeds"].shape == (2, 8)
    # the crop of 95 template tokens leaves the caption: the longer caption keeps more tokens
    kept = ours["prompt_attention_mask"].sum(1)
    assert kept[0] > kept[1] > 0


def test_the_pipelines_template_is_an_encoding_choice_that_changes_the_sample_key(spec, pipe, monkeypatch):
    """The template is diffusers' own, read when encoding: a diffusers release with another template encodes as
    the pipeline then does, and its samples get other keys (nothing encoded with the old one is reused)."""
    from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video

    from ft.common.shards import sample_key
    from ft.precompute.planned_sample import sample_encoding

    real = spec.encoding_choices({})
    assert real["crop_start"] == 95 and real["prompt_template"].startswith("<|start_header_id|>system")
    assert real["hidden_states_index"] == -3 and real["clip_max_length"] == 77
    monkeypatch.setattr(pipeline_hunyuan_video, "DEFAULT_PROMPT_TEMPLATE", PLAIN_TEMPLATE)
    ours = spec.encode_prompts(encoders(spec, pipe), PROMPTS, 16)
    embeds, mask = pipe._get_llama_prompt_embeds(PROMPTS, PLAIN_TEMPLATE, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["prompt_attention_mask"], mask.bool())
    other = spec.encoding_choices({})
    assert other["prompt_template"] == "{}" and other["crop_start"] == 0
    assert sample_key(sample_encoding(256, real)) != sample_key(sample_encoding(256, other))


def test_latents_are_scaled_like_the_pipeline_decodes_them(spec, pipe):
    mean = torch.randn(2, 4, 3, 4, 4)
    stored = {"mean": mean, "logvar": torch.full_like(mean, -60.0)}  # no variance: the draw is the mean
    latents = spec.prepare_latents(stored, dict(pipe.vae.config), dict(pipe.transformer.config),
                                   [torch.Generator().manual_seed(i) for i in range(2)])
    assert latents.shape == (2, 4, 3, 4, 4)  # [B, C, F, H, W] as the transformer takes them
    torch.testing.assert_close(latents, mean * pipe.vae.config.scaling_factor)


@pytest.mark.parametrize("guidance", [None, 6.0])
def test_predict_feeds_the_transformer_as_the_pipeline_does(spec, pipe, guidance):
    latents = torch.randn(2, 4, 3, 4, 4)
    noise = torch.randn_like(latents)
    sigmas = torch.tensor([0.01, 0.9])
    cond = spec.encode_prompts(encoders(spec, pipe), PROMPTS, 32)
    options = TrainOptions() if guidance is None else TrainOptions(guidance_scale=guidance)
    step = StepInputs(latents, noise, (1 - sigmas[:, None, None, None, None]) * latents + sigmas[
        :, None, None, None, None] * noise, sigmas, sigmas * 1000, cond, [{}, {}], [], options)
    output, weights = spec.predict(pipe.transformer, step, torch.float32)
    # the denoising loop of HunyuanVideoPipeline.__call__, one step
    dtype = pipe.transformer.dtype
    expected = pipe.transformer(
        hidden_states=step.noisy.to(dtype), timestep=(sigmas * 1000).to(torch.float32),
        encoder_hidden_states=cond["prompt_embeds"].to(dtype),
        encoder_attention_mask=cond["prompt_attention_mask"].to(dtype),
        pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
        guidance=torch.tensor([guidance or 1.0] * 2, dtype=dtype) * 1000.0, return_dict=False)[0]
    assert weights is None
    torch.testing.assert_close(output, expected)


def test_the_guidance_scale_changes_the_prediction(spec, pipe):
    latents = torch.randn(1, 4, 3, 4, 4)
    cond = spec.encode_prompts(encoders(spec, pipe), PROMPTS[:1], 32)
    steps = [StepInputs(latents, latents, latents, torch.tensor([0.5]), torch.tensor([500.0]), cond, [{}], [],
                        TrainOptions(guidance_scale=g)) for g in (1.0, 6.0)]
    outputs = [spec.predict(pipe.transformer, step, torch.float32)[0] for step in steps]
    assert not torch.allclose(*outputs)


@pytest.mark.parametrize("bucket,ok", [((129, 720, 1280), True), ((49, 480, 768), True), ((1, 32, 32), True),
                                       ((48, 480, 768), False), ((49, 488, 768), False), ((49, 480, 760), False)])
def test_bucket_rules(spec, bucket, ok):
    vae = {"temporal_compression_ratio": 4, "spatial_compression_ratio": 8}
    problem = spec.check_bucket(bucket, vae, {"patch_size": 2, "patch_size_t": 1})
    assert (problem is None) == ok, problem


def test_shards_that_do_not_fit_the_transformer_are_refused(spec, pipe):
    config = dict(pipe.transformer.config)
    good = {"latent_channels": 4, "prompt_embeds": [256, 16], "prompt_attention_mask": [256],
            "pooled_prompt_embeds": [8]}
    spec.check_shards(Manifest("hunyuan_video", {}, "", {}, good), config)
    for shapes, message in [({**good, "latent_channels": 16}, "16 channels"),
                            ({**good, "prompt_embeds": [256, 4096]}, "another text encoder"),
                            ({**good, "pooled_prompt_embeds": [768]}, "another second text encoder")]:
        with pytest.raises(UserError, match=message):
            spec.check_shards(Manifest("hunyuan_video", {}, "", {}, shapes), config)
    with pytest.raises(UserError, match="--model hunyuan_video"):
        spec.check_shards(Manifest("cogvideox", {}, "", {}, good), config)


def test_the_second_text_encoder_and_tokenizer_come_from_their_flags_in_their_dtype(spec, args, pipe, tmp_path):
    """--tokenizer-2-id, --text-encoder-2-id and --text-encoder-2-dtype act: another CLIP, in bf16."""
    import dataclasses

    other = get_spec("hunyuan_video").tiny_components(seed=7)
    other["text_encoder_2"].save_pretrained(tmp_path / "my-clip")
    other["tokenizer_2"].save_pretrained(tmp_path / "my-clip-tokenizer")
    override = dataclasses.replace(args, text_encoder_2_id=str(tmp_path / "my-clip"),
                                   tokenizer_2_id=str(tmp_path / "my-clip-tokenizer"), text_encoder_2_dtype="bf16")
    loaded = spec.load_text_encoders(override, "cpu")
    assert loaded["text_encoder_2"].dtype == torch.bfloat16 and loaded["text_encoder"].dtype == torch.float32
    ours = spec.encode_prompts(loaded, PROMPTS, 32)
    base = spec.encode_prompts(encoders(spec, pipe), PROMPTS, 32)
    torch.testing.assert_close(ours["prompt_embeds"], base["prompt_embeds"])  # the Llama is the base's
    assert ours["pooled_prompt_embeds"].dtype == torch.bfloat16
    expected = other["text_encoder_2"].to(torch.bfloat16)(
        other["tokenizer_2"](PROMPTS, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids).pooler_output
    torch.testing.assert_close(ours["pooled_prompt_embeds"], expected)
    prints = spec.encoder_fingerprints(loaded, pipe.vae, override)
    assert prints["text_encoder_2"]["dtype"] == "bf16"
    assert prints["text_encoder_2"] != spec.encoder_fingerprints(encoders(spec, pipe), pipe.vae, args)[
        "text_encoder_2"]

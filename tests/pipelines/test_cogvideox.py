"""CogVideoXSpec against diffusers' own CogVideoXPipeline: the trainer must feed the transformer as it does."""

from __future__ import annotations

import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.pipelines.registry import get_spec


@pytest.fixture(scope="module")
def spec():
    return get_spec("cogvideox")


@pytest.fixture(scope="module")
def args(tiny_cog):
    return ModelArgs(model="cogvideox", pretrained=str(tiny_cog), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32")


@pytest.fixture(scope="module")
def pipe(spec, args):
    return spec.load_pipeline(args, "cpu")


def test_registry_lists_known_families_on_a_typo():
    with pytest.raises(UserError, match="cogvideox"):
        get_spec("cogvidex")
    assert get_spec("CogVideoX").name == "cogvideox"


def test_prompt_encoding_matches_the_pipeline(spec, pipe):
    prompts = ["a red circle moving left to right on a dark background", "a blue square"]
    ours = spec.encode_prompts({"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}, prompts, 16)
    theirs = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=16, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(ours["prompt_embeds"], theirs)


@pytest.mark.parametrize("latent_size", [(3, 4, 4), (3, 4, 8), (1, 4, 4)])
def test_rotary_embeddings_match_the_pipeline(spec, pipe, latent_size):
    frames, h, w = latent_size
    ours = spec.rotary_embeddings(dict(pipe.transformer.config), frames, h, w, torch.device("cpu"))
    theirs = pipe._prepare_rotary_positional_embeddings(h * pipe.vae_scale_factor_spatial,
                                                        w * pipe.vae_scale_factor_spatial, frames, "cpu")
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_latents_are_scaled_like_the_pipeline_decodes_them(spec, pipe):
    mean = torch.randn(2, 4, 3, 4, 4)
    stored = {"mean": mean, "logvar": torch.full_like(mean, -60.0)}  # no variance: the draw is the mean
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    latents = spec.prepare_latents(stored, dict(pipe.vae.config), dict(pipe.transformer.config), generators)
    assert latents.shape == (2, 3, 4, 4, 4)  # [B, F, C, H, W] as the transformer takes them
    torch.testing.assert_close(latents, mean.permute(0, 2, 1, 3, 4) * pipe.vae.config.scaling_factor)


def step_inputs(latents, timesteps, cond):
    from ft.pipelines.base import StepInputs

    noise = torch.randn_like(latents)
    return StepInputs(latents, noise, latents + noise, timesteps / 1000, timesteps, cond, [{}] * len(latents),
                      [torch.Generator().manual_seed(i) for i in range(len(latents))])


def test_predict_feeds_the_transformer_as_the_pipeline_does(spec, pipe):
    latents = torch.randn(2, 3, 4, 4, 4)
    t = torch.tensor([10, 900])
    step = step_inputs(latents, t, {"prompt_embeds": torch.randn(2, 16, 32)})
    output, weights = spec.predict(pipe.transformer, step, torch.float32)
    rotary = pipe._prepare_rotary_positional_embeddings(32, 32, 3, "cpu")
    expected = pipe.transformer(hidden_states=step.noisy, encoder_hidden_states=step.cond["prompt_embeds"],
                                timestep=t, image_rotary_emb=rotary, return_dict=False)[0]
    assert weights is None
    torch.testing.assert_close(output, expected)


def test_ddpm_objective_gives_velocity_prediction_target_and_weights(spec, args):
    from ft.train.objectives import DDPMVPrediction, SigmaSampler

    scheduler = spec.load_scheduler(args)
    objective = DDPMVPrediction(scheduler, SigmaSampler())
    latents = torch.randn(2, 3, 4, 4, 4)
    noise = torch.randn_like(latents)
    noisy, t = objective.noised(latents, noise, torch.tensor([0.0105, 0.9]))
    assert t.tolist() == [10, 900]
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, t))
    assert torch.equal(objective.target(latents, noise), latents)
    alphas = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(objective.weights(None, t).double(), (1 / (1 - alphas)).double())
    # get_velocity turns the v-prediction into a clean-latent estimate: a perfect v gives back the target
    v = scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(objective.prediction(v, noisy, t), latents, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bucket,ok", [((49, 480, 720), True), ((1, 32, 32), True), ((48, 480, 720), False),
                                       ((49, 480, 700), False)])
def test_bucket_rules(spec, bucket, ok):
    problem = spec.check_bucket(bucket, {"block_out_channels": [128, 256, 256, 512]}, {"patch_size": 2})
    assert (problem is None) == ok, problem


def test_cogvideox_1_5_takes_buckets_finetrainers_trains(spec):
    """finetrainers' example trains CogVideoX1.5-5B at 81x480x768 (21 latent frames, padded to 22)."""
    vae = {"block_out_channels": [128, 256, 256, 512]}
    for frames in (81, 85, 49, 1):
        assert spec.check_bucket((frames, 480, 768), vae, {"patch_size": 2, "patch_size_t": 2}) is None
    assert spec.check_bucket((80, 480, 768), vae, {"patch_size": 2, "patch_size_t": 2}) is not None


def test_latent_frames_are_padded_to_the_temporal_patch_with_the_last_frame():
    from ft.pipelines.cogvideox import pad_latent_frames

    latents = torch.randn(2, 21, 4, 3, 5)
    padded = pad_latent_frames(latents, 2)
    assert padded.shape == (2, 22, 4, 3, 5)
    torch.testing.assert_close(padded[:, :21], latents)
    torch.testing.assert_close(padded[:, 21], latents[:, 20])  # the last frame repeated, as finetrainers pads
    even = torch.randn(1, 22, 4, 3, 5)
    assert pad_latent_frames(even, 2) is even  # already a multiple: untouched
    assert pad_latent_frames(latents, None) is latents  # CogVideoX 1.0: no temporal patch


def test_a_folder_without_a_transformer_is_a_clear_error(spec, tmp_path, tiny_cog):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_cog, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(UserError, match="no transformer/ folder.*--transformer-id"):
        spec.load_config("transformer", ModelArgs(model="cogvideox", pretrained=str(broken)))


def test_component_override_loads_from_another_folder(spec, tmp_path, tiny_cog):
    import shutil

    # A "finetune" that ships only its transformer, loaded beside the base's other components.
    shutil.copytree(tiny_cog / "transformer", tmp_path / "my-finetune")
    args = ModelArgs(model="cogvideox", pretrained=str(tiny_cog), transformer_id=str(tmp_path / "my-finetune"),
                     transformer_dtype="fp32")
    transformer = spec.load_component("transformer", args)
    assert transformer.dtype == torch.float32
    assert transformer.config.num_layers == 2


def test_cogvideox_1_5_layout_rotary_and_forward(spec, args):
    """The 1.5 transformer (temporal patches, 'slice' RoPE grid) is fed as its pipeline feeds it."""
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=32, num_layers=1, sample_width=8, sample_height=8, sample_frames=13, patch_size=2,
        patch_size_t=2, patch_bias=False, temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=True)
    config = dict(transformer.config)
    ours = spec.rotary_embeddings(config, 4, 4, 8, torch.device("cpu"))
    fake_pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(**config)),
                                vae_scale_factor_spatial=8)
    theirs = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, 32, 64, 4, "cpu")
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    latents = torch.randn(1, 4, 4, 4, 8)  # 4 latent frames: divisible by patch_size_t
    output, _ = spec.predict(transformer, step_inputs(latents, torch.tensor([500]),
                                                      {"prompt_embeds": torch.randn(1, 16, 32)}), torch.float32)
    assert output.shape == latents.shape


def test_the_15_latent_padding_comes_from_the_transformer_config_alone(spec):
    """prepare_latents pads the latent frames to the temporal patch of the transformer config it is given (as
    finetrainers pads CogVideoX 1.5), with no state left by an earlier check_shards call."""
    mean = torch.randn(1, 4, 3, 4, 4)  # 3 latent frames
    stored = {"mean": mean, "logvar": torch.full_like(mean, -60.0)}
    fresh = type(spec)()
    padded = fresh.prepare_latents(stored, {"scaling_factor": 1.0}, {"patch_size_t": 2}, [torch.Generator()])
    assert padded.shape == (1, 4, 4, 4, 4)  # [B, F, C, H, W]: the last frame repeated
    assert torch.equal(padded[:, 3], padded[:, 2])
    assert fresh.prepare_latents(stored, {"scaling_factor": 1.0}, {}, [torch.Generator()]).shape == (1, 3, 4, 4, 4)

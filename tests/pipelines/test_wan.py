"""WanSpec against diffusers' own WanPipeline: what precompute stores and what the trainer feeds the transformer
must be what the pipeline makes and feeds (its transformer calls are captured on a real run and compared)."""

from __future__ import annotations

import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.common.shards import Manifest
from ft.pipelines.base import StepInputs
from ft.pipelines.registry import get_spec
from helpers import Calls, assert_same_call

PROMPTS = ["a red circle moving left to right on a dark background", "  a blue &amp; square\n"]


@pytest.fixture(scope="module")
def spec():
    return get_spec("wan")


def fp32_args(folder):
    return ModelArgs(model="wan", pretrained=str(folder), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32")


@pytest.fixture(scope="module")
def pipe(spec, tiny_wan):
    return spec.load_pipeline(fp32_args(tiny_wan), "cpu")



def encoders(pipe):
    return {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}


def test_registry_names_and_aliases():
    assert {get_spec(n).name for n in ("wan", "WAN", "wan2.1", "Wan-2.1")} == {"wan"}
    with pytest.raises(UserError, match="wan"):
        get_spec("wan3")


def test_prompt_encoding_matches_the_pipeline(spec, pipe):
    with torch.no_grad():
        ours = spec.encode_prompts(encoders(pipe), PROMPTS, 512)["prompt_embeds"]
        theirs = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=512, device="cpu", dtype=torch.float32)
    assert ours.shape == (2, 512, 32)
    assert torch.equal(ours, theirs)
    # trimmed to each caption's tokens, zero-padded: the cleaned second caption ("a blue & square") is shorter
    lengths = [int(row.abs().sum(-1).gt(0).sum()) for row in ours]
    ids = pipe.tokenizer(["a blue & square"]).input_ids[0]
    assert lengths[1] == len(ids) and lengths[0] > lengths[1]
    assert torch.equal(ours[1, lengths[1]:], torch.zeros(512 - lengths[1], 32))


def test_latents_are_normalised_as_the_pipeline_denormalises_them(spec, pipe):
    config = dict(pipe.vae.config)
    mean = torch.randn(2, 4, 3, 4, 4)
    stored = {"mean": mean, "logvar": torch.full_like(mean, -60.0)}  # no variance: the draw is the mean
    latents = spec.prepare_latents(stored, config, {}, [torch.Generator().manual_seed(i) for i in range(2)])
    # WanPipeline.__call__'s decode: latents / (1 / latents_std) + latents_mean
    std = 1.0 / torch.tensor(config["latents_std"]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents / std + torch.tensor(config["latents_mean"]).view(1, 4, 1, 1, 1), mean)
    assert not torch.allclose(latents, mean)  # the tiny VAE's statistics are not the identity
    # with variance, each sample's draw is its own generator's, whatever shares the batch
    stored["logvar"] = torch.zeros_like(mean)
    a = spec.prepare_latents(stored, config, {}, [torch.Generator().manual_seed(i) for i in range(2)])
    b = spec.prepare_latents({k: v[1:] for k, v in stored.items()}, config, {}, [torch.Generator().manual_seed(1)])
    assert torch.equal(a[1:], b) and not torch.allclose(a, latents)


@pytest.mark.parametrize("version", ["2.1", "2.2-ti2v"])
def test_predict_makes_the_transformer_call_the_pipeline_makes(version, tiny_wan, tiny_wan_ti2v):
    """A real 3-step WanPipeline run with classifier-free guidance: each of its transformer calls (conditional and
    unconditional) is made again through ft's predict, with the noisy latents of that step, the sigma of the
    pipeline's scheduler and timesteps from the trainer's flow-matching objective: the same keyword arguments,
    bitwise, and the same output. Wan 2.2 TI2V-5B's pipeline gives every token a timestep; predict too."""
    from ft.train.objectives import FlowMatching, SigmaSampler

    folder = tiny_wan if version == "2.1" else tiny_wan_ti2v
    spec = get_spec("wan").with_pretrained(str(folder))
    pipe = spec.load_pipeline(fp32_args(folder), "cpu")
    assert pipe.config.expand_timesteps == (version != "2.1")
    with torch.no_grad():
        cond = pipe._get_t5_prompt_embeds(PROMPTS[:1], max_sequence_length=512, device="cpu")
        uncond = pipe._get_t5_prompt_embeds([""], max_sequence_length=512, device="cpu")
        with Calls(pipe.transformer) as theirs:
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=9, height=32, width=32,
                 num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                 output_type="latent")
    assert len(theirs) == 6  # 3 steps x (conditional, unconditional)
    sigmas = pipe.scheduler.sigmas[:3]
    assert pipe.scheduler.config.flow_shift == 3.0 and type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    objective = FlowMatching(None, SigmaSampler())
    for i, call in enumerate(theirs):
        noisy, sigma = call["hidden_states"], sigmas[i // 2].view(1)
        _, timesteps = objective.noised(noisy, torch.zeros_like(noisy), sigma)
        embeds = cond if i % 2 == 0 else uncond
        step = StepInputs(noisy, torch.zeros_like(noisy), noisy, sigma, timesteps, {"prompt_embeds": embeds},
                          [{}], [torch.Generator()])
        with torch.no_grad(), Calls(pipe.transformer) as ours:
            output, weights = spec.predict(pipe.transformer, step, torch.float32)
            expected = pipe.transformer(**call)[0]
        assert weights is None
        assert_same_call(ours[0], call)
        assert torch.equal(output, expected)
    if version == "2.1":
        assert theirs[0]["timestep"].dtype == torch.int64  # the pipeline's UniPC timesteps are integers
    else:  # a float32 timestep per token: 3 latent frames x (a 2x2 latent in one 2x2 patch)
        assert theirs[0]["hidden_states"].shape == (1, 4, 3, 2, 2)
        assert theirs[0]["timestep"].shape == (1, 3) and theirs[0]["timestep"].dtype == torch.float32


def test_a_folder_without_a_model_index_is_refused(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        get_spec("wan").with_pretrained(str(tmp_path / "nothing")).pipeline_settings()


def test_the_wan_2_2_vae_compresses_16x_and_the_buckets_follow(spec, tiny_wan_ti2v):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    configs = spec.find_checkpoint("Wan2.2-TI2V-5B").configs
    with init_empty_weights():
        vae = AutoencoderKLWan(**configs["vae"])
    assert spec.compression(dict(vae.config)) == (4, 16) and vae.spatial_compression_ratio == 16
    transformer = {"patch_size": (1, 2, 2)}
    assert spec.check_bucket((121, 704, 1280), dict(vae.config), transformer) is None
    assert "multiples of 32" in spec.check_bucket((49, 480, 848), dict(vae.config), transformer)
    tiny = spec.load_component("vae", fp32_args(tiny_wan_ti2v))
    with torch.no_grad():
        latents = spec.encode_video(tiny, torch.zeros(1, 3, 9, 32, 64))
    assert latents["mean"].shape == (1, 4, 3, 2, 4)


@pytest.mark.parametrize("bucket,ok", [((81, 480, 832), True), ((49, 480, 832), True), ((1, 720, 1280), True),
                                       ((48, 480, 832), False), ((49, 488, 832), False), ((49, 480, 840), False)])
def test_bucket_rules_of_the_real_vae_and_transformer(spec, bucket, ok):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    with init_empty_weights():
        vae, transformer = AutoencoderKLWan(), WanTransformer3DModel()
    assert spec.compression(dict(vae.config)) == (4, 8)
    problem = spec.check_bucket(bucket, dict(vae.config), dict(transformer.config))
    assert (problem is None) == ok, problem


def test_shards_that_do_not_fit_the_transformer_are_refused(spec, pipe):
    config = dict(pipe.transformer.config)
    vae = {"config": {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}}
    good = {"latent_channels": 4, "prompt_embeds": [512, 32]}
    spec.check_shards(Manifest("wan", {"vae": vae}, "", {}, good), config)
    for shapes, encoders_, message in [({**good, "latent_channels": 16}, {"vae": vae}, "16 channels"),
                                       ({**good, "prompt_embeds": [512, 4096]}, {"vae": vae}, "another text encoder"),
                                       (good, {"vae": {"config": {}}}, "latents_mean")]:
        with pytest.raises(UserError, match=message):
            spec.check_shards(Manifest("wan", encoders_, "", {}, shapes), config)
    with pytest.raises(UserError, match="--model wan"):
        spec.check_shards(Manifest("ltx_video", {"vae": vae}, "", {}, good), config)


def test_generation_uses_the_pipelines_defaults_and_scheduler(spec, pipe, tiny_wan):
    import inspect

    from diffusers import WanPipeline

    from ft.train.generate import GenerateConfig, sampling_settings

    call = inspect.signature(WanPipeline.__call__).parameters
    assert spec.generation_defaults({}, {}) == {k: call[k].default for k in ("num_frames", "height", "width")}
    assert spec.pipeline_call_kwargs({}) == {"max_sequence_length": call["max_sequence_length"].default}
    size = {"num_frames": 9, "height": 32, "width": 32}
    cfg = GenerateConfig(model="wan", pretrained=str(tiny_wan), prompt="p")
    assert sampling_settings(spec, cfg, size).resolved(spec, pipe) == {
        "num_inference_steps": 50, "guidance_scale": call["guidance_scale"].default, "fps": 16.0}
    scheduler = spec.pipeline_scheduler(cfg)
    assert type(scheduler).__name__ == "UniPCMultistepScheduler" and scheduler.config.flow_shift == 3.0
    assert spec.check_generation_size((9, 40, 32), dict(pipe.vae.config), dict(pipe.transformer.config))


def test_the_encoding_choices_record_the_caption_cleaning(spec):
    from diffusers.utils import is_ftfy_available

    choices = spec.encoding_choices({})
    assert choices["prompt_clean"] == ("ftfy, html, whitespace" if is_ftfy_available() else "html, whitespace")
    assert "latents_mean" in choices["latent_normalisation"]


def test_validations_pipeline_keeps_the_models_expand_timesteps(tiny_wan, tiny_wan_ti2v):
    """The pipeline validation builds around the live transformer (no text encoder) samples as the model's does."""
    for folder, expand in ((tiny_wan, False), (tiny_wan_ti2v, True)):
        spec = get_spec("wan").with_pretrained(str(folder))
        args = fp32_args(folder)
        pipe = spec.build_pipeline(spec.load_component("transformer", args), spec.load_component("vae", args),
                                   spec.pipeline_scheduler(args))
        assert pipe.config.expand_timesteps == expand and pipe.text_encoder is None


def test_caption_token_counts_are_the_tokens_the_encoding_keeps(spec, pipe, tiny_wan):
    """check-data's caption lengths (the truncation warnings) count the caption as WanPipeline encodes it, cleaned:
    "&amp;" is one "&", runs of whitespace one space."""
    captions = [PROMPTS[1], "a  red\n\ncircle &lt;moving&gt; left"]
    counts = spec.caption_token_counts(fp32_args(tiny_wan), captions)
    with torch.no_grad():
        embeds = spec.encode_prompts(encoders(pipe), captions, 64)["prompt_embeds"]
    kept = [int(row.abs().sum(-1).gt(0).sum()) for row in embeds]
    assert counts == kept
    raw = [len(ids) for ids in pipe.tokenizer(captions).input_ids]
    assert raw != kept  # the raw captions' counts are not what is encoded


def test_another_familys_folder_is_refused_naming_its_family(tiny_wan, tiny_cog, tmp_path):
    """A CogVideoX folder as --pretrained for wan (and the reverse) is refused at the first config read, naming
    the family it is, in train, generate and estimate; before, train said "the transformer takes None" and
    estimate died in WanTransformer3DModel's __init__ (TypeError: 'int' object is not iterable)."""
    from helpers import run_cli

    with pytest.raises(UserError, match=r"CogVideoXTransformer3DModel \(a cogvideox model: pass --model cogvideox\)"):
        get_spec("wan").load_config("transformer", fp32_args(tiny_cog))
    with pytest.raises(UserError, match=r"WanTransformer3DModel \(a wan model: pass --model wan\)"):
        get_spec("cogvideox").load_config("transformer", ModelArgs(model="cogvideox", pretrained=str(tiny_wan)))
    with pytest.raises(UserError, match=r"AutoencoderKLCogVideoX \(a cogvideox model"):
        run_cli(["estimate", "--model", "wan", "--pretrained", tiny_cog])
    with pytest.raises(UserError, match="pass --model cogvideox"):
        run_cli(["generate", "--model", "wan", "--pretrained", tiny_cog, "--prompt", "x", "--out", tmp_path / "a.mp4"])
    with pytest.raises(UserError, match="pass a diffusers Wan transformer as --transformer-id"):
        run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan, "--transformer-id", tiny_cog / "transformer",
                 "--prompt", "x", "--out", tmp_path / "b.mp4"])
    assert get_spec("wan").load_config("transformer", fp32_args(tiny_wan))["_class_name"] == "WanTransformer3DModel"


def test_estimate_refuses_a_bad_model_index(tiny_wan, tmp_path):
    """ft estimate read only the component configs: a corrupt model_index.json was estimated as if fine; a corrupt
    component config was a JSONDecodeError. (A two-expert Wan 2.2 is estimated: tests/cli/test_estimate.py.)"""
    import shutil

    from helpers import run_cli

    assert run_cli(["estimate", "--model", "wan", "--pretrained", tiny_wan, "--buckets", "9x32x32"]) is not None
    shutil.copytree(tiny_wan, tmp_path / "broken")
    (tmp_path / "broken" / "model_index.json").write_text('{"_class_name": "WanPipeline", ')
    with pytest.raises(UserError, match="could not read its model_index.json"):
        run_cli(["estimate", "--model", "wan", "--pretrained", tmp_path / "broken"])
    (tmp_path / "broken" / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"transformer/config.json is not readable JSON"):
        run_cli(["estimate", "--model", "wan", "--pretrained", tmp_path / "broken"])

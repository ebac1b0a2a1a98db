"""HunyuanVideo 1.5 image-to-video against diffusers' own HunyuanVideo15ImageToVideoPipeline: which checkpoints are
image-conditioned, what stage 1 stores of the image (the VAE's latents of the first frame alone, SigLIP's hidden
states), and every transformer call of a real pipeline run with an image redone bitwise through ft's encode_image ->
prepare_image -> predict (the image latents on the first latent frame and its mask, SigLIP's tokens, timestep_r)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.common.shards import Manifest
from ft.pipelines.base import StepInputs
from ft.pipelines.image import read_model_index, resolve_conditioning
from ft.pipelines.registry import get_spec, save_tiny_model
from helpers import Calls, assert_same_call

PROMPT = 'a sign that says "OPEN" on a street'


@pytest.fixture(scope="module")
def spec():
    return get_spec("hunyuan_video_1_5")


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory):
    return save_tiny_model("hunyuan_video_1_5:i2v", tmp_path_factory.mktemp("hv15-i2v") / "model")


def fp32_args(folder, mode="auto"):
    return ModelArgs(model="hunyuan_video_1_5", pretrained=str(folder), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32", text_encoder_2_dtype="fp32", image_encoder_dtype="fp32", mode=mode)


def conditioning_of(spec, folder, mode="auto"):
    config = spec.load_config("transformer", fp32_args(folder, mode))
    return resolve_conditioning(spec, mode, config, read_model_index(str(folder)), str(folder))


def test_which_checkpoints_are_image_conditioned(spec, i2v_model, tiny_hv15):
    assert conditioning_of(spec, tiny_hv15) is None
    found = conditioning_of(spec, i2v_model)
    assert (found.kind, found.frames, found.image_encoder, found.text_to_video) == (
        "channel-concat", ("first",), True, False)
    assert found.pipeline_class == ("diffusers", "HunyuanVideo15ImageToVideoPipeline")
    # a folder without model_index.json: the transformer's task_type decides
    assert spec.image_conditioning({"task_type": "i2v"}, {}) == found
    assert spec.image_conditioning({"task_type": "t2v"}, {}) is None
    with pytest.raises(UserError, match="--mode i2v: .* text-to-video"):
        conditioning_of(spec, tiny_hv15, "i2v")
    with pytest.raises(UserError, match="--mode t2v: .* image-to-video checkpoint"):
        conditioning_of(spec, i2v_model, "t2v")


def test_every_transformer_call_of_an_i2v_pipeline_run_is_predict_bitwise(spec, i2v_model):
    """A real 2-step HunyuanVideo15ImageToVideoPipeline run on an image (guider CFG 6.0: a call with the prompt and
    one with the empty negative prompt per step); ft's stage 1 on the pipeline's own pixels of the image, then
    prepare_image and predict on each call's noisy latents and timestep: the same keyword arguments, bitwise."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from PIL import Image

    conditioning = conditioning_of(spec, i2v_model)
    pipe = spec.load_pipeline(fp32_args(i2v_model), "cpu", conditioning)
    assert isinstance(pipe, HunyuanVideo15ImageToVideoPipeline)
    # 32x32: the size the pipeline picks for a square at the tiny transformer's target_size (32), so no resize; a
    # 2:1 image it crops to 16x32
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    configs = dict(pipe.transformer.config), dict(pipe.vae.config)
    assert spec.image_generation_size(image.size, *configs) == (32, 32)
    assert spec.image_generation_size((64, 32), *configs) == (16, 32)
    with Calls(pipe.transformer) as theirs:
        pipe(image=image, prompt=PROMPT, num_frames=9, num_inference_steps=2,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    assert len(theirs) == 4
    text = {name: getattr(pipe, name) for name in spec.text_components}
    with torch.no_grad():  # as precompute encodes
        positive = spec.encode_prompts(text, [PROMPT], 1000)
        negative = spec.encode_prompts(text, [""], 1000)
        pixels = pipe.video_processor.preprocess(image, height=32, width=32)[:, :, None]  # [1, C, 1, H, W]
        models = {"vae": pipe.vae, "image_encoder": pipe.image_encoder, "feature_extractor": pipe.feature_extractor}
        stored = spec.encode_image(models, pixels, 9, conditioning)
    assert stored["image_latents"].shape == (1, 4, 1, 2, 2) and stored["image_embeds"].shape == (1, 16, 12)
    image_inputs = spec.prepare_image(stored, dict(pipe.vae.config), dict(pipe.transformer.config),
                                      [torch.Generator()], conditioning)
    for i, call in enumerate(theirs):
        noisy, t = call["hidden_states"][:, :4], call["timestep"]
        assert call["hidden_states"][:, 4:8, 0].any() and not call["hidden_states"][:, 4:8, 1:].any()
        step = StepInputs(noisy, noisy, noisy, t / 1000, t, positive if i % 2 == 0 else negative, [{}], [],
                          image=image_inputs, image_conditioning=conditioning)
        with torch.no_grad(), Calls(pipe.transformer) as ours:
            output, weights = spec.predict(pipe.transformer, step, torch.float32)
        assert weights is None and output.shape == noisy.shape
        assert_same_call(ours[0], call)


def test_stage_one_pixels_are_the_pipelines(i2v_model):
    """Precompute's frames ([-1, 1] from uint8 by resize_to_bucket) are the pixels the pipeline makes of the image."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from PIL import Image

    from ft.precompute.media import resize_to_bucket

    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(i2v_model)
    array = np.random.default_rng(1).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    ours = resize_to_bucket(array[None], 32, 64)
    theirs = pipe.video_processor.preprocess(Image.fromarray(array), height=32, width=64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_a_mean_flow_transformer_is_refused_for_image_to_video_training(spec, i2v_model):
    config = {**spec.load_config("transformer", fp32_args(i2v_model)), "use_meanflow": True}
    shapes = {"latent_channels": 4, "prompt_embeds": [1000, 16], "prompt_embeds_mask": [1000],
              "prompt_embeds_2": [256, 32], "prompt_embeds_mask_2": [256]}
    manifest = Manifest("hunyuan_video_1_5", {}, "", {"image": {"kind": "channel-concat"}}, shapes)
    with pytest.raises(UserError, match="use_meanflow"):
        spec.check_shards(manifest, config)


def test_the_published_i2v_checkpoints_estimate_offline(capsys):
    from helpers import run_cli

    result = run_cli(["estimate", "--model", "hunyuan_video_1_5", "--pretrained",
                      "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v", "--buckets", "61x480x848"])
    names = [c.name for c in result.components]
    assert "image_encoder" in names and "transformer" in names
    assert 0.39e9 < result.component("image_encoder").params < 0.45e9  # SigLIP so400m's vision tower: 0.43B
    assert 8.3e9 < result.component("transformer").params < 8.4e9
    assert "image encoder" in capsys.readouterr().out

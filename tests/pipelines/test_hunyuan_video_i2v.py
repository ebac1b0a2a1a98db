"""HunyuanVideo-I2V (token_replace) and -33ch (latent_concat) against diffusers' own
HunyuanVideoImageToVideoPipeline: which checkpoints are image-conditioned and which spec they get, what stage 1
stores from the conditioning frame and the caption (the Llava reads them together), and the transformer call stage
2 makes from it, captured on a real pipeline run (with true CFG on a black image) and compared bitwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.pipelines.base import StepInputs, TrainOptions
from ft.pipelines.image import read_model_index, resolve_conditioning
from ft.pipelines.registry import save_tiny_model, spec_for
from helpers import Calls, assert_same_call

PROMPT = "a red circle moving left to right on a dark background"
VARIANTS = {"i2v": "token_replace", "i2v-33ch": "latent_concat"}


@pytest.fixture(scope="module")
def i2v_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan-i2v")
    return {variant: save_tiny_model(f"hunyuan_video:{variant}", root / variant) for variant in VARIANTS}


def fp32_args(folder, mode="auto", **extra):
    return ModelArgs(model="hunyuan_video", pretrained=str(folder), transformer_dtype="fp32", vae_dtype="fp32",
                     text_encoder_dtype="fp32", text_encoder_2_dtype="fp32", mode=mode, **extra)


def conditioning_of(spec, folder, mode="auto"):
    return resolve_conditioning(spec, mode, spec.load_config("transformer", fp32_args(folder)),
                                read_model_index(str(folder)), str(folder))


def test_which_checkpoints_are_image_conditioned_and_their_spec(tiny_hunyuan, i2v_models):
    t2v = spec_for(fp32_args(tiny_hunyuan))
    assert type(t2v).__name__ == "HunyuanVideoSpec" and conditioning_of(t2v, tiny_hunyuan) is None
    for variant, kind in (("i2v", "first-frame"), ("i2v-33ch", "channel-concat")):
        spec = spec_for(fp32_args(i2v_models[variant]))
        assert type(spec).__name__ == "HunyuanVideoI2VSpec" and spec.name == "hunyuan_video"
        assert spec.component_classes["text_encoder"][1] == "LlavaForConditionalGeneration"
        found = conditioning_of(spec, i2v_models[variant])
        assert (found.kind, found.frames, found.caption, found.text_to_video) == (kind, ("first",), True, False)
        assert found.pipeline_class[1] == "HunyuanVideoImageToVideoPipeline"
    with pytest.raises(UserError, match="is a HunyuanVideoPipeline but its transformer is image-to-video"):
        spec_for(fp32_args(tiny_hunyuan, transformer_id=str(i2v_models["i2v"])))
    with pytest.raises(UserError, match="--mode i2v: .* text-to-video"):
        conditioning_of(t2v, tiny_hunyuan, "i2v")
    with pytest.raises(UserError, match="--mode t2v: .* image-to-video checkpoint"):
        conditioning_of(spec, i2v_models["i2v"], "t2v")


def test_caption_dropout_is_refused_with_the_reason(i2v_models):
    from ft.train.config import TrainConfig

    cfg = TrainConfig(**vars(fp32_args(i2v_models["i2v"])), shards=["x"], output_dir="y", caption_dropout_p=0.1)
    with pytest.raises(UserError, match="--caption-dropout-p: .* reads the prompt together with the image"):
        spec_for(cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predict_makes_the_transformer_call_the_i2v_pipeline_makes(variant, i2v_models):
    """A real 2-step HunyuanVideoImageToVideoPipeline run on an image and a prompt (which its Llava encodes
    together), with true CFG (the negative prompt on a black image): ft's stage 1 on the pipeline's own pixels and
    the caption (encode_image: the VAE's mode, the Llava embeddings; encode_prompts: CLIP's pooled), then
    prepare_image and predict on each captured step's noisy latents and sigma: the same keyword arguments,
    bitwise, and the same output. The loss leaves out exactly the frame the image replaces (token_replace)."""
    from diffusers import HunyuanVideoImageToVideoPipeline
    from PIL import Image

    from ft.train.objectives import FlowMatching, SigmaSampler

    folder = i2v_models[variant]
    spec = spec_for(fp32_args(folder))
    conditioning = conditioning_of(spec, folder)
    pipe = spec.load_pipeline(fp32_args(folder), "cpu", conditioning)
    assert isinstance(pipe, HunyuanVideoImageToVideoPipeline)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    guidance = 6.0 if variant == "i2v" else 1.0
    with torch.no_grad(), Calls(pipe.transformer) as theirs:
        pipe(image=image, prompt=PROMPT, negative_prompt="", true_cfg_scale=2.0, guidance_scale=guidance,
             num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=32,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    encoders = {name: getattr(pipe, name) for name in (*spec.text_components, "image_processor")}
    with torch.no_grad():
        pixels = pipe.video_processor.preprocess(image, height=32, width=32)[:, :, None]  # [1, C, 1, H, W]
        stored = spec.encode_image({"vae": pipe.vae, **encoders}, pixels, 9, conditioning, captions=[PROMPT],
                                   max_sequence_length=32)
        cond = spec.encode_prompts(encoders, [PROMPT], 32)
        negative = {**spec.encode_prompts(encoders, [""], 32),
                    **spec.image_prompt_embeds(encoders, [image], [""], 32, conditioning, negative=True)}
    assert set(cond) == {"pooled_prompt_embeds"}  # the text half; the Llava's embeddings are the image half's
    assert stored["image_latents"].shape == (1, 4, 1, 4, 4) and stored["prompt_attention_mask"].dtype == torch.bool
    image_tokens = 576 // (4 if variant == "i2v" else 2)
    assert stored["prompt_embeds"].shape == (1, image_tokens + 32 - 4, 16)
    prepared = spec.prepare_image(stored, dict(pipe.vae.config), dict(pipe.transformer.config),
                                  [torch.Generator()], conditioning)
    sigmas = pipe.scheduler.sigmas[:2]
    objective = FlowMatching(None, SigmaSampler())
    assert len(theirs) == 4
    for i, call in enumerate(theirs):
        noisy = call["hidden_states"][:, :4]
        sigma = sigmas[i // 2].view(1)
        _, timesteps = objective.noised(noisy, torch.zeros_like(noisy), sigma)
        image_group = prepared if i % 2 == 0 else {**prepared, **{k: negative[k] for k in stored if k in negative}}
        step = StepInputs(noisy, torch.zeros_like(noisy), noisy, sigma, timesteps,
                          cond if i % 2 == 0 else {"pooled_prompt_embeds": negative["pooled_prompt_embeds"]},
                          [{}], [torch.Generator()], TrainOptions(guidance_scale=guidance), image=image_group,
                          image_conditioning=conditioning)
        with torch.no_grad(), Calls(pipe.transformer) as ours:
            output, weights = spec.predict(pipe.transformer, step, torch.float32)
            expected = pipe.transformer(**call)[0]
        assert_same_call(ours[0], call)
        assert torch.equal(output, expected)
        if variant == "i2v":
            assert weights.flatten().tolist() == [0.0, 1.0, 1.0]
        else:
            assert weights is None


def test_a_one_frame_bucket_is_refused_for_token_replace(i2v_models):
    spec = spec_for(fp32_args(i2v_models["i2v"]))
    config = spec.load_config("transformer", fp32_args(i2v_models["i2v"]))
    assert "no frame to learn" in spec.check_bucket((1, 32, 32), {}, config)
    assert spec.check_bucket((9, 32, 32), {}, config) is None

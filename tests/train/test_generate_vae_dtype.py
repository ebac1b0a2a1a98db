"""`--vae-dtype` in `ft generate`: the VAE decodes in the dtype the user asked for wherever the family's pipeline
casts the latents to the VAE's dtype itself (WanPipeline, HunyuanVideoPipeline, LTXPipeline), as diffusers' own
Wan example runs it (a float32 VAE under a bf16 transformer); only CogVideoXPipeline, which hands the VAE the
transformer's latents as they are, needs the VAE in the transformer's dtype."""

from __future__ import annotations

import numpy as np
import torch

from ft.pipelines.registry import get_spec, spec_for
from ft.train.generate import GenerateConfig, generate_frames, load_pipeline_with_lora, resolve_size

PROMPT = "a red circle moving left to right on a dark background"


def config(model, folder):
    return GenerateConfig(model=model, pretrained=str(folder), transformer_dtype="bf16", vae_dtype="fp32",
                          text_encoder_dtype="bf16", prompt=PROMPT, num_frames=5, height=32, width=32,
                          num_inference_steps=2)


def test_wan_decodes_with_the_vae_dtype_asked_for_as_diffusers_does(tiny_wan):
    from diffusers import AutoencoderKLWan, WanPipeline

    cfg = config("wan", tiny_wan)
    spec = spec_for(cfg)
    pipe = load_pipeline_with_lora(spec, cfg, "cpu")
    ours = generate_frames(spec, cfg, pipe, resolve_size(spec, cfg)).astype(np.float32) / 255
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    # docs/wan.md's diffusers example: a float32 VAE in a bf16 pipeline
    vae = AutoencoderKLWan.from_pretrained(tiny_wan, subfolder="vae", torch_dtype=torch.float32)
    theirs_pipe = WanPipeline.from_pretrained(tiny_wan, vae=vae, torch_dtype=torch.bfloat16)
    theirs = theirs_pipe(prompt=PROMPT, num_frames=5, height=32, width=32, num_inference_steps=2,
                         generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def test_which_pipelines_cast_the_latents_to_the_vaes_dtype():
    import inspect

    from ft.pipelines.loading import import_class

    for name in ("cogvideox", "ltx_video", "hunyuan_video", "wan"):
        spec = get_spec(name)
        source = inspect.getsource(import_class(*spec.pipeline_class))
        assert spec.decode_casts_latents == ("self.vae.dtype" in source), name


def test_cogvideox_still_decodes_a_float32_vae_under_a_bf16_transformer(tiny_cog):
    cfg = config("cogvideox", tiny_cog)
    spec = spec_for(cfg)
    pipe = load_pipeline_with_lora(spec, cfg, "cpu")
    frames = generate_frames(spec, cfg, pipe, resolve_size(spec, cfg))
    assert frames.shape[1:] == (32, 32, 3) and pipe.vae.dtype == torch.bfloat16

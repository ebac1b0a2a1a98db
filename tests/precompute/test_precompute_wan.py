"""`ft precompute --model wan`: what the shards hold against the pipeline's own encoders (the round trip), and the
VAE's latent statistics carried in the manifest for stage 2."""

from __future__ import annotations

import torch

from ft.common.shards import Manifest, iter_shard


def test_the_shards_hold_what_the_pipelines_encoders_make(wan_shards, tiny_wan):
    """Each sample's embeddings read back equal WanPipeline._get_t5_prompt_embeds for its caption, its latents the
    VAE posterior of its frames; the manifest holds the VAE config's latents_mean/std and the family's choices."""
    from diffusers import WanPipeline

    from ft.pipelines.registry import get_spec
    from ft.precompute.media import open_media, resize_center_crop

    pipe = WanPipeline.from_pretrained(tiny_wan)  # fp32, as the shards were encoded
    manifest = Manifest.load(wan_shards)
    assert manifest.model_family == "wan" and manifest.num_samples == 10 and not manifest.rejected
    assert manifest.shapes == {"latent_channels": 4, "prompt_embeds": [512, 32]}
    assert manifest.encoding["max_sequence_length"] == 512
    assert manifest.encoding["family_choices"] == get_spec("wan").encoding_choices({})
    vae = manifest.encoders["vae"]["config"]
    assert (vae["latents_mean"], vae["latents_std"]) == (pipe.vae.config.latents_mean, pipe.vae.config.latents_std)
    assert set(manifest.encoders) == {"tokenizer", "text_encoder", "vae"}
    samples = [s for shard in manifest.shards for s in iter_shard(wan_shards / shard.name)]
    with torch.no_grad():
        expected = pipe._get_t5_prompt_embeds([s.meta["caption"] for s in samples], max_sequence_length=512,
                                              device="cpu")
    for i, sample in enumerate(samples):
        assert set(sample.tensors["cond"]) == {"prompt_embeds"}  # no mask: the pipeline feeds the zeros
        torch.testing.assert_close(sample.tensors["cond"]["prompt_embeds"], expected[i], atol=1e-5, rtol=1e-5)
    video = next(s for s in samples if s.meta["bucket"] == [9, 32, 64])
    frames = open_media(video.meta["source"]).read(video.meta["frame_indices"])
    x = resize_center_crop(frames, 32, 64).permute(1, 0, 2, 3)[None]
    with torch.no_grad():
        posterior = pipe.vae.encode(x).latent_dist
    stored = video.tensors["latents"]
    assert stored["mean"].shape == stored["logvar"].shape == (4, 3, 4, 8)
    torch.testing.assert_close(stored["mean"], posterior.mean[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stored["logvar"], posterior.logvar[0], atol=1e-4, rtol=1e-4)
    still = next(s for s in samples if s.meta["bucket"] == [1, 32, 32])
    assert still.tensors["latents"]["mean"].shape == (4, 1, 4, 4)

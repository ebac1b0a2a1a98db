"""`ft precompute --model hunyuan_video`: every dataset layout, what the shards hold against the encoders' own
output (the round trip), and the second text encoder's flags."""

from __future__ import annotations

import pytest
import torch

from ft.common.shards import Manifest, iter_shard
from helpers import BUCKETS, HUNYUAN_FP32, HUNYUAN_TEXT, run_cli


@pytest.mark.parametrize("layout", ["sidecar", "csv", "jsonl", "parquet"])
def test_precompute_accepts_each_dataset_layout(layout, tmp_path, tiny_hunyuan):
    from ft.cli.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / layout, num_clips=2, num_images=1, layout=layout, seed=9)
    manifest = run_cli(["precompute", "--model", "hunyuan_video", "--pretrained", tiny_hunyuan, *HUNYUAN_FP32,
                        *HUNYUAN_TEXT, "--dataset", data, "--out", tmp_path / "shards", *BUCKETS])
    assert manifest.num_samples == 3 and not manifest.rejected


def test_the_shards_hold_what_the_pipelines_encoders_make(hunyuan_shards, tiny_hunyuan, shapes_data):
    """Round trip: each sample's conditioning read back equals the encoders' output for its caption, its latents
    the VAE posterior of its frames; the manifest records the template, crop and layer."""
    from ft.common.model_args import ModelArgs
    from ft.pipelines.registry import get_spec
    from ft.precompute.media import open_media, resize_center_crop

    spec = get_spec("hunyuan_video")
    args = ModelArgs(model="hunyuan_video", pretrained=str(tiny_hunyuan), vae_dtype="fp32",
                     text_encoder_dtype="fp32", text_encoder_2_dtype="fp32")
    manifest = Manifest.load(hunyuan_shards)
    assert manifest.model_family == "hunyuan_video" and manifest.num_samples == 10 and not manifest.rejected
    assert manifest.shapes == {"latent_channels": 4, "prompt_embeds": [32, 16], "prompt_attention_mask": [32],
                               "pooled_prompt_embeds": [8]}
    choices = manifest.encoding["family_choices"]
    assert choices["crop_start"] == 95 and choices["hidden_states_index"] == -3 and "{}" in choices["prompt_template"]
    assert set(manifest.encoders) == {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae"}
    samples = [s for shard in manifest.shards for s in iter_shard(hunyuan_shards / shard.name)]
    encoders = spec.load_text_encoders(args, "cpu")
    with torch.no_grad():
        expected = spec.encode_prompts(encoders, [s.meta["caption"] for s in samples], 32)
    for i, sample in enumerate(samples):
        assert sample.tensors["cond"]["prompt_attention_mask"].dtype == torch.bool
        for name, tensor in sample.tensors["cond"].items():
            torch.testing.assert_close(tensor, expected[name][i], atol=1e-5, rtol=1e-5)
    video = next(s for s in samples if s.meta["bucket"] == [9, 32, 64])
    frames = open_media(video.meta["source"]).read(video.meta["frame_indices"])
    x = resize_center_crop(frames, 32, 64).permute(1, 0, 2, 3)[None]
    with torch.no_grad():
        latents = spec.encode_video(spec.load_component("vae", args), x)
    assert video.tensors["latents"]["mean"].shape == (4, 3, 4, 8)
    torch.testing.assert_close(video.tensors["latents"]["mean"], latents["mean"][0], atol=1e-4, rtol=1e-4)


def test_precompute_with_another_second_text_encoder_in_its_own_dtype(tiny_hunyuan, shapes_data, hunyuan_shards,
                                                                      tmp_path):
    """The CLI flags reach stage 1: another CLIP in bf16 makes other pooled embeddings and another fingerprint."""
    from ft.pipelines.registry import get_spec

    get_spec("hunyuan_video").tiny_components(seed=7)["text_encoder_2"].save_pretrained(tmp_path / "clip")
    manifest = run_cli(["precompute", "--model", "hunyuan", "--pretrained", tiny_hunyuan, *HUNYUAN_FP32,
                        *HUNYUAN_TEXT, "--text-encoder-2-id", tmp_path / "clip", "--text-encoder-2-dtype", "bf16",
                        "--dataset", shapes_data, "--out", tmp_path / "shards", *BUCKETS])
    base = Manifest.load(hunyuan_shards)
    assert manifest.encoders["text_encoder_2"]["dtype"] == "bf16"
    assert manifest.encoders["text_encoder_2"]["weights"] != base.encoders["text_encoder_2"]["weights"]
    assert manifest.encoders["text_encoder"] == base.encoders["text_encoder"]
    ours = next(iter_shard(tmp_path / "shards" / manifest.shards[0].name))
    theirs = {s.key: s for shard in base.shards for s in iter_shard(hunyuan_shards / shard.name)}
    same_clip = next(s for s in theirs.values() if s.meta["source"] == ours.meta["source"]
                     and s.meta["frame_indices"] == ours.meta["frame_indices"])
    assert ours.key != same_clip.key  # a new encoder makes new keys
    assert ours.tensors["cond"]["pooled_prompt_embeds"].dtype == torch.bfloat16
    torch.testing.assert_close(ours.tensors["cond"]["prompt_embeds"], same_clip.tensors["cond"]["prompt_embeds"])
    assert not torch.allclose(ours.tensors["cond"]["pooled_prompt_embeds"].float(),
                              same_clip.tensors["cond"]["pooled_prompt_embeds"])

"""`ft precompute --model ltx_video`: a text encoder from its own folder (--text-encoder-id), in its own dtype."""

from __future__ import annotations

import torch

from ft.common.shards import iter_shard, load_manifest
from helpers import BUCKETS, FP32, run_cli


def test_an_overridden_text_encoder_with_its_own_dtype(tiny_ltx, shapes_data, tmp_path):
    from transformers import T5EncoderModel

    torch.manual_seed(1)
    base = T5EncoderModel.from_pretrained(tiny_ltx, subfolder="text_encoder")
    T5EncoderModel(base.config).save_pretrained(tmp_path / "my-t5")
    out = tmp_path / "shards"
    run_cli(["precompute", "--model", "ltx_video", "--pretrained", tiny_ltx, *FP32, "--text-encoder-id",
             tmp_path / "my-t5", "--text-encoder-dtype", "bf16", "--dataset", shapes_data, "--out", out, *BUCKETS])
    manifest = load_manifest(out)
    assert manifest.encoders["text_encoder"]["dtype"] == "bf16"
    assert manifest.encoders["vae"]["dtype"] == "fp32"
    sample = next(iter_shard(out / manifest.shards[0].name))
    assert sample.tensors["cond"]["prompt_embeds"].dtype == torch.bfloat16
    assert sample.tensors["latents"]["mean"].dtype == torch.float32

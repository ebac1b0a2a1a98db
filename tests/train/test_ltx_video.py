"""LTX-Video's own training runs through the CLI on precomputed shards of the tiny model: a full finetune that
LTXVideoTransformer3DModel.from_pretrained loads, an exact resume with first-frame conditioning, and a LoRA on a
custom transformer that LTXPipeline loads. Its LoRA run (the loss falls, the LoRA loads, generate) is
test_lora_families.py's; its overridden text encoder, tests/precompute/test_precompute_ltx_video.py."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from helpers import train

# what this file's runs share besides the run's own flags
RUN = ["--rank", "8", "--lora-alpha", "16", "--batch-size", "2", "--lr-warmup-steps", "0", "--report-to", "none"]


def test_full_finetune_saves_a_transformer_that_from_pretrained_loads(tiny_ltx, ltx_shards, tmp_path):
    from diffusers import LTXVideoTransformer3DModel

    train("ltx_video", tiny_ltx, ltx_shards, tmp_path, *RUN, "--training-type", "full-finetune", "--rank", "64",
          "--lora-alpha", "64", "--train-steps", "2", "--lr", "1e-3")
    tuned = LTXVideoTransformer3DModel.from_pretrained(tmp_path / "transformer")
    base = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx, subfolder="transformer")
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > len(tuned.state_dict()) // 2


def test_a_resumed_run_equals_a_straight_run(tiny_ltx, ltx_shards, tmp_path):
    extra = ["--seed", "7", "--lr", "2e-3", "--first-frame-conditioning-p", "0.5", "--checkpointing-steps", "2"]
    train("ltx_video", tiny_ltx, ltx_shards, tmp_path / "straight", *RUN, "--train-steps", "4", *extra)
    train("ltx_video", tiny_ltx, ltx_shards, tmp_path / "resumed", *RUN, "--train-steps", "2", *extra)
    train("ltx_video", tiny_ltx, ltx_shards, tmp_path / "resumed", *RUN, "--train-steps", "4",
          "--resume-from-checkpoint", "latest", *extra)
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_custom_transformer_from_its_own_folder(tiny_ltx, ltx_shards, tmp_path):
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(1)
    LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                               attention_head_dim=8, cross_attention_dim=32, num_layers=2, caption_channels=32
                               ).save_pretrained(tmp_path / "my-finetune")
    summary = train("ltx_video", tiny_ltx, ltx_shards, tmp_path / "out", *RUN, "--transformer-id",
                    tmp_path / "my-finetune", "--train-steps", "2")
    assert summary["steps"] == 2
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("transformer.transformer_blocks.1.") for k in weights)  # the 2-layer finetune's
    pipe = LTXPipeline.from_pretrained(tiny_ltx, transformer=LTXVideoTransformer3DModel.from_pretrained(
        tmp_path / "my-finetune"))
    pipe.load_lora_weights(tmp_path / "out")
    assert pipe.get_active_adapters()

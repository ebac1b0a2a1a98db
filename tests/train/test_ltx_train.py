"""LTX-Video through the CLI on precomputed shards of the tiny model: LoRA and full finetune, exact resume, a
custom transformer, an overridden text encoder, and generation; the results load in diffusers' LTXPipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.shards import Manifest, iter_shard
from helpers import BUCKETS, FP32, run_cli

PROMPT = "a red circle moving left to right on a dark background"


def train(model, shards, out, *extra):
    return run_cli(["train", "--model", "ltx-video", "--pretrained", model, *FP32, "--shards", shards,
                    "--output-dir", out, "--rank", "8", "--lora-alpha", "16", "--batch-size", "2",
                    "--lr-warmup-steps", "0", "--report-to", "none", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_ltx, ltx_shards):
    out = tmp_path_factory.mktemp("ltx-train") / "out"
    summary = train(tiny_ltx, ltx_shards, out, "--train-steps", "20", "--lr", "3e-3", "--eval-batches", "2",
                    "--seed", "0", "--first-frame-conditioning-p", "0.5")
    return out, summary


def test_lora_training_lowers_the_fixed_noise_loss(trained):
    out, summary = trained
    assert summary["steps"] == 20
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and all(np.isfinite(r["loss"]) for r in log)
    assert json.loads((out / "train_config.json").read_text())["first_frame_conditioning_p"] == 0.5


def test_load_lora_weights_changes_the_ltx_pipelines_output(trained, tiny_ltx):
    from diffusers import LTXPipeline

    out, _ = trained
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)

    def render(pipe):
        return pipe(prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    pipe = LTXPipeline.from_pretrained(tiny_ltx)
    base = render(pipe)
    pipe.load_lora_weights(out)
    (adapter,) = pipe.get_active_adapters()
    assert (pipe.transformer.peft_config[adapter].r, pipe.transformer.peft_config[adapter].lora_alpha) == (8, 16)
    assert np.abs(render(pipe) - base).max() > 1e-3


def test_generate_with_the_lora_at_the_pipelines_frame_rate(trained, tiny_ltx, tmp_path):
    from ft.precompute.media import open_media

    out, _ = trained
    common = ["generate", "--model", "ltx", "--pretrained", tiny_ltx, *FP32, "--prompt", PROMPT,
              "--num-frames", "9", "--height", "32", "--width", "64", "--num-inference-steps", "2"]
    a = open_media(run_cli([*common, "--lora", out, "--out", tmp_path / "lora.mp4"]))
    b = open_media(run_cli([*common, "--out", tmp_path / "base.mp4"]))
    assert (a.num_frames, a.height, a.width, a.fps) == (9, 32, 64, 25.0)  # LTXPipeline's frame_rate
    assert not np.array_equal(a.read(list(range(9))), b.read(list(range(9))))


def test_full_finetune_saves_a_transformer_that_from_pretrained_loads(tiny_ltx, ltx_shards, tmp_path):
    from diffusers import LTXVideoTransformer3DModel

    train(tiny_ltx, ltx_shards, tmp_path, "--training-type", "full-finetune", "--rank", "64", "--lora-alpha", "64",
          "--train-steps", "2", "--lr", "1e-3")
    tuned = LTXVideoTransformer3DModel.from_pretrained(tmp_path / "transformer")
    base = LTXVideoTransformer3DModel.from_pretrained(tiny_ltx, subfolder="transformer")
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > len(tuned.state_dict()) // 2


def test_a_resumed_run_equals_a_straight_run(tiny_ltx, ltx_shards, tmp_path):
    extra = ["--seed", "7", "--lr", "2e-3", "--first-frame-conditioning-p", "0.5", "--checkpointing-steps", "2"]
    train(tiny_ltx, ltx_shards, tmp_path / "straight", "--train-steps", "4", *extra)
    train(tiny_ltx, ltx_shards, tmp_path / "resumed", "--train-steps", "2", *extra)
    train(tiny_ltx, ltx_shards, tmp_path / "resumed", "--train-steps", "4", "--resume-from-checkpoint", "latest",
          *extra)
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_custom_transformer_from_its_own_folder(tiny_ltx, ltx_shards, tmp_path):
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(1)
    LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                               attention_head_dim=8, cross_attention_dim=32, num_layers=2, caption_channels=32
                               ).save_pretrained(tmp_path / "my-finetune")
    summary = train(tiny_ltx, ltx_shards, tmp_path / "out", "--transformer-id", tmp_path / "my-finetune",
                    "--train-steps", "2")
    assert summary["steps"] == 2
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("transformer.transformer_blocks.1.") for k in weights)  # the 2-layer finetune's
    pipe = LTXPipeline.from_pretrained(tiny_ltx, transformer=LTXVideoTransformer3DModel.from_pretrained(
        tmp_path / "my-finetune"))
    pipe.load_lora_weights(tmp_path / "out")
    assert pipe.get_active_adapters()


def test_an_overridden_text_encoder_with_its_own_dtype(tiny_ltx, shapes_data, tmp_path):
    from transformers import T5EncoderModel

    torch.manual_seed(1)
    base = T5EncoderModel.from_pretrained(tiny_ltx, subfolder="text_encoder")
    T5EncoderModel(base.config).save_pretrained(tmp_path / "my-t5")
    out = tmp_path / "shards"
    run_cli(["precompute", "--model", "ltx_video", "--pretrained", tiny_ltx, *FP32, "--text-encoder-id",
             tmp_path / "my-t5", "--text-encoder-dtype", "bf16", "--dataset", shapes_data, "--out", out, *BUCKETS])
    manifest = Manifest.load(out)
    assert manifest.encoders["text_encoder"]["dtype"] == "bf16"
    assert manifest.encoders["vae"]["dtype"] == "fp32"
    sample = next(iter_shard(out / manifest.shards[0].name))
    assert sample.tensors["cond"]["prompt_embeds"].dtype == torch.bfloat16
    assert sample.tensors["latents"]["mean"].dtype == torch.float32


def test_demo_runs_on_the_tiny_ltx_video(tmp_path):
    from ft.cli.demo import run_demo

    summary = run_demo(tmp_path / "demo", steps=2, model="ltx-video")
    assert summary["steps"] == 2
    assert (tmp_path / "demo" / "sample.mp4").is_file()
    assert json.loads((tmp_path / "demo" / "model" / "model_index.json").read_text())["_class_name"] == "LTXPipeline"

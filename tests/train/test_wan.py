"""Wan's own training facts through the CLI on precomputed shards of the tiny model: which layers its LoRA takes,
Wan 2.2 TI2V-5B's layout end to end, FSDP2 over Wan's `blocks` in 2 processes, and ft generate refusing another
family's LoRA. Its LoRA run (the loss falls, the LoRA loads in WanPipeline, generate) is test_lora_families.py's,
its full finetune with a resume test_full_finetune_families.py's, `ft demo --model wan` tests/cli's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import BUCKETS, FP32, run_cli, torchrun, train, train_args, train_log

PROMPT = "a red circle moving left to right on a dark background"
# what this file's runs share besides the run's own flags
RUN = ["--batch-size", "2", "--lr-warmup-steps", "0", "--report-to", "none"]


def test_the_lora_takes_every_attention_projection_of_wans_blocks(lora_run):
    out, _ = lora_run("wan")
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.blocks.") for k in weights)
    layers = {k.split(".lora_")[0].split(".", 3)[-1] for k in weights}
    assert layers == {f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")}


def test_wan_2_2_ti2v_trains_and_generates_with_per_token_timesteps(tiny_wan_ti2v, shapes_data, tmp_path):
    """Wan 2.2 TI2V-5B's layout end to end: its 16x VAE's shards, a LoRA, and generation through a pipeline that
    keeps the model's expand_timesteps: ft generate's frames are diffusers' own from_pretrained pipeline's (to the
    uint8 rounding; the mp4 encoder is not compared)."""
    from diffusers import WanPipeline

    from ft.pipelines.registry import spec_for
    from ft.train.generate import GenerateConfig, generate_frames, load_pipeline_with_lora, resolve_size

    manifest = run_cli(["precompute", "--model", "wan2.2", "--pretrained", tiny_wan_ti2v, *FP32, "--dataset",
                        shapes_data, "--out", tmp_path / "shards", *BUCKETS, "--batch-size", "2"])
    assert manifest.shapes["latent_channels"] == 4 and manifest.encoders["vae"]["config"]["patch_size"] == 2
    summary = train("wan", tiny_wan_ti2v, tmp_path / "shards", tmp_path / "out", *RUN, "--rank", "4",
                    "--train-steps", "3", "--lr", "1e-3", "--seed", "0")
    assert summary["steps"] == 3 and np.isfinite(summary["last_loss"])
    size = ["--num-frames", "5", "--height", "32", "--width", "32", "--num-inference-steps", "2"]
    video = run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan_ti2v, *FP32, "--lora", tmp_path / "out",
                     "--prompt", PROMPT, *size, "--out", tmp_path / "ti2v.mp4"])
    assert video.is_file()
    cfg = GenerateConfig(model="wan", pretrained=str(tiny_wan_ti2v), transformer_dtype="fp32", vae_dtype="fp32",
                         text_encoder_dtype="fp32", lora=str(tmp_path / "out"), prompt=PROMPT, num_frames=5,
                         height=32, width=32, num_inference_steps=2)
    spec = spec_for(cfg)
    ours_pipe = load_pipeline_with_lora(spec, cfg, "cpu")
    assert ours_pipe.config.expand_timesteps
    ours = generate_frames(spec, cfg, ours_pipe, resolve_size(spec, cfg)).astype(np.float32) / 255
    pipe = WanPipeline.from_pretrained(tiny_wan_ti2v)
    pipe.load_lora_weights(tmp_path / "out")
    theirs = pipe(prompt=PROMPT, num_frames=5, height=32, width=32, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_fsdp2_over_wans_blocks_follows_the_one_process_run(tiny_wan, wan_shards, tmp_path):
    """2 processes sharding each of `blocks` (WanSpec.block_lists) train what 1 process does at the same samples
    per optimizer step (fp32; the tolerance of tests/train/test_distributed.py)."""
    flags = ["--rank", "4", "--lora-alpha", "8", "--train-steps", "4", "--lr", "3e-3", "--seed", "9"]
    one = train("wan", tiny_wan, wan_shards, tmp_path / "one", *RUN, *flags)
    done = torchrun(2, train_args("wan", tiny_wan, wan_shards, tmp_path / "two", *RUN, "--batch-size", "1",
                                  "--dp-shards", "2", *flags))
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [[r["loss"] for r in train_log(tmp_path / run)] for run in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert one["steps"] == 4
    a = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    # Adam turns a gradient's rounding noise into steps of its own size (test_distributed.py's docstring): measured,
    # the last block's cross-attention to_k LoRA B differs by 1.6e-5 of its 1.2e-2, every other tensor by < 1e-5
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)


def test_generate_refuses_a_lora_of_another_family(lora_run, tiny_wan, tmp_path):
    """A CogVideoX run's --lora given to `ft generate --model wan`: refused by its train_config.json's family, and
    without that file by what peft says when the weights' modules are not in the Wan transformer (before: peft's
    NoMatchingPeftModuleError traceback)."""
    import shutil

    from safetensors.torch import save_file

    from ft.common.errors import UserError

    out, _ = lora_run("wan")
    common = ["generate", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--prompt", PROMPT, "--num-frames", "9",
              "--height", "32", "--width", "32", "--num-inference-steps", "2", "--out", tmp_path / "x.mp4"]
    other = tmp_path / "cog-run"
    (other / "checkpoints" / "checkpoint-000002").mkdir(parents=True)
    shutil.copy(out / "pytorch_lora_weights.safetensors", other / "checkpoints" / "checkpoint-000002")
    config = json.loads((out / "train_config.json").read_text())
    (other / "train_config.json").write_text(json.dumps({**config, "model": "CogVideoX"}))
    with pytest.raises(UserError, match=r"trained for --model cogvideox .*not wan"):
        run_cli([*common, "--lora", other / "checkpoints" / "checkpoint-000002"])
    alone = tmp_path / "alone"
    alone.mkdir()
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    save_file({k.replace(".blocks.", ".transformer_blocks."): v for k, v in weights.items()},
              alone / "pytorch_lora_weights.safetensors")
    with pytest.raises(UserError, match=r"--lora .*alone/pytorch_lora_weights.safetensors: in the diffusers layout, "
                                        r"\d+ of its modules are not in this Wan transformer .*another model"):
        run_cli([*common, "--lora", alone])
    assert run_cli([*common, "--lora", out]) is not None

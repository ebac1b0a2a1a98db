"""Wan through the CLI on precomputed shards of the tiny model: LoRA (loss falls), full finetune with a bitwise
resume, FSDP2 over Wan's `blocks` in 2 processes, generation; what was trained loads in diffusers' WanPipeline;
Wan 2.2 TI2V-5B's layout; `ft demo --model wan`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import FP32, run_cli, torchrun

PROMPT = "a red circle moving left to right on a dark background"


def train(model, shards, out, *extra):
    return run_cli(["train", "--model", "wan", "--pretrained", model, *FP32, "--shards", shards, "--output-dir", out,
                    "--batch-size", "2", "--lr-warmup-steps", "0", "--report-to", "none", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_wan, wan_shards):
    out = tmp_path_factory.mktemp("train-wan") / "out"
    summary = train(tiny_wan, wan_shards, out, "--rank", "8", "--lora-alpha", "16", "--train-steps", "30",
                    "--lr", "3e-3", "--eval-batches", "4", "--seed", "0")
    return out, summary


def test_lora_training_lowers_the_loss(trained):
    out, summary = trained
    assert summary["steps"] == 30
    assert summary["eval_loss_after"] < 0.95 * summary["eval_loss_before"], summary
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and all(np.isfinite(r["loss"]) for r in log)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.blocks.") for k in weights)
    layers = {k.split(".lora_")[0].split(".", 3)[-1] for k in weights}
    assert layers == {f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")}


def test_load_lora_weights_changes_the_pipelines_output(trained, tiny_wan):
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    out, _ = trained

    def render(pipe):  # the pipeline's own prompt encoding and scheduler
        return pipe(prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    pipe = WanPipeline.from_pretrained(tiny_wan)
    base = render(pipe)
    pipe.load_lora_weights(out)
    (adapter,) = pipe.get_active_adapters()
    assert (pipe.transformer.peft_config[adapter].r, pipe.transformer.peft_config[adapter].lora_alpha) == (8, 16)
    held = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(held) == len(saved)  # every trained weight arrived: nothing dropped with a warning
    assert all(torch.equal(held[k.removeprefix("transformer.")], v) for k, v in saved.items())
    assert np.abs(render(pipe) - base).max() > 1e-3


def test_generate_with_and_without_the_lora(trained, tiny_wan, tmp_path):
    from ft.precompute.media import open_media

    out, _ = trained
    common = ["generate", "--model", "wan2.1", "--pretrained", tiny_wan, *FP32, "--prompt", PROMPT,
              "--num-frames", "9", "--height", "32", "--width", "64", "--num-inference-steps", "2"]
    a = open_media(run_cli([*common, "--lora", out, "--out", tmp_path / "lora.mp4"]))
    b = open_media(run_cli([*common, "--out", tmp_path / "base.mp4"]))
    assert (a.num_frames, a.height, a.width, a.fps) == (9, 32, 64, 16.0)
    assert not np.array_equal(a.read(list(range(9))), b.read(list(range(9))))


def test_full_finetune_loads_with_from_pretrained_and_a_resumed_run_equals_a_straight_one(tiny_wan, wan_shards,
                                                                                         tmp_path):
    from diffusers import WanTransformer3DModel

    flags = ["--training-type", "full-finetune", "--train-steps", "4", "--checkpointing-steps", "2", "--lr", "1e-3",
             "--seed", "3", "--flow-weighting-scheme", "logit_normal"]
    straight = train(tiny_wan, wan_shards, tmp_path / "straight", *flags)
    resumed = train(tiny_wan, wan_shards, tmp_path / "resumed", *flags, "--resume-from-checkpoint",
                    tmp_path / "straight" / "checkpoints" / "checkpoint-000002")
    assert straight["steps"] == resumed["steps"] == 4
    a = WanTransformer3DModel.from_pretrained(tmp_path / "straight" / "transformer").state_dict()
    b = WanTransformer3DModel.from_pretrained(tmp_path / "resumed" / "transformer").state_dict()
    base = WanTransformer3DModel.from_pretrained(tiny_wan, subfolder="transformer").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert sum(not torch.equal(a[k], base[k]) for k in a) > len(a) // 2
    video = run_cli(["generate", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--transformer-id",
                     tmp_path / "straight" / "transformer", "--prompt", PROMPT, "--num-frames", "1", "--height", "32",
                     "--width", "32", "--num-inference-steps", "1", "--out", tmp_path / "ft.mp4"])
    assert video.is_file()


def test_wan_2_2_ti2v_trains_and_generates_with_per_token_timesteps(tiny_wan_ti2v, shapes_data, tmp_path):
    """Wan 2.2 TI2V-5B's layout end to end: its 16x VAE's shards, a LoRA, and generation through a pipeline that
    keeps the model's expand_timesteps: ft generate's frames are diffusers' own from_pretrained pipeline's (to the
    uint8 rounding; the mp4 encoder is not compared)."""
    from diffusers import WanPipeline

    from ft.pipelines.registry import spec_for
    from ft.train.generate import GenerateConfig, generate_frames, load_pipeline_with_lora, resolve_size
    from helpers import BUCKETS

    manifest = run_cli(["precompute", "--model", "wan2.2", "--pretrained", tiny_wan_ti2v, *FP32, "--dataset",
                        shapes_data, "--out", tmp_path / "shards", *BUCKETS, "--batch-size", "2"])
    assert manifest.shapes["latent_channels"] == 4 and manifest.encoders["vae"]["config"]["patch_size"] == 2
    summary = train(tiny_wan_ti2v, tmp_path / "shards", tmp_path / "out", "--rank", "4", "--train-steps", "3",
                    "--lr", "1e-3", "--seed", "0")
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


def test_demo_runs_on_the_tiny_wan(tmp_path):
    from ft.cli.demo import run_demo

    summary = run_demo(tmp_path / "demo", steps=2, model="wan")
    assert summary["steps"] == 2
    assert (tmp_path / "demo" / "sample.mp4").is_file()
    assert json.loads((tmp_path / "demo" / "model" / "model_index.json").read_text())["_class_name"] == "WanPipeline"


@pytest.mark.slow
def test_fsdp2_over_wans_blocks_follows_the_one_process_run(tiny_wan, wan_shards, tmp_path):
    """2 processes sharding each of `blocks` (WanSpec.block_lists) train what 1 process does at the same samples
    per optimizer step (fp32; the tolerance of tests/train/test_distributed.py)."""
    flags = ["--rank", "4", "--lora-alpha", "8", "--train-steps", "4", "--lr", "3e-3", "--seed", "9"]
    one = train(tiny_wan, wan_shards, tmp_path / "one", *flags)
    argv = ["train", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--shards", wan_shards, "--output-dir",
            tmp_path / "two", "--batch-size", "1", "--lr-warmup-steps", "0", "--report-to", "none", "--dp-shards", "2",
            *flags]
    done = torchrun(2, argv)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line)["loss"] for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert log == pytest.approx([json.loads(line)["loss"] for line in (tmp_path / "one" / "train_log.jsonl"
                                                                       ).read_text().splitlines()], rel=1e-5)
    assert one["steps"] == 4
    a = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    # Adam turns a gradient's rounding noise into steps of its own size (test_distributed.py's docstring): measured,
    # the last block's cross-attention to_k LoRA B differs by 1.6e-5 of its 1.2e-2, every other tensor by < 1e-5
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)


def test_generate_refuses_a_lora_of_another_family(trained, tiny_wan, tmp_path):
    """A CogVideoX run's --lora given to `ft generate --model wan`: refused by its train_config.json's family, and
    without that file by what peft says when the weights' modules are not in the Wan transformer (before: peft's
    NoMatchingPeftModuleError traceback)."""
    import shutil

    from safetensors.torch import save_file

    from ft.common.errors import UserError

    out, _ = trained
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
    with pytest.raises(UserError, match=r"--lora .*alone: these LoRA weights do not fit this Wan transformer"):
        run_cli([*common, "--lora", alone])
    assert run_cli([*common, "--lora", out]) is not None

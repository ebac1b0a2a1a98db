"""fp8 storage of the frozen base (--layerwise-upcasting-modules transformer): the cast layers hold 1 byte per
weight, the adapters stay fp32, a run trains, and its LoRA loads into the bf16 base in diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from helpers import FP32, run_cli

FP8 = ["--layerwise-upcasting-modules", "transformer"]
BF16 = ["--transformer-dtype", "bf16", "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32"]


def lora_transformer(tiny_cog, *extra):
    from ft.pipelines.registry import spec_for
    from ft.train.config import TrainConfig
    from ft.train.trainable import make_trainable

    cfg = TrainConfig(model="cogvideox", pretrained=str(tiny_cog), shards=["x"], output_dir="x", rank=4,
                      transformer_dtype="bf16", **dict(extra))
    spec = spec_for(cfg)
    transformer = spec.load_component("transformer", cfg, "cpu")
    make_trainable(cfg, spec, transformer)
    return transformer


def test_cast_layers_hold_one_byte_per_weight_and_the_adapters_fp32(tiny_cog):
    from ft.train.fp8 import fp8_bytes

    base = lora_transformer(tiny_cog)
    fp8 = lora_transformer(tiny_cog, ("layerwise_upcasting_modules", ["transformer"]))
    dtypes = {n: p.dtype for n, p in fp8.named_parameters()}
    for name, dtype in dtypes.items():
        if "lora_" in name:
            assert dtype == torch.float32, name
        elif any(k in name for k in ("norm", "patch_embed", "time_embed", "proj_out")):
            assert dtype == torch.bfloat16, name  # finetrainers' default skip patterns
        elif name.endswith(".weight") and (".ff." in name or ".base_layer." in name):
            assert dtype == torch.float8_e4m3fn, name
    assert dtypes["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    before, after = fp8_bytes(base), fp8_bytes(fp8)
    assert after["float8_e4m3fn"] > 0 and after["float32"] == before["float32"]  # the same fp32 adapters
    assert sum(after.values()) < sum(before.values())
    # the forward computes in bf16 and the adapters get fp32 gradients
    x, e = torch.randn(1, 3, 4, 4, 4, dtype=torch.bfloat16), torch.randn(1, 16, 32, dtype=torch.bfloat16)
    out = fp8(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([500]), return_dict=False)[0]
    out.float().square().mean().backward()
    grads = [p.grad for p in fp8.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert dtypes == {n: p.dtype for n, p in fp8.named_parameters()}  # back in fp8 after the forward
    e5m2 = lora_transformer(tiny_cog, ("layerwise_upcasting_modules", ["transformer"]),
                            ("layerwise_upcasting_storage_dtype", "float8_e5m2"),
                            ("layerwise_upcasting_skip_modules_pattern", ["norm", "ff"]))
    kinds = {n: p.dtype for n, p in e5m2.named_parameters()}
    assert kinds["transformer_blocks.0.ff.net.2.weight"] == torch.bfloat16  # the user's pattern replaces the default
    assert kinds["patch_embed.proj.weight"] == torch.float8_e5m2


def test_a_run_with_fp8_storage_trains_and_its_lora_loads_into_the_bf16_base(tiny_cog, cog_shards, tmp_path):
    from diffusers import CogVideoXPipeline

    out = tmp_path / "out"
    summary = run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, *BF16, *FP8, "--shards",
                       cog_shards, "--output-dir", out, "--rank", "8", "--lora-alpha", "16", "--batch-size", "2",
                       "--lr-warmup-steps", "0", "--train-steps", "30", "--lr", "3e-3", "--eval-batches", "4",
                       "--seed", "0", "--report-to", "none"])
    assert summary["eval_loss_after"] < 0.95 * summary["eval_loss_before"], summary
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(v.dtype == torch.float32 for v in weights.values())

    def render(pipe):
        return pipe(prompt="a red circle", num_frames=9, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16).frames[0]

    pipe = CogVideoXPipeline.from_pretrained(tiny_cog, torch_dtype=torch.bfloat16)
    base = render(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(render(pipe).astype(np.float32) - base.astype(np.float32)).max() > 1e-3


@pytest.mark.parametrize("extra, match", [
    (["--training-type", "full-finetune"], "optimizer cannot update weights stored in fp8"),
    (["--layerwise-upcasting-storage-dtype", "float8_e3m4"], "float8_e4m3fn or float8_e5m2"),
])
def test_refused_before_any_weight_loads(extra, match, tmp_path):
    with pytest.raises(UserError, match=match):
        run_cli(["train", "--model", "cogvideox", "--pretrained", tmp_path / "absent", *FP32, *FP8, "--shards",
                 tmp_path, "--output-dir", tmp_path / "out", *extra])


@pytest.mark.slow
def test_several_processes_are_refused_with_the_reason(tiny_cog, cog_shards, tmp_path):
    """One launch, FSDP2 over 2 processes: the refusal is of the world size (trainer.check_run refuses any run of
    more than one process before the layout matters), so a DDP launch met the same line (it was a second launch)."""
    from helpers import torchrun, train_args

    argv = train_args("cogvideox", tiny_cog, cog_shards, tmp_path / "out", *FP8, "--batch-size", 1, "--dp-shards", 2)
    done = torchrun(2, argv)
    assert done.returncode != 0
    assert "trains in one process only" in done.stderr, done.stderr[-3000:]

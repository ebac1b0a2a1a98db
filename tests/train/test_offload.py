"""--offload-blocks on the CPU: the hooks swap each offloaded block's weights in for its forward and its backward's
recompute and point them back at the CPU master after, so training is exactly what it is without them (the GPU
side, streams and memory, is measured by bench/gpu.sh); what it cannot combine with is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from ft.common.errors import UserError
from helpers import FP32, run_cli

BF16 = ["--transformer-dtype", "bf16", "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32"]


def losses(model, shards, out, *extra):
    run_cli(["train", "--model", "cogvideox", "--pretrained", model, "--shards", shards, "--output-dir", out,
             "--rank", "4", "--lora-alpha", "4", "--batch-size", "2", "--lr-warmup-steps", "0", "--lr", "3e-3",
             "--train-steps", "5", "--seed", "0", "--report-to", "none", "--gradient-checkpointing", *extra])
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", [FP32, BF16 + ["--layerwise-upcasting-modules", "transformer"]],
                         ids=["fp32", "fp8-storage"])
def test_a_run_with_offloaded_blocks_trains_exactly_as_without(tiny_cog, cog_shards, tmp_path, dtype):
    plain = losses(tiny_cog, cog_shards, tmp_path / "plain", *dtype)
    for n in ("1", "2"):  # one of the two blocks, and both
        assert losses(tiny_cog, cog_shards, tmp_path / f"offload{n}", *dtype, "--offload-blocks", n) == plain


def test_offloading_spans_both_block_lists_of_hunyuan_video(tiny_hunyuan, hunyuan_shards, tmp_path):
    """HunyuanVideo runs its dual-stream blocks, then its single-stream ones (ModelSpec.block_lists): offloading
    the last of each list's order (1: the single-stream block; 2: both) trains exactly as without."""
    from helpers import HUNYUAN_FP32

    def run(out, *extra):
        run_cli(["train", "--model", "hunyuan_video", "--pretrained", tiny_hunyuan, *HUNYUAN_FP32, "--shards",
                 hunyuan_shards, "--output-dir", out, "--rank", "4", "--lora-alpha", "4", "--batch-size", "2",
                 "--lr-warmup-steps", "0", "--lr", "3e-3", "--train-steps", "3", "--seed", "0", "--report-to",
                 "none", "--gradient-checkpointing", *extra])
        return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]

    plain = run(tmp_path / "plain")
    assert run(tmp_path / "one", "--offload-blocks", "1") == plain
    assert run(tmp_path / "both", "--offload-blocks", "2") == plain


def tiny_lora_transformer(tiny_cog):
    from ft.pipelines.registry import spec_for
    from ft.train.config import TrainConfig
    from ft.train.trainable import make_trainable

    cfg = TrainConfig(model="cogvideox", pretrained=str(tiny_cog), shards=["x"], output_dir="x", rank=4,
                      transformer_dtype="fp32")
    spec = spec_for(cfg)
    transformer = spec.load_component("transformer", cfg, "cpu")
    torch.manual_seed(0)  # the same LoRA init
    make_trainable(cfg, spec, transformer)
    transformer.enable_gradient_checkpointing()
    return transformer


def step(transformer):
    transformer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    x, e = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 16, 32)
    out = transformer(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([500]), return_dict=False)[0]
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}


def test_the_hooks_swap_a_copy_in_for_each_pass_and_the_master_back(tiny_cog):
    from ft.train.offload import IN_FLIGHT, BlockOffloader

    reference = step(tiny_lora_transformer(tiny_cog))
    transformer = tiny_lora_transformer(tiny_cog)
    blocks = list(transformer.transformer_blocks)
    offloader = BlockOffloader(transformer, blocks, 2, "cpu")
    masters = {id(p): m.data_ptr() for pairs in offloader.masters.values() for p, m in pairs}
    assert masters and offloader.offloaded_bytes() > 0
    assert all(not p.requires_grad for pairs in offloader.masters.values() for p, _ in pairs)  # adapters stay
    seen, held = [], []
    blocks[0].attn1.to_q.register_forward_pre_hook(
        lambda m, a: seen.append(m.base_layer.weight.data_ptr() != masters[id(m.base_layer.weight)]))
    for block in blocks:
        block.register_forward_pre_hook(lambda m, a: held.append(len(offloader.on_device())))
    grads = step(transformer)
    assert grads.keys() == reference.keys()
    assert all(torch.equal(grads[k], reference[k]) for k in grads)
    assert seen == [True, True]  # the forward and the backward's recompute each computed with a copy
    assert offloader.loads >= 3  # block 0 twice; block 1 once (kept from its forward for the backward's recompute)
    assert held and max(held) <= IN_FLIGHT and len(offloader.on_device()) <= IN_FLIGHT
    grads = step(transformer)  # a second step, with what the first left prefetched
    assert all(torch.equal(grads[k], reference[k]) for k in grads)
    offloader._restore()
    off = [i for i, pairs in offloader.masters.items() if any(p.data_ptr() != m.data_ptr() for p, m in pairs)]
    assert not off  # the weights' home is the CPU master; only the copies in flight are elsewhere


def test_what_offloading_cannot_combine_with_is_refused(tiny_cog, cog_shards, tmp_path):
    from ft.train.config import TrainConfig

    base = dict(model="cogvideox", pretrained="m", shards=["s"], output_dir="o", offload_blocks=1)
    with pytest.raises(UserError, match="needs --gradient-checkpointing"):
        TrainConfig(**base)
    with pytest.raises(UserError, match="a full finetune updates every weight"):
        TrainConfig(**base, training_type="full-finetune", gradient_checkpointing=True)
    with pytest.raises(UserError, match="--offload-blocks must be 0"):
        TrainConfig(**{**base, "offload_blocks": -1})
    with pytest.raises(UserError, match="--offload-blocks 3: this transformer has 2 blocks"):
        losses(tiny_cog, cog_shards, tmp_path / "o", *FP32, "--offload-blocks", "3")

"""--activation-offload: each checkpointed block's saved input goes through torch's save_on_cpu, and training is
exactly what it is without it.

Bitwise on the CPU, and why that is not vacuous: there, save_on_cpu keeps a CPU tensor as it is (nothing to copy or
pin), so the numbers cannot change; what the tests check is that the mechanism is in the path: every block's call
packs its inputs through the offload hooks during the forward, the backward unpacks each of them, and what it
unpacks lives in CPU memory. On a GPU the same hooks copy to pinned memory (the test that says so skips without
CUDA; bench/gpu.sh measures the memory). The refusals are checked before any weight loads.
"""

from __future__ import annotations

import json

import pytest
import torch

from ft.common.errors import UserError
from helpers import FP32, run_cli, torchrun, train_args


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def run(model, shards, out, *extra):
    run_cli(["train", "--model", "cogvideox", "--pretrained", model, "--shards", shards, "--output-dir", out,
             "--rank", "4", "--lora-alpha", "4", "--batch-size", "2", "--lr-warmup-steps", "0", "--lr", "3e-3",
             "--train-steps", "4", "--seed", "0", "--report-to", "none", "--gradient-checkpointing", *FP32, *extra])
    return losses(out)


def tiny_transformer(tiny_cog, training_type="lora"):
    from ft.pipelines.registry import spec_for
    from ft.train.config import TrainConfig
    from ft.train.trainable import make_trainable

    lora = {"rank": 4} if training_type == "lora" else {}
    cfg = TrainConfig(model="cogvideox", pretrained=str(tiny_cog), shards=["x"], output_dir="x", **lora,
                      transformer_dtype="fp32", training_type=training_type)
    spec = spec_for(cfg)
    transformer = spec.load_component("transformer", cfg, "cpu")
    torch.manual_seed(0)  # the same LoRA init
    make_trainable(cfg, spec, transformer)
    return transformer


def step(transformer):
    transformer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    x, e = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 16, 32)
    out = transformer(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([500]), return_dict=False)[0]
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("training_type", ["lora", "full-finetune"])
def test_same_loss_and_gradients_and_every_block_input_goes_through_the_hooks(tiny_cog, training_type):
    from ft.train.activation_offload import enable

    plain = tiny_transformer(tiny_cog, training_type)
    assert enable(plain, "cpu", offload=False) is None
    loss, grads = step(plain)

    transformer = tiny_transformer(tiny_cog, training_type)
    offload = enable(transformer, "cpu", offload=True)
    blocks = list(transformer.transformer_blocks)
    inputs = []  # each block's tensor inputs, as its checkpointed call receives them
    for block in blocks:
        block.register_forward_pre_hook(lambda m, args, kw: inputs.append(
            [t for t in (*args, *kw.values()) if isinstance(t, torch.Tensor)]) if torch.is_grad_enabled()
            and not offload.unpacked else None, with_kwargs=True)
    offloaded_loss, offloaded_grads = step(transformer)

    assert torch.equal(offloaded_loss, loss)
    assert offloaded_grads.keys() == grads.keys() and len(grads) > 0
    assert all(torch.equal(offloaded_grads[k], grads[k]) for k in grads)
    # the forward packed exactly each block's tensor inputs (hidden states, text states, timestep embedding),
    # nothing the blocks compute (the checkpoint's own hooks take that), a tensor several blocks take (the timestep
    # embedding, the rotary tables) once, and the backward unpacked every save
    saved = [t for block_inputs in inputs[:len(blocks)] for t in block_inputs]
    distinct = list({(t.data_ptr(), t.shape, t.stride()): t for t in saved}.values())
    assert offload.packed == len(distinct) > 0 and offload.shared == len(saved) - len(distinct) > 0
    assert offload.packed_bytes == sum(t.numel() * t.element_size() for t in distinct)
    assert offload.unpacked == len(saved)
    assert offload.devices == {"cpu"}  # where the packed copies waited for the backward


def test_a_per_token_timestep_embedding_is_packed_once_not_once_per_block(tiny_wan_ti2v):
    """Wan 2.2 TI2V's per-token timestep gives each block a (B, S, 6, D) modulation tensor, 6x its hidden states:
    every block's checkpoint saves the same one, and it is packed once per micro-batch: the bytes packed exceed those
    of a per-sample timestep by that one tensor alone; loss and gradients are those without the offload."""
    from diffusers import WanTransformer3DModel

    from ft.train.activation_offload import enable

    def packed_and_step(per_token: bool, offload: bool = True):
        transformer = WanTransformer3DModel.from_pretrained(tiny_wan_ti2v, subfolder="transformer")
        found = enable(transformer, "cpu", offload=offload)
        torch.manual_seed(0)
        x, e = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 16, transformer.config.text_dim)
        timestep = torch.full((1, tokens), 500) if per_token else torch.tensor([500])
        out = transformer(hidden_states=x, encoder_hidden_states=e, timestep=timestep, return_dict=False)[0]
        loss = out.square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in transformer.parameters() if p.grad is not None]
        return found, loss.detach(), grads

    def transformer_width(folder):
        config = WanTransformer3DModel.load_config(folder, subfolder="transformer")
        return config["num_attention_heads"] * config["attention_head_dim"]

    tokens = 3 * 4 * 4  # frames x (8 / 2) x (8 / 2) patches
    per_sample, _, _ = packed_and_step(per_token=False)
    per_token, loss, grads = packed_and_step(per_token=True)
    _, plain_loss, plain_grads = packed_and_step(per_token=True, offload=False)
    blocks = per_token.packed + per_token.shared
    assert per_token.shared > 0 and per_token.unpacked == blocks
    # the per-token modulation (1, S, 6, D) in place of the per-sample one (1, 6, D), once, not once per block
    hidden = transformer_width(tiny_wan_ti2v)
    assert per_token.packed_bytes - per_sample.packed_bytes == (tokens - 1) * 6 * hidden * 4
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_on_a_gpu_the_saved_inputs_wait_for_the_backward_in_pinned_cpu_memory(tiny_cog):
    from ft.train.activation_offload import enable

    def held_after_forward(offload):
        transformer = tiny_transformer(tiny_cog).cuda()
        found = enable(transformer, "cuda", offload=offload)
        torch.manual_seed(0)
        x, e = torch.randn(1, 3, 4, 4, 4, device="cuda"), torch.randn(1, 16, 32, device="cuda")
        before = torch.cuda.memory_allocated()
        out = transformer(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([500], device="cuda"),
                          return_dict=False)[0]
        held = torch.cuda.memory_allocated() - before
        out.square().mean().backward()
        return held, found

    plain, _ = held_after_forward(False)
    offloaded, offload = held_after_forward(True)
    assert offload.devices == {"cpu (pinned)"} and offload.unpacked == offload.packed + offload.shared
    assert offloaded < plain  # the blocks' inputs left the GPU for pinned CPU memory


def test_a_run_with_activation_offload_trains_exactly_as_without(tiny_cog, cog_shards, tmp_path, caplog):
    plain = run(tiny_cog, cog_shards, tmp_path / "plain")
    with caplog.at_level("INFO", logger="ft"):
        assert run(tiny_cog, cog_shards, tmp_path / "offload", "--activation-offload") == plain
    assert "--activation-offload:" in caplog.text and "kept in cpu memory" in caplog.text


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "ltx_video"])
def test_every_family_trains_exactly_as_without(tiny_model, family_shards, tmp_path, family):
    """Wan (its rotary tables a tuple, which checkpointing keeps as it is: only tensors are packed), HunyuanVideo
    (two block lists, dual- and single-stream) and LTX-Video: the same losses with the offload as without."""
    from helpers import train, train_log

    flags = ["--rank", "4", "--lora-alpha", "4", "--batch-size", "2", "--lr-warmup-steps", "0", "--lr", "3e-3",
             "--train-steps", "2", "--seed", "0", "--report-to", "none", "--gradient-checkpointing"]
    model, shards = tiny_model(family), family_shards(family)
    train(family, model, shards, tmp_path / "plain", *flags)
    train(family, model, shards, tmp_path / "offload", *flags, "--activation-offload")
    assert [r["loss"] for r in train_log(tmp_path / "offload")] == [r["loss"] for r in train_log(tmp_path / "plain")]


@pytest.mark.parametrize("extra", [
    ["--offload-blocks", "1"],
    ["--transformer-dtype", "bf16", "--layerwise-upcasting-modules", "transformer"],
    ["--training-type", "full-finetune"],
    ["--compile-modules", "transformer", "--compile-backend", "aot_eager"],
], ids=["offload-blocks", "fp8-storage", "full-finetune", "compiled-blocks"])
def test_it_combines_with_what_a_checkpointed_run_takes(tiny_cog, cog_shards, tmp_path, extra):
    if "full-finetune" in extra:
        extra = [*extra]  # a full finetune takes no --rank/--lora-alpha: run it with its own flags
        argv = ["train", "--model", "cogvideox", "--pretrained", tiny_cog, "--shards", cog_shards, "--batch-size",
                "2", "--lr-warmup-steps", "0", "--lr", "1e-4", "--train-steps", "3", "--seed", "0", "--report-to",
                "none", "--gradient-checkpointing", *FP32, *extra]
        run_cli([*argv, "--output-dir", tmp_path / "plain"])
        run_cli([*argv, "--output-dir", tmp_path / "offload", "--activation-offload"])
        assert losses(tmp_path / "offload") == losses(tmp_path / "plain")
        return
    assert run(tiny_cog, cog_shards, tmp_path / "offload", *extra, "--activation-offload") == run(
        tiny_cog, cog_shards, tmp_path / "plain", *extra)


def test_without_gradient_checkpointing_it_is_refused_with_the_flag_to_add():
    from ft.train.config import TrainConfig

    with pytest.raises(UserError, match="--activation-offload needs --gradient-checkpointing.*Add "
                                        "--gradient-checkpointing"):
        TrainConfig(model="cogvideox", pretrained="m", shards=["s"], output_dir="o", activation_offload=True)
    TrainConfig(model="cogvideox", pretrained="m", shards=["s"], output_dir="o", activation_offload=True,
                gradient_checkpointing=True)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--dp-degree", "2"], ["--dp-shards", "2"]], ids=["ddp", "fsdp2"])
def test_two_processes_with_activation_offload_train_as_without(tiny_cog, cog_shards, tmp_path, layout):
    """Under torchrun (gloo, 2 processes) the offload changes nothing either: the same layout with and without
    it gives the same losses, bitwise (the same processes, the same sums; only where the saved inputs wait)."""
    common = ["--rank", "4", "--lora-alpha", "4", "--batch-size", "1", "--lr-warmup-steps", "0", "--lr", "3e-3",
              "--train-steps", "3", "--seed", "0", "--report-to", "none", "--gradient-checkpointing", *layout]
    for name, extra in (("plain", []), ("offload", ["--activation-offload"])):
        done = torchrun(2, train_args("cogvideox", tiny_cog, cog_shards, tmp_path / name, *common, *extra))
        assert done.returncode == 0, done.stderr[-3000:]
    assert "--activation-offload:" in done.stderr + done.stdout
    assert losses(tmp_path / "offload") == losses(tmp_path / "plain")

"""Compiled blocks (--compile-modules transformer, regional scope) on the CPU (inductor, gcc): the compiled run's
losses equal the eager run's, a new bucket shape recompiles each block at most once (dynamo's counters, as
train_log.jsonl records them), and the first step's compile time is logged apart from the steady s/step."""

from __future__ import annotations

import pytest

from helpers import torchrun, train, train_args, train_log

# fp32 on the CPU: inductor fuses and reorders the elementwise ops, so the sums differ in the last bits only
LOSS_RTOL = 1e-4
BLOCKS = 2  # the tiny CogVideoX's transformer blocks


# what this file's runs share besides the run's own flags
RUN = ["--rank", "4", "--lora-alpha", "4", "--batch-size", "1", "--lr-warmup-steps", "0", "--lr", "1e-3",
       "--train-steps", "6", "--seed", "0", "--report-to", "none", "--gradient-checkpointing"]


@pytest.mark.slow  # about 90 s on 2 cores with a cold inductor cache (gcc compiles each kernel), ~15 s warm
def test_a_compiled_run_trains_as_the_eager_one_and_recompiles_each_block_once_per_new_shape(tiny_cog, cog_shards,
                                                                                              tmp_path):
    train("cogvideox", tiny_cog, cog_shards, tmp_path / "eager", *RUN)
    summary = train("cogvideox", tiny_cog, cog_shards, tmp_path / "compiled", *RUN, "--compile-modules", "transformer")
    eager, compiled = train_log(tmp_path / "eager"), train_log(tmp_path / "compiled")
    assert [r["bucket"] for r in compiled] == [r["bucket"] for r in eager]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=LOSS_RTOL)
    assert "graphs_compiled" not in eager[0]
    # the first step compiles every block; a step on a shape not seen before recompiles at most each block once
    # (the changed dimensions go dynamic), and no step compiles more than that
    assert compiled[0]["graphs_compiled"] >= 1 and compiled[0]["compile_seconds"] > 0
    seen, graphs = set(), 0
    for r in compiled:
        new_shape = r["bucket"] not in seen
        seen.add(r["bucket"])
        graphs += r.get("graphs_compiled", 0)
        assert r.get("graphs_compiled", 0) <= (BLOCKS if new_shape else 0), (r, compiled)
    assert len(seen) >= 2, "the run should meet two bucket shapes"
    assert summary["graphs_compiled"] == graphs <= 2 * BLOCKS
    assert summary["compile_seconds"] > 0 and summary["first_step_seconds"] >= compiled[0]["compile_seconds"]
    assert summary["steady_seconds_per_step"] < summary["first_step_seconds"]


@pytest.fixture(scope="module")
def eager_two_per_step(tiny_cog, cog_shards, tmp_path_factory):
    """One eager process at 2 samples per optimizer step: the run both layouts below are compared with."""
    out = tmp_path_factory.mktemp("compile") / "eager"
    train("cogvideox", tiny_cog, cog_shards, out, *RUN, "--batch-size", "2")
    return out


@pytest.mark.slow  # two torchrun processes; aot_eager (the graph capture, not inductor's code generation, which the
# one-process test covers): inductor made this about 2 minutes a layout on 2 cores
@pytest.mark.parametrize("layout", [["--dp-shards", "2"], ["--dp-degree", "2"]], ids=["fsdp2", "ddp"])
def test_regional_compile_after_wrapping_trains_as_the_eager_run(tiny_cog, cog_shards, eager_two_per_step, tmp_path,
                                                                layout):
    """FSDP2 x2 (fully_shard per block, then each block compiled, as torchtitan orders them) and DDP x2
    (replicate, then compile) against one eager process at the same samples per optimizer step: the losses agree
    within the compile tolerance."""
    out = tmp_path / "fsdp"
    result = torchrun(2, train_args("cogvideox", tiny_cog, cog_shards, out, *RUN, *layout, "--compile-modules",
                                    "transformer", "--compile-backend", "aot_eager"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled, eager = train_log(out), train_log(eager_two_per_step)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=LOSS_RTOL)
    assert compiled[0]["graphs_compiled"] >= 1


def test_compiled_blocks_compose_with_fp8_storage_offloading_and_checkpointing(tiny_cog):
    """Graph capture with autograd (aot_eager: no code generation, so it is quick here) of LoRA blocks whose base
    is stored in fp8, the last one offloaded, under gradient checkpointing: the loss and the adapters' gradients
    are the eager ones. Without eager_casting, checkpointing's recompute meets the fp8 weight (CheckpointError)."""
    import torch

    from ft.pipelines.registry import spec_for
    from ft.train.compile import apply_compile
    from ft.train.config import TrainConfig
    from ft.train.offload import BlockOffloader
    from ft.train.trainable import make_trainable

    def build():
        cfg = TrainConfig(model="cogvideox", pretrained=str(tiny_cog), shards=["x"], output_dir="x", rank=4,
                          transformer_dtype="bf16", layerwise_upcasting_modules=["transformer"])
        spec = spec_for(cfg)
        transformer = spec.load_component("transformer", cfg, "cpu")
        torch.manual_seed(0)
        make_trainable(cfg, spec, transformer)
        transformer.enable_gradient_checkpointing()
        BlockOffloader(transformer, list(transformer.transformer_blocks), 1, "cpu")
        return transformer

    def step(transformer):
        transformer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        x, e = torch.randn(1, 3, 4, 4, 4, dtype=torch.bfloat16), torch.randn(1, 16, 32, dtype=torch.bfloat16)
        out = transformer(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([500]), return_dict=False)
        loss = out[0].float().square().mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}

    eager = step(build())
    compiled = build()
    apply_compile(compiled, list(compiled.transformer_blocks), "regional", backend="aot_eager")
    for _ in range(2):
        loss, grads = step(compiled)
        assert loss == pytest.approx(eager[0], rel=1e-6)
        assert all(torch.allclose(grads[k], eager[1][k], rtol=1e-3, atol=1e-6) for k in grads)


def test_an_unknown_compile_backend_is_refused_before_any_model_loads():
    from ft.common.errors import UserError
    from ft.train.config import TrainConfig

    base = dict(model="cogvideox", pretrained="no-such-model", shards=["s"], output_dir="o",
                compile_modules=["transformer"])
    assert TrainConfig(**base, compile_backend="aot_eager").compile_backend == "aot_eager"
    with pytest.raises(UserError, match="--compile-backend 'nope' is not a torch.compile backend here; use one of: "
                                        ".*aot_eager"):
        TrainConfig(**base, compile_backend="nope")

"""Compiled blocks (--compile-modules transformer, regional scope) on the CPU (inductor, gcc): the compiled run's
losses equal the eager run's, a new bucket shape recompiles each block at most once (dynamo's counters, as
train_log.jsonl records them), and the first step's compile time is logged apart from the steady s/step."""

from __future__ import annotations

import json

import pytest

from helpers import FP32, run_cli

# fp32 on the CPU: inductor fuses and reorders the elementwise ops, so the sums differ in the last bits only
LOSS_RTOL = 1e-4
BLOCKS = 2  # the tiny CogVideoX's transformer blocks


def train(model, shards, out, *extra):
    summary = run_cli(["train", "--model", "cogvideox", "--pretrained", model, *FP32, "--shards", shards,
                       "--output-dir", out, "--rank", "4", "--lora-alpha", "4", "--batch-size", "1",
                       "--lr-warmup-steps", "0", "--lr", "1e-3", "--train-steps", "6", "--seed", "0",
                       "--report-to", "none", "--gradient-checkpointing", *extra])
    return summary, [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # about 90 s on 2 cores with a cold inductor cache (gcc compiles each kernel), ~15 s warm
def test_a_compiled_run_trains_as_the_eager_one_and_recompiles_each_block_once_per_new_shape(tiny_cog, cog_shards,
                                                                                              tmp_path):
    _, eager = train(tiny_cog, cog_shards, tmp_path / "eager")
    summary, compiled = train(tiny_cog, cog_shards, tmp_path / "compiled", "--compile-modules", "transformer")
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

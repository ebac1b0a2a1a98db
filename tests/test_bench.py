"""Smoke runs of the benchmark scripts at toy size: they run and print their table (numbers are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=BENCH.parent,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_loader_bench_prints_its_table():
    out = bench(str(BENCH / "loader.py"), "--samples", "3", "--bucket", "9x32x32", "--repeats", "1", "--no-save")
    assert "| `cat` shards > /dev/null (ceiling) |" in out and "of unverified ft" in out
    assert "ft iter_shard + xxh3-128 verify (first pass, now)" in out


def test_gpu_step_runs_every_row_of_the_tiny_model_on_the_cpu():
    out = bench(str(BENCH / "gpu_step.py"), "--tiny", "--device", "cpu", "--rows", "lora-bf16", "lora-fp8",
                "lora-fp8-offload24", "full-bf16", "lora-bf16-aoff")
    assert "waiting for data" in out and "| lora-bf16 | - |" in out
    assert "| lora-fp8 | --layerwise-upcasting-modules transformer |" in out
    assert "| lora-fp8-offload24 | --layerwise-upcasting-modules transformer --offload-blocks 1 |" in out
    assert "| full-bf16 | --training-type full-finetune |" in out
    assert "| lora-bf16-aoff | --activation-offload |" in out


def test_gpu_step_dry_run_resolves_the_offload_that_fits_24_gb_at_real_size():
    out = bench(str(BENCH / "gpu_step.py"), "--model", "ltx-video", "--pretrained", "Lightricks/LTX-Video",
                "--bucket", "49x512x768", "--samples", "1", "--dry-run", "--rows", "lora-fp8", "lora-fp8-offload24")
    assert "synthetic samples of 49x512x768" in out and "nothing trained" in out
    assert "lora-fp8: ft train --training-type lora --rank 128 --lora-alpha 128 --layerwise-upcasting-modules" in out
    assert "--offload-blocks" in out.split("lora-fp8-offload24:")[1] and "fits [24, 48, 80] GiB" in out


def test_gpu_step_measures_a_compiled_row_apart():
    # aot_eager: the compiled row's path without inductor's code generation (1-3 minutes on 2 cores, cold)
    out = bench(str(BENCH / "gpu_step.py"), "--tiny", "--device", "cpu", "--rows", "lora-bf16", "--compile-rows",
                "lora-bf16", "--compile-backend", "aot_eager")
    compiled = next(line for line in out.splitlines() if line.startswith("| lora-bf16 compiled |"))
    assert "--compile-modules transformer" in compiled and " s (" in compiled  # the first step's compile time


def test_gpu_sh_runs_name_real_checkpoints_buckets_and_rows():
    """Every row bench/gpu.sh runs on a GPU names a family, a checkpoint its spec knows offline, a bucket the
    family takes and rows gpu_step.py has: the parts `bash bench/gpu.sh --check` runs one by one (the tiny rows
    and the dry run above) then fit together. The whole --check takes minutes on 2 cores, so it is left to the
    machine that runs the benchmark."""
    import re

    sys.path.insert(0, str(BENCH))
    from gpu_step import ROWS, meta_config

    from ft.pipelines.registry import get_spec

    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0
    runs = re.findall(r'^  "([^"]+)"$', (BENCH / "gpu.sh").read_text(), flags=re.M)
    assert {r.split("|")[0] for r in runs} >= {"cogvideox", "ltx-video", "hunyuan_video", "wan"}
    for run in runs:
        model, pretrained, bucket, name, rows, compiled = run.split("|")
        spec = get_spec(model)
        ckpt = spec.find_checkpoint(pretrained)
        assert ckpt is not None, run
        frames, height, width = map(int, bucket.split("x"))
        assert set(rows.split()) <= set(ROWS) and set(compiled.split()) <= set(rows.split()), run
        assert name.startswith("gpu-"), run
        configs = {c: meta_config(*spec.component_classes[c], ckpt.configs[c]) for c in ("vae", "transformer")}
        assert spec.check_bucket((frames, height, width), configs["vae"], configs["transformer"]) is None, run


def test_train_step_bench_compares_shards_with_online_encoders():
    out = bench(str(BENCH / "train_step.py"), "--config", "tiny", "--steps", "2", "--rows", "encoders")
    assert "| shards (ft) |" in out and "| online encoders (all-in-one) |" in out and "ratio shards / online" in out


def test_precompute_bench_prints_its_table():
    out = bench(str(BENCH / "precompute.py"), "--config", "tiny", "--clips", "3", "--no-save")
    assert "| rerun, unchanged data |" in out and "| one caption changed |" in out and "clips/s" in out


def test_precompute_scale_bench_prints_its_table():
    out = bench(str(BENCH / "precompute_scale.py"), "--samples", "40,80", "--clips", "", "--no-save")
    assert "| synthetic samples (4 jobs) | write | merge (+ set index): wall / CPU |" in out
    assert "| growth 40 -> 80 (2x) |" in out
    assert "2 processes: wall / CPU" in out and "old set's first start" in out


@pytest.mark.slow
def test_train_step_bench_sets_ft_against_the_bare_step():
    out = bench(str(BENCH / "train_step.py"), "--config", "tiny", "--steps", "1", "--rows", "bare", "--no-save")
    assert "| 1 process |" in out and "| DDP x2 |" in out and "ft / bare" in out


@pytest.mark.slow
def test_dist_bench_measures_each_rank():
    out = bench(str(BENCH / "dist.py"), "--config", "tiny", "--layouts", "fsdp2", "--training", "lora", "--steps", "1",
                "--warmup", "0", "--no-save")
    assert "| LoRA r16 | FSDP2 x2 | 2 | 1 |" in out and "optimizer state" in out


@pytest.mark.slow
def test_dist_bench_sets_context_parallel_against_one_process():
    out = bench(str(BENCH / "dist.py"), "--cp", "--config", "tiny", "--steps", "1", "--warmup", "0", "--no-save")
    assert "| 9x32x32 | 12 + 16 | cp 2 Ulysses | 2 | 1 |" in out and "| cp 2 ring |" in out and "activations" in out


def test_train_startup_scale_bench_prints_its_table():
    out = bench(str(BENCH / "train_startup_scale.py"), "--samples", "1000", "--no-save")
    assert "| samples | data start-up: wall / CPU | + peak RSS |" in out and "| 1,000 |" in out


def test_precompute_scale_bench_plans_a_rerun_over_a_table():
    out = bench(str(BENCH / "precompute_scale.py"), "--samples", "", "--clips", "", "--planning", "30", "--no-save")
    row = [line for line in out.splitlines() if line.startswith("| 30 |")]
    assert "| planning rerun: items (10 clips) |" in out and row, out
    assert row[0].rstrip().endswith("| 20 |")  # 30 rows, the first 10 held by the first run: 20 to encode

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


def test_gpu_step_runs_the_tiny_model_on_the_cpu():
    out = bench(str(BENCH / "gpu_step.py"), "--tiny", "--device", "cpu")
    assert "| ft (measured) |" in out and "waiting for data" in out


def test_train_step_bench_compares_shards_with_online_encoders():
    out = bench(str(BENCH / "train_step.py"), "--config", "tiny", "--steps", "2", "--rows", "encoders")
    assert "| shards (ft) |" in out and "| online encoders (all-in-one) |" in out and "ratio shards / online" in out


def test_precompute_bench_prints_its_table():
    out = bench(str(BENCH / "precompute.py"), "--config", "tiny", "--clips", "3", "--no-save")
    assert "| rerun, unchanged data |" in out and "| one caption changed |" in out and "clips/s" in out


def test_precompute_scale_bench_prints_its_table():
    out = bench(str(BENCH / "precompute_scale.py"), "--samples", "40,80", "--clips", "", "--no-save")
    assert "| synthetic samples | manifest.json | all manifest writes |" in out and "| growth 2x samples |" in out


@pytest.mark.slow
def test_train_step_bench_sets_ft_against_the_bare_step():
    out = bench(str(BENCH / "train_step.py"), "--config", "tiny", "--steps", "1", "--rows", "bare", "--no-save")
    assert "| 1 process |" in out and "| DDP x2 |" in out and "ft / bare" in out


@pytest.mark.slow
def test_dist_bench_measures_each_rank():
    out = bench(str(BENCH / "dist.py"), "--config", "tiny", "--layouts", "fsdp2", "--training", "lora", "--steps", "1",
                "--warmup", "0", "--no-save")
    assert "| LoRA r16 | FSDP2 x2 | 2 | 1 |" in out and "optimizer state" in out

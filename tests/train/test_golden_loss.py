"""A golden loss curve: 20 steps of the tiny CogVideoX LoRA on fixed shards, compared with the kept numbers.

Anything that changes what training computes (the objective, latent scaling, noise or timestep draws, the data
order, LoRA init) moves this curve. When a change is meant to, regenerate the file with
`FT_UPDATE_GOLDEN=1 make test` and say why in the commit. The tolerance allows for CPU kernels summing in
another order, not for a different computation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import FP32, run_cli

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "golden_loss_cogvideox_lora.json"


def test_loss_curve_matches_the_golden_numbers(tiny_cog, cog_shards, tmp_path):
    run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--shards", cog_shards,
             "--output-dir", tmp_path, "--rank", "8", "--lora-alpha", "8", "--batch-size", "2", "--train-steps", "20",
             "--lr", "2e-3", "--lr-warmup-steps", "2", "--seed", "1234"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    if os.environ.get("FT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=1e-3)

"""Image-to-video under torchrun: for the I2V model of CogVideoX (1.5), LTX-Video and HunyuanVideo, a 2-process DDP
run follows the 1-process loss curve at the same samples per optimizer step (the image group of each sample, and its
draws, come with the sample, whatever rank reads it). Wan's is in test_wan_i2v.py."""

from __future__ import annotations

import numpy as np
import pytest

from ft.pipelines.registry import save_tiny_model
from helpers import FAMILIES, run_cli, torchrun, train, train_args, train_log

BUCKETS = ["--buckets", "9x32x32", "9x32x64"]  # HunyuanVideo-I2V's token_replace takes no 1-frame sample
RUN = ["--rank", "8", "--lora-alpha", "16", "--lr", "3e-3", "--lr-warmup-steps", "0", "--report-to", "none",
       "--seed", "0", "--train-steps", "3"]
VARIANTS = {"cogvideox:i2v-1.5": [], "ltx_video": ["--mode", "i2v"], "hunyuan_video:i2v": []}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_follow_the_one_process_i2v_curve(variant, shapes_data, tmp_path):
    family = variant.split(":")[0]
    model = save_tiny_model(variant, tmp_path / "model")
    _, dtypes, text = FAMILIES[family]
    manifest = run_cli(["precompute", "--model", family, "--pretrained", model, *dtypes, *text, "--dataset",
                        shapes_data, "--out", tmp_path / "shards", *BUCKETS, "--batch-size", "2", *VARIANTS[variant]])
    assert manifest.encoding["image"]
    train(family, model, tmp_path / "shards", tmp_path / "one", *RUN, "--batch-size", "2")
    proc = torchrun(2, train_args(family, model, tmp_path / "shards", tmp_path / "two", *RUN, "--batch-size", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r["loss"] for r in train_log(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in train_log(tmp_path / "two") if "loss" in r]
    assert len(one) == 3
    np.testing.assert_allclose(two, one, rtol=1e-5)

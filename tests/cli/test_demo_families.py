"""`ft demo --model X` on the other families' tiny models (test_cli.py runs CogVideoX's, the default, end to end):
it trains, writes the sample and saves the family's own diffusers pipeline."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("model,pipeline", [("ltx-video", "LTXPipeline"), ("wan", "WanPipeline"),
                                            ("cogvideox:i2v", "CogVideoXImageToVideoPipeline"),
                                            ("wan:i2v", "WanImageToVideoPipeline"),
                                            ("hunyuan_video:i2v", "HunyuanVideoImageToVideoPipeline"),
                                            ("hv15", "HunyuanVideo15Pipeline"),
                                            ("hunyuan_video_1_5:i2v", "HunyuanVideo15ImageToVideoPipeline")])
def test_demo_runs_on_the_familys_tiny_model(model, pipeline, tmp_path):
    from ft.cli.demo import run_demo

    summary = run_demo(tmp_path / "demo", steps=2, model=model)
    assert summary["steps"] == 2
    assert (tmp_path / "demo" / "sample.mp4").is_file()
    assert json.loads((tmp_path / "demo" / "model" / "model_index.json").read_text())["_class_name"] == pipeline


def test_the_two_expert_demo_trains_both_experts_one_after_the_other(tmp_path):
    from ft.cli.demo import run_demo

    summary = run_demo(tmp_path / "demo", steps=2, model="wan2.2-a14b")
    assert set(summary["experts"]) == {"high", "low"} and all(s["steps"] == 2 for s in summary["experts"].values())
    for expert in ("high", "low"):
        config = json.loads((tmp_path / "demo" / "out" / expert / "train_config.json").read_text())
        assert config["expert"] == expert
    index = json.loads((tmp_path / "demo" / "model" / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"][1] == "WanTransformer3DModel"
    assert (tmp_path / "demo" / "sample.mp4").is_file()

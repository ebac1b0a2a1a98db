"""`ft demo --model X` on the other families' tiny models (test_cli.py runs CogVideoX's, the default, end to end):
it trains, writes the sample and saves the family's own diffusers pipeline."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("model,pipeline", [("ltx-video", "LTXPipeline"), ("wan", "WanPipeline"),
                                            ("cogvideox:i2v", "CogVideoXImageToVideoPipeline")])
def test_demo_runs_on_the_familys_tiny_model(model, pipeline, tmp_path):
    from ft.cli.demo import run_demo

    summary = run_demo(tmp_path / "demo", steps=2, model=model)
    assert summary["steps"] == 2
    assert (tmp_path / "demo" / "sample.mp4").is_file()
    assert json.loads((tmp_path / "demo" / "model" / "model_index.json").read_text())["_class_name"] == pipeline

"""Validation in a tiny run of LTX-Video, HunyuanVideo, Wan and HunyuanVideo 1.5: prompts precomputed, videos at the
right steps with the row's frames and size, no text encoder or tokenizer built in training, and the weights of a run
without it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAMILIES, BuiltClasses, run_cli, train, train_log

# each family's validation row settings: true CFG exercises the stored negative prompt, HunyuanVideo's second
# transformer pass per step; Wan: classifier-free guidance with the stored empty prompt's embeddings, through
# WanPipeline's UniPC scheduler; HunyuanVideo 1.5: the row's scale in the pipeline's guider, the stored empty prompt
EXTRA = {"ltx_video": {"frame_rate": 12}, "hunyuan_video": {"true_cfg_scale": 3.0}, "wan": {"guidance_scale": 5.0},
         "hunyuan_video_1_5": {"guidance_scale": 3.0}}
FPS = {"ltx_video": 12, "hunyuan_video": 24.0, "wan": 16.0, "hunyuan_video_1_5": 24.0}


@pytest.fixture(params=sorted(EXTRA))
def family(request, tmp_path, tiny_model, family_shards):
    name = request.param
    _, dtypes, text = FAMILIES[name]
    model, shards, extra = tiny_model(name), family_shards(name), EXTRA[name]
    rows = [{"caption": "a red circle moving left", "num_inference_steps": 2, "num_frames": 5, "height": 32,
             "width": 64, **extra}, {"caption": "a dark street", "num_inference_steps": 2}]
    (tmp_path / "validation.json").write_text(json.dumps({"data": rows}))
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    config = json.loads((copy / "precompute_config.json").read_text())
    run_cli(["precompute", "--model", name, "--pretrained", model, *dtypes, *text, "--dataset", config["dataset"],
             "--out", copy, "--buckets", *config["buckets"], "--batch-size", "2",
             "--validation-dataset-file", tmp_path / "validation.json"])
    return name, model, copy, dtypes, tmp_path / "validation.json"


# what this file's runs share besides the run's own flags
RUN = ["--batch-size", "2", "--rank", "4", "--lr", "1e-3", "--lr-warmup-steps", "0", "--train-steps", "2", "--seed",
       "3"]


def test_a_tiny_run_validates_without_a_text_encoder(family, tmp_path):
    from ft.precompute.media import open_media

    name, model, shards, _, validation_file = family
    with BuiltClasses() as built:
        summary = train(name, model, shards, tmp_path / "out", *RUN, "--validation-dataset-file", validation_file,
                        "--validation-steps", "1")
    assert built == []
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001", "step-000002"]
    for step in ("step-000001", "step-000002"):
        videos = sorted((out / "validation" / step).glob("*.mp4"))
        sizes = [(m.num_frames, m.height, m.width) for m in map(open_media, videos)]
        assert sizes == [(5, 32, 64), (9, 32, 32)]  # the row's size; the shards' first video bucket
        assert (out / "validation" / step / "contact_sheet.png").is_file()
    files = next(r for r in train_log(out) if "validation" in r)["validation"]["videos"]
    assert files[0]["fps"] == FPS[name]

    plain = train(name, model, shards, tmp_path / "plain", *RUN)
    assert plain["last_loss"] == summary["last_loss"]
    a = load_file(out / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

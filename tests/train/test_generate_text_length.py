"""`ft generate`'s default text length is the one the weights were trained at, read from the shard set named in
the run's train_config.json. That file holds the paths as they were typed, relative to the folder `ft train` ran
in; `--output-dir` was typed relative to the same folder, so a relative shard path is found from wherever
`ft generate` runs."""

from __future__ import annotations

import json

from ft.common.shards.manifest import MANIFEST_NAME
from ft.pipelines.registry import get_spec
from ft.train.generate import GenerateConfig, text_length


def test_a_relative_shard_path_is_read_from_the_folder_training_ran_in(tiny_wan, wan_shards, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shards = project / "data" / "wan-64"
    shards.mkdir(parents=True)
    manifest = json.loads((wan_shards / MANIFEST_NAME).read_text())
    manifest["encoding"]["max_sequence_length"] = 64  # encoded at 64 tokens, not the model's 512
    (shards / MANIFEST_NAME).write_text(json.dumps(manifest))
    run = project / "runs" / "lora"
    run.mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"shards": ["data/wan-64"], "output_dir": "runs/lora"}))
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")

    spec = get_spec("wan")
    cfg = GenerateConfig(model="wan", pretrained=str(tiny_wan), prompt="x", lora=str(run))
    tconfig = spec.load_config("transformer", cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (project, elsewhere):  # where training ran, and another folder
        monkeypatch.chdir(cwd)
        assert text_length(spec, cfg, tconfig) == 64, cwd
    monkeypatch.chdir(elsewhere)  # a relative --lora too
    relative = GenerateConfig(model="wan", pretrained=str(tiny_wan), prompt="x", lora="../project/runs/lora")
    assert text_length(spec, relative, tconfig) == 64
    assert text_length(spec, GenerateConfig(model="wan", pretrained=str(tiny_wan), prompt="x"), tconfig) == 512

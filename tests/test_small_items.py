"""The smaller findings of issue 15, each fixed: the wandb project, trackers checked before models load,
check-data's help and flags, estimate's --model_name, flag hints, inspect on a parent of shard sets and its
cached count, LTX-Video generation sizes, symlinked media folders, two layouts in one folder, training.json
values of the wrong kind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ft.cli.inspect_shards import describe
from ft.cli.synthetic import shape_clip
from ft.common.errors import UserError
from ft.common.shards import load_manifest
from ft.pipelines.registry import SPECS
from ft.precompute.dataset_config import read_dataset_config
from ft.precompute.datasets import load_dataset
from ft.train.reporting import wandb_project
from ft.train.video_writer import write_video
from helpers import run_cli


def test_wandb_project_comes_from_tracker_name_then_wandb_project(monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert wandb_project({}) == "ft"
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    assert wandb_project({"tracker_name": None}) == "from-env"
    assert wandb_project({"tracker_name": "mine"}) == "mine"


def test_tracker_name_reaches_the_training_config(tmp_path):
    from ft.cli.finetrainers import translate
    from ft.cli.main import command_configs

    run = translate("train", ["--tracker_name", "my-project", "--shards", "s", "--output_dir", "o"], None,
                    command_configs()).runs[0]
    assert run[run.index("--tracker-name") + 1] == "my-project"


def test_a_missing_tracker_package_is_refused_before_any_model_loads(tmp_path):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    # the --pretrained folder does not exist: the tracker is refused first, so nothing was loaded
    with pytest.raises(UserError, match=r"--report-to wandb needs the wandb package: `pip install wandb`"):
        run_cli(["train", "--model", "cogvideox", "--pretrained", tmp_path / "nothing", "--shards", tmp_path,
                 "--output-dir", tmp_path / "o", "--report-to", "wandb"])


def test_check_data_help_lists_every_family():
    result = subprocess.run([sys.executable, "-m", "ft.cli.main", "check-data", "--help"], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    for name in SPECS:
        assert name in text, name


def test_check_data_takes_a_finetrainers_argument_list(shapes_data, tiny_cog, tmp_path):
    config = tmp_path / "training.json"
    config.write_text(json.dumps({"datasets": [{"data_root": str(shapes_data), "dataset_type": "video",
                                                "video_resolution_buckets": [[9, 32, 32], [9, 32, 64]]}]}))
    reports = run_cli(["check-data", "--model_name", "cogvideox", "--pretrained_model_name_or_path", tiny_cog,
                       "--dataset_config", config, "--rank", "8", "--lr", "1e-4", "--output_dir", tmp_path / "o"])
    assert reports["usable"] == 10 and reports["buckets"] == ["9x32x32", "9x32x64"]  # stills take 1-frame sizes


def test_estimate_takes_model_name():
    report = run_cli(["estimate", "--model_name", "cogvideox", "--pretrained_model_name_or_path",
                      "THUDM/CogVideoX-2b"])
    assert report is not None


@pytest.mark.parametrize(("flag", "hint"), [("--learning_rate", "--lr"), ("--max_train_steps", "--train-steps"),
                                            ("--train_batch_size", "--batch-size")])
def test_other_scripts_spellings_hint_the_ft_flag(flag, hint, tmp_path):
    with pytest.raises(UserError, match=rf"No such option: {flag} \(ft train\); did you mean {hint}\?"):
        run_cli(["train", "--shards", tmp_path, "--output-dir", tmp_path, flag, "1"])


def test_inspect_a_folder_of_shard_sets_and_an_incomplete_set(cog_shards, tmp_path):
    parent = tmp_path / "out"
    shutil.copytree(cog_shards, parent / "0-dissolve")
    shutil.copytree(cog_shards, parent / "1-pika")
    text = describe(str(parent))
    assert text.startswith(f"{parent} holds 2 shard sets (one per dataset of a --dataset_config): 0-dissolve, 1-pika")
    assert text.count("model family   cogvideox") == 2
    # an incomplete set: the dataset's view counts samples not encoded yet; never "-N more cached"
    incomplete = parent / "0-dissolve"
    manifest = load_manifest(incomplete)
    manifest.shards = manifest.shards[:1]  # as if killed after 4 samples: 6 of the dataset not encoded yet
    manifest.shards[0].samples = 4
    manifest.complete, manifest.missing = False, {"9x32x32": manifest.active["samples"] - 4}
    manifest.save(incomplete)
    line = next(ln for ln in describe(str(incomplete)).splitlines() if ln.startswith("training view"))
    assert f"({manifest.shards[0].samples} encoded so far)" in line and "more cached" not in line


def test_ltx_generate_refuses_a_size_its_pipeline_cannot_make_before_loading(tiny_ltx, tmp_path):
    with pytest.raises(UserError, match=r"LTXPipeline generates only heights and widths divisible by 32 .*not 32x48.*"
                                        r"the nearest it takes: height 32, width 64"):
        run_cli(["generate", "--model", "ltx_video", "--pretrained", tiny_ltx, "--prompt", "x", "--num-frames", "9",
                 "--height", "32", "--width", "48", "--out", tmp_path / "v.mp4"])


def test_symlinked_media_folders_are_read(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "clips"
    elsewhere.mkdir(parents=True)
    write_video(elsewhere / "a.mp4", shape_clip("square", "red", "left to right", 9, 32, 32))
    (elsewhere / "a.txt").write_text("a red square")
    data = tmp_path / "data"
    data.mkdir()
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # a cycle is not followed twice
    items = load_dataset(data)
    assert [i.path.name for i in items] == ["a.mp4"] and items[0].caption == "a red square"


def test_two_layouts_in_one_folder_say_which_is_read(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    write_video(data / "a.mp4", np.zeros((9, 32, 32, 3), np.uint8))
    (data / "videos.txt").write_text("a.mp4\n")
    (data / "prompts.txt").write_text("from the list files\n")
    (data / "metadata.csv").write_text("video,caption\na.mp4,from the table\n")
    logger = logging.getLogger("ft")
    logger.addHandler(caplog.handler)
    try:
        items = load_dataset(data)
    finally:
        logger.removeHandler(caplog.handler)
    assert items[0].caption == "from the list files"
    assert "holds two dataset layouts: reading videos.txt + prompts.txt, not metadata.csv" in caplog.text
    assert f"pass --dataset {data / 'metadata.csv'}" in caplog.text


@pytest.mark.parametrize(("extra", "message"), [
    ({"weight": float("nan")}, "weight must be a positive number, not nan"),
    ({"weight": True}, "weight must be a positive number"),
    ({"remove_common_llm_caption_prefixes": "false"}, "must be true or false .*not 'false'"),
    ({"id_token": ["a", "b"]}, "id_token must be a string .*not list"),
])
def test_training_json_values_of_the_wrong_kind_are_refused(tmp_path, extra, message):
    config = tmp_path / "training.json"
    config.write_text(json.dumps({"datasets": [{"data_root": str(tmp_path), "dataset_type": "video",
                                                "video_resolution_buckets": [[9, 32, 32]], **extra}]}))
    with pytest.raises(UserError, match=message):
        read_dataset_config(config)

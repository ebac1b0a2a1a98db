"""`ft run`: precompute then train in one process, from one argument list (cli/run_both.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ft.cli.run_both import stage_arguments, without_flag
from ft.common.errors import UserError
from helpers import BUCKETS, FP32, finish, run_cli, start

TRAIN = ["--rank", "4", "--lr", "3e-3", "--lr-warmup-steps", "0", "--train-steps", "3", "--seed", "0"]


def test_one_command_precomputes_trains_and_a_rerun_encodes_nothing(tmp_path, tiny_cog, shapes_data, caplog):
    argv = ["run", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", shapes_data,
            "--shards", tmp_path / "shards", *BUCKETS, "--output-dir", tmp_path / "out", *TRAIN]
    summary = run_cli(argv)
    assert summary["steps"] == 3
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["active"]["samples"] == 10
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    # the same command into a new output folder: the shards are reused as `ft precompute` reuses them
    argv[argv.index(tmp_path / "out")] = tmp_path / "out2"
    with caplog.at_level("INFO", logger="ft"):
        assert run_cli(argv)["steps"] == 3
    assert "nothing to encode" in caplog.text
    assert (tmp_path / "out2" / "pytorch_lora_weights.safetensors").is_file()


def test_the_shard_folder_reaches_both_stages(tmp_path):
    assert stage_arguments(["--shards", "s"]) == ["--shards", "s", "--out", "s"]
    assert stage_arguments(["--out", "s"]) == ["--out", "s", "--shards", "s"]
    assert stage_arguments(["--shards", "s:0.5"])[-2:] == ["--out", "s"]  # a mixing weight is train's alone
    assert stage_arguments(["--out", "s", "--shards", "./s"]) == ["--out", "s", "--shards", "./s"]
    config = tmp_path / "run.toml"
    config.write_text('shards = "from-file"\n')
    assert stage_arguments(["--config", str(config)])[-2:] == ["--out", "from-file"]


def test_the_batch_size_is_the_training_batch_only():
    assert without_flag(["--batch-size", "4", "--rank", "8", "--batch-size=2", "--lr", "1"], "--batch-size") == [
        "--rank", "8", "--lr", "1"]


@pytest.mark.parametrize("argv, message", [
    (["--out", "a", "--shards", "b"], "differ"),
    (["--shards", "a", "b"], "names 2 shard sets"),
    (["--dataset", "d"], "needs the shard folder: --shards DIR"),
])
def test_a_shard_folder_that_cannot_be_both_stages_is_refused(argv, message):
    with pytest.raises(UserError, match=message):
        stage_arguments(argv)


def test_under_torchrun_it_says_what_to_run_instead(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ft.cli.main", "run", "--shards", str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2
    assert "ft precompute" in result.stderr and "torchrun ... ft train" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def _run_argv(tmp_path, tiny_cog, shapes_data, *extra):
    return ["run", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", shapes_data,
            "--shards", tmp_path / "shards", *BUCKETS, "--output-dir", tmp_path / "out", *TRAIN, *extra]


@pytest.mark.parametrize("extra, message", [
    (["--lr", "abc"], "--lr"),  # a value the parser refuses: was a traceback, after precompute had run
    (["--optimizer", "nope"], "--optimizer 'nope' is not one of"),
    (["--lr-warmup-steps", "-5"], "--lr-warmup-steps must be >= 0"),
])
def test_a_bad_train_flag_is_refused_before_precompute_starts(tmp_path, tiny_cog, shapes_data, extra, message):
    with pytest.raises(UserError, match=message):
        run_cli(_run_argv(tmp_path, tiny_cog, shapes_data, *extra))
    assert not (tmp_path / "shards").exists()


def test_an_output_dir_with_an_earlier_run_is_refused_before_precompute_starts(tmp_path, tiny_cog, shapes_data):
    from ft.train.checkpoints import STATE_NAME

    (tmp_path / "out" / "checkpoints" / "checkpoint-000003").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "checkpoint-000003" / STATE_NAME).write_text("{}")
    with pytest.raises(UserError, match="--resume-from-checkpoint latest"):
        run_cli(_run_argv(tmp_path, tiny_cog, shapes_data))
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("point", ["started", "encoded"])  # before the first clip; after the last shard, unmerged
def test_ctrl_c_in_precompute_stops_ft_run_and_a_rerun_goes_on(tmp_path, tiny_cog, shapes_data, point):
    argv = [str(a) for a in _run_argv(tmp_path, tiny_cog, shapes_data)]
    # SIGINT as by default in the child (helpers.start): a test run started as a background job inherits it ignored
    code, err = finish(start(argv, FT_TEST_KILL_AT=point, FT_TEST_KILL_SIGNAL="INT"))
    assert code == 130, err[-2000:]
    assert "stage 2 of 2" not in err and not (tmp_path / "out").exists()
    assert run_cli(argv)["steps"] == 3  # the rerun keeps what was encoded and trains


def test_a_bad_world_size_is_an_error_not_a_traceback(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        run_cli(["run", "--shards", "s"])


def test_a_finetrainers_argument_list_is_told_to_add_the_shard_folder(tmp_path):
    with pytest.raises(UserError, match="needs the shard folder: --shards DIR"):
        stage_arguments(["--dataset_config", "training.json", "--output_dir", "out"])
    assert stage_arguments(["--dataset", "d", "--precomputation_dir", "pc"]) == [
        "--dataset", "d", "--precomputation_dir", "pc"]  # finetrainers' name for the folder: each stage reads it


def test_an_output_dir_that_cannot_be_made_is_refused_before_precompute_starts(tmp_path, tiny_cog, shapes_data):
    (tmp_path / "a-file").write_text("")
    argv = _run_argv(tmp_path, tiny_cog, shapes_data)
    argv[argv.index(tmp_path / "out")] = tmp_path / "a-file" / "out"
    with pytest.raises(UserError, match="--output-dir .*a-file/out: cannot make this folder"):
        run_cli(argv)
    assert not (tmp_path / "shards").exists()


def test_a_config_files_batch_size_is_the_training_batch_only(tmp_path):
    from ft.cli.run_both import precompute_arguments

    config = tmp_path / "run.toml"
    config.write_text('shards = "s"\nbatch-size = 4\n')
    assert precompute_arguments(["--config", str(config)])[-2:] == ["--batch-size", "1"]  # precompute's default
    assert precompute_arguments(["--batch-size", "4", "--rank", "8"]) == ["--rank", "8"]


def test_a_checkpoint_to_resume_that_is_not_there_is_refused_before_precompute(tmp_path, tiny_cog, shapes_data):
    with pytest.raises(UserError, match="--resume-from-checkpoint latest: .* holds no checkpoint"):
        run_cli(_run_argv(tmp_path, tiny_cog, shapes_data, "--resume-from-checkpoint", "latest"))
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("env, extra, message", [
    ({"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "0"}, [], "SLURM array"),
    ({}, ["--num-jobs", "2", "--job-index", "0"], "--num-jobs"),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}, [], "under torchrun"),  # a plain srun of 2 tasks
])
def test_one_job_of_several_is_refused_before_it_leaves_a_set_train_refuses(tmp_path, tiny_cog, shapes_data,
                                                                          monkeypatch, env, extra, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message):
        run_cli(_run_argv(tmp_path, tiny_cog, shapes_data, *extra))
    assert not (tmp_path / "shards").exists()


def test_a_config_file_before_the_command_name_is_read(tmp_path, tiny_cog, shapes_data):
    config = tmp_path / "run.toml"  # `ft --config FILE run` as `ft --config FILE train` works: the file is not dropped
    config.write_text(f'model = "cogvideox"\npretrained = "{tiny_cog}"\ndataset = "{shapes_data}"\n'
                      f'shards = "{tmp_path / "s"}"\noutput_dir = "{tmp_path / "out"}"\noptimizer = "nope"\n')
    with pytest.raises(UserError, match="--optimizer 'nope' is not one of"):
        run_cli(["--config", config, "run"])
    assert not (tmp_path / "s").exists()

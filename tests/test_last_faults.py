"""Issue 25's smaller faults, each made for real: wandb installed with no login, regex flags that do not compile,
flags that would do nothing, a 0-byte lock, advice for several processes, and the notes of short runs. That a flag's
note is said once under torchrun is checked on a run of tests/train/test_distributed.py (one launch fewer)."""

from __future__ import annotations

import pytest

from ft.common.errors import UserError
from helpers import FP32, run_cli


def train_argv(model, shards, out, *extra) -> list:
    return ["train", "--model", "cogvideox", "--pretrained", model, *FP32, "--shards", shards, "--output-dir", out,
            "--rank", "4", "--train-steps", "1", "--lr-warmup-steps", "0", *extra]


def test_wandb_without_a_login_is_refused_before_any_model_loads_and_offline_mode_trains(
        tiny_cog, cog_shards, tmp_path, monkeypatch):
    import wandb  # the dev extra installs it: the real package, with no key anywhere

    assert wandb.__version__
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    # --pretrained does not exist: the login is checked first, so nothing was loaded
    with pytest.raises(UserError) as error:
        run_cli(train_argv(tmp_path / "no-model", cog_shards, tmp_path / "out", "--report-to", "wandb"))
    message = str(error.value)
    assert message.startswith("--report-to wandb: no wandb login here (no WANDB_API_KEY, no api.wandb.ai entry in ")
    assert "Run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline" in message
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")  # the fix the message names: the run logs to files
    summary = run_cli(train_argv(tiny_cog, cog_shards, tmp_path / "out", "--report-to", "wandb"))
    assert summary["steps"] == 1 and list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_every_regex_flag_is_compiled_when_the_flags_are_parsed(tmp_path):
    # --pretrained does not exist: the flag is refused first, so nothing was loaded
    with pytest.raises(UserError, match=r"--layerwise-upcasting-skip-modules-pattern '\(\[' is not a valid regex"):
        run_cli(train_argv(tmp_path / "no-model", tmp_path, tmp_path / "out", "--layerwise-upcasting-modules",
                           "transformer", "--layerwise-upcasting-skip-modules-pattern", "(["))
    with pytest.raises(UserError, match=r"--layerwise-upcasting-skip-modules-pattern '\(\[' is not a valid regex"):
        run_cli(["estimate", "--model", "cogvideox", "--pretrained", "THUDM/CogVideoX-5b",
                 "--layerwise-upcasting-modules", "transformer",
                 "--layerwise-upcasting-skip-modules-pattern", "(["])
    with pytest.raises(UserError, match=r"--target-modules '\(\[' is not a valid regex"):
        run_cli(train_argv(tmp_path / "no-model", tmp_path, tmp_path / "out", "--target-modules", "(["))


def test_fp8_knobs_without_fp8_storage_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"--layerwise-upcasting-storage-dtype set fp8 storage up, which is off: it "
                                        r"would do nothing. Add --layerwise-upcasting-modules transformer"):
        run_cli(train_argv(tmp_path / "no-model", tmp_path, tmp_path / "out", "--layerwise-upcasting-storage-dtype",
                           "float8_e5m2"))
    with pytest.raises(UserError, match=r"--layerwise-upcasting-skip-modules-pattern set fp8 storage up"):
        run_cli(train_argv(tmp_path / "no-model", tmp_path, tmp_path / "out",
                           "--layerwise-upcasting-skip-modules-pattern", "norm"))


def test_one_process_asked_for_several_names_a_torchrun_command_that_works(tiny_cog, cog_shards, tmp_path):
    with pytest.raises(UserError, match=r"launch with `torchrun --nproc_per_node N --no-python ft train \.\.\.`"):
        run_cli(train_argv(tiny_cog, cog_shards, tmp_path / "out", "--dp-shards", "2"))


def test_estimate_with_several_shards_does_not_recommend_offloading(tiny_cog):
    # ft train offloads in one process only: the hint would name a flag that train then refuses
    several = run_cli(["estimate", "--model", "cogvideox", "--pretrained", "THUDM/CogVideoX-5b", "--dp-shards", "8",
                       "--buckets", "81x768x1360"]).report()
    assert "--offload-blocks" not in several
    # one process: where offloading makes it fit (HunyuanVideo stored in fp8 on 24 GB), it is named
    one = run_cli(["estimate", "--model", "hunyuan_video", "--pretrained", "hunyuan-video", "--buckets", "49x512x768",
                   "--layerwise-upcasting-modules", "transformer"]).report()
    assert "cards with --offload-blocks" in one


def test_a_resumed_run_removes_a_delete_cut_short_and_says_step_not_steps(tiny_cog, cog_shards, tmp_path):
    import signal

    from helpers import finish, start

    argv = ["train", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--shards", cog_shards, "--output-dir",
            tmp_path / "out", "--rank", "4", "--train-steps", "3", "--report-to", "none", "--checkpointing-steps", "1",
            "--checkpointing-limit", "1"]  # --lr-warmup-steps left at its default
    code, err = finish(start(argv, FT_TEST_KILL_AT="checkpoint-deleting"))  # killed deleting checkpoint 1
    assert code == -signal.SIGKILL, err[-3000:]
    root = tmp_path / "out" / "checkpoints"
    assert [p.name for p in root.glob(".checkpoint-*.deleting")] == [".checkpoint-000001.deleting"]
    code, err = finish(start([*argv, "--resume-from-checkpoint", "latest"]))
    assert code == 0, err[-3000:]
    assert not list(root.glob(".checkpoint-*")) and sorted(p.name for p in root.iterdir()) == ["checkpoint-000003"]
    assert "mean loss of the first step " in err and "of the last step " in err
    # the default warmup (100 steps) on a 3-step run: said once as a note, not warned
    assert "never reaches --lr" not in err and err.count("the learning rate warms up over the whole run") == 1


def test_a_hub_id_offline_says_so_and_how_to_download_it(tmp_path):
    from helpers import finish, start

    hub_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    code, err = finish(start(["train", "--model", "wan", "--pretrained", hub_id, "--shards", tmp_path,
                              "--output-dir", tmp_path / "out"], HF_HOME=str(tmp_path / "hf")))  # an empty cache
    assert code == 2 and "Traceback" not in err
    assert f"{hub_id} is a Hugging Face Hub id, HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" in err
    assert f"`huggingface-cli download {hub_id} --local-dir DIR`" in err
    code, err = finish(start(["generate", "--model", "cogvideox", "--pretrained", "THUDM/CogVideoX-2b", "--prompt",
                              "x", "--out", tmp_path / "v.mp4"], HF_HOME=str(tmp_path / "hf")))
    assert code == 2 and "THUDM/CogVideoX-2b is a Hugging Face Hub id, HF_HUB_OFFLINE is set" in err, err[-2000:]

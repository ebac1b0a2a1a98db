"""Environment faults end in one message naming the path and the fix, and lose nothing finished.

The faults are real: a tmpfs mounted tiny (disk full) or read-only, and for the output folder turning read-only
mid-training, a run stopped between two steps (`FT_TEST_KILL_AT=logged:N FT_TEST_KILL_SIGNAL=STOP`), its folder
remounted read-only, and let go on. Tests that need a mount skip where mounting is not allowed (not root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ft.common.errors import UserError
from ft.common.shards import ACTIVE_KEYS_NAME, load_manifest
from ft.precompute.media import open_media
from helpers import BUCKETS, FP32, fill, remount, run_cli

PRECOMPUTE = [*FP32, *BUCKETS, "--batch-size", "2"]


def precompute(model: Path, data: Path, out: Path, *extra: str) -> list[object]:
    return ["precompute", "--model", "cogvideox", "--pretrained", model, "--dataset", data, "--out", out,
            *PRECOMPUTE, *extra]


def ft_process(argv: list[object], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ft.cli.main", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


# ---------------------------------------------------------------------------------------------- precompute


def test_disk_full_during_precompute_keeps_whole_shards_and_says_how_much_is_needed(
        tiny_cog, shapes_data, cog_shards, tmpfs):
    reference = load_manifest(cog_shards)
    per_sample = reference.num_bytes / reference.num_samples
    disk = tmpfs("small", "2m")
    filler = fill(disk, leave=int(64e3 + 5 * per_sample))  # room for about two shards of two samples
    out = disk / "shards"
    with pytest.raises(UserError) as error:
        run_cli(precompute(tiny_cog, shapes_data, out, "--shard-samples", "2"))
    message = str(error.value)
    assert message.startswith(f"--out {out}: ") and "no space left on the device" in message
    assert "Kept: " in message and "whole shard(s)" in message and "Needed: about " in message
    assert "is free there" in message and "run the same command again" in message
    manifest = load_manifest(out)
    assert manifest.shards and not manifest.complete  # what was finished is listed, and the set says it is partial
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.tar.tmp"))  # the partial shard was removed
    kept = sum(s.samples for s in manifest.shards)
    assert f"Kept: {kept} new samples in {len(manifest.shards)} whole shard(s)" in message
    filler.unlink()  # space freed: the same command goes on and ends with the uninterrupted run's samples
    finished = run_cli(precompute(tiny_cog, shapes_data, out, "--shard-samples", "2"))
    assert finished.complete
    assert set((out / ACTIVE_KEYS_NAME).read_text().split()) == set((cog_shards / ACTIVE_KEYS_NAME).read_text()
                                                                        .split())


def test_read_only_out_is_refused_before_any_work(tiny_cog, shapes_data, tmpfs):
    disk = tmpfs("ro")
    remount(disk, "ro")
    started = time.time()
    with pytest.raises(UserError, match=r"--out .*/ro/shards \(the shard folder\) cannot be written: .*read-only "
                                        r"filesystem\. Remount it writable.*nothing was done yet"):
        run_cli(precompute(tiny_cog, shapes_data, disk / "shards"))
    assert time.time() - started < 5  # refused before the dataset is probed or a model loads


def test_a_rerun_into_existing_shards_on_a_read_only_disk_says_they_are_untouched(tiny_cog, shapes_data,
                                                                                  cog_shards, tmpfs):
    disk = tmpfs("shelf", "8m")
    shutil.copytree(cog_shards, disk / "shards")
    remount(disk, "ro")
    with pytest.raises(UserError, match="read-only filesystem") as error:
        run_cli(precompute(tiny_cog, shapes_data, disk / "shards"))
    assert "the shards already in it are untouched and `ft train` reads them where they are" in str(error.value)
    assert load_manifest(disk / "shards").complete  # and they are still a whole, readable set


# ---------------------------------------------------------------------------------------------- other commands


def test_check_data_report_to_a_read_only_folder_is_refused_before_checking(shapes_data, tmpfs):
    disk = tmpfs("ro")
    remount(disk, "ro")
    with pytest.raises(UserError, match=r"--report .*check\.json is written to\) cannot be written: .*read-only"):
        run_cli(["check-data", "--model", "cogvideox", "--dataset", shapes_data, "--report", disk / "check.json"])
    with pytest.raises(UserError, match="is a folder; give a file name"):
        run_cli(["check-data", "--model", "cogvideox", "--dataset", shapes_data, "--report", shapes_data])


def test_generate_checks_out_before_sampling(tiny_cog, tmpfs, tmp_path):
    args = ["generate", "--model", "cogvideox", "--pretrained", tiny_cog, "--prompt", "a red square", "--num-frames",
            "9", "--height", "32", "--width", "32", "--num-inference-steps", "2", *FP32[:4]]
    disk = tmpfs("ro")
    remount(disk, "ro")
    with pytest.raises(UserError, match=r"--out .*/ro \(the folder video\.mp4 is written to\) cannot be written: "
                                        r".*read-only filesystem.*nothing was done yet"):
        run_cli([*args, "--out", disk / "video.mp4"])
    full = tmpfs("full", "1m")
    fill(full, leave=0)
    with pytest.raises(UserError, match="no space left on the device"):
        run_cli([*args, "--out", full / "video.mp4"])
    with pytest.raises(UserError, match="is a folder; give the mp4's file name"):
        run_cli([*args, "--out", tmp_path])
    nearly = tmpfs("nearly", "1m")
    fill(nearly, leave=4096)  # room for the probe, not for the video: it fails after sampling, and is kept
    with pytest.raises(UserError, match=r"no space left on the device while writing the video; it was saved to "
                                        r"(\S+video\.mp4) instead") as error:
        run_cli([*args, "--out", nearly / "video.mp4"])
    rescued = Path(str(error.value).split("saved to ")[1].split(" instead")[0])
    assert open_media(rescued).num_frames == 9 and not (nearly / "video.mp4").exists()
    shutil.rmtree(rescued.parent)


def test_generate_refuses_an_out_suffix_it_cannot_write_before_sampling(tiny_cog, tmp_path):
    """`--out v.txt` (or .gif, or no suffix) sampled the whole video and then died in PyAV ("Could not determine
    output format"), losing it; now refused before any model loads. A .mkv is written and reads back."""
    args = ["generate", "--model", "cogvideox", "--pretrained", tiny_cog, "--prompt", "a red square", "--num-frames",
            "9", "--height", "32", "--width", "32", "--num-inference-steps", "2", *FP32[:4]]
    for name in ("v.txt", "v.gif", "v"):
        with pytest.raises(UserError, match=rf"--out \S+{name}: the video is written as H.264 in a .mp4, .mkv"):
            run_cli([*args, "--out", tmp_path / name])
        assert not (tmp_path / name).exists()
    assert open_media(run_cli([*args, "--out", tmp_path / "v.mkv"])).num_frames == 9


def test_inspect_verify_names_a_missing_listed_shard(cog_shards, tmp_path):
    from ft.cli.inspect_shards import describe

    shards = tmp_path / "shards"
    shutil.copytree(cog_shards, shards)
    first = load_manifest(shards).shards[0].name
    (shards / first).unlink()
    with pytest.raises(UserError, match=rf"(?s)1 listed shard\(s\) are not on disk: {first}; rerun `ft precompute` "
                                        r"with the same --out.*verification failed: 0 damaged and 1 missing"):
        describe(str(shards), verify=True)
    assert "samples" in describe(str(shards))  # without --verify the summary still reads from the manifest


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_up_front(value, tmp_path):
    with pytest.raises(UserError, match=rf"--lr {value.replace('-', '-?')}: must be a finite number"):
        run_cli(["train", "--model", "cogvideox", "--pretrained", tmp_path, "--shards", tmp_path, "--output-dir",
                 tmp_path / "o", "--lr", value])
    with pytest.raises(UserError, match="--max-upscale nan: must be a finite number"):
        run_cli(["check-data", "--model", "cogvideox", "--dataset", tmp_path, "--max-upscale", "nan"])


def test_a_fault_no_command_handles_is_one_line_not_a_traceback(tmpfs):
    disk = tmpfs("ro")
    remount(disk, "ro")
    result = subprocess.run([sys.executable, "-m", "ft.cli.main", "demo", "--workdir", str(disk / "demo")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "read-only filesystem. Remount it writable, or use a folder on a writable disk." in result.stderr


# ---------------------------------------------------------------------------------------------- training


def test_output_dir_turning_read_only_mid_training_stops_cleanly_and_resumes(tiny_cog, cog_shards, tmpfs):
    disk = tmpfs("run", "16m")
    out = disk / "out"
    argv = ["train", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--shards", cog_shards, "--output-dir",
            out, "--train-steps", "5", "--checkpointing-steps", "1", "--report-to", "none", "--lr-warmup-steps", "1"]
    run = ft_process(argv, FT_TEST_KILL_AT="logged:3", FT_TEST_KILL_SIGNAL="STOP")
    _, status = os.waitpid(run.pid, os.WUNTRACED)  # stopped just after writing step 3's log line
    assert os.WIFSTOPPED(status), "the run ended before reaching the stop point"
    remount(disk, "ro")  # nothing of the run is open for writing between steps, so the remount succeeds
    os.kill(run.pid, signal.SIGCONT)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert f"--output-dir {out}: " in stderr and "read-only filesystem; training stopped after step 3" in stderr
    assert "The last checkpoint, step 2" in stderr and "--resume-from-checkpoint latest" in stderr
    remount(disk, "rw")
    summary = run_cli([*argv, "--resume-from-checkpoint", "latest"])
    assert summary["steps"] == 5
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "train_log.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # step 3's line of the stopped run was dropped and written again


def test_disk_full_after_the_last_i2v_shard_is_one_message_and_a_rerun_finishes(wan_shards, shapes_data, tmp_path,
                                                                               tmpfs):
    """An image-to-video precompute into a text-to-video set on a disk that fills while the last shard is closed or
    the job's state is written (after every sample was encoded) ends in the one message with what was kept, not a
    raw OSError; freeing space and running again finishes the set. The free space is swept across that moment."""
    from ft.pipelines.registry import save_tiny_model

    model = save_tiny_model("wan:i2v", tmp_path / "i2v", seed=0)
    argv = ["precompute", "--model", "wan", "--pretrained", model, "--dataset", shapes_data, *PRECOMPUTE]
    roomy = run_cli([*argv, "--out", shutil.copytree(wan_shards, tmp_path / "roomy")])
    image_bytes = sum(s.bytes for s in roomy.shards) - sum(s.bytes for s in load_manifest(wan_shards).shards)
    disk = tmpfs("small", "8m")
    outcomes = []
    for leave in range(image_bytes, image_bytes + 96_000, 12_000):
        out = shutil.copytree(wan_shards, disk / f"shards-{leave}")
        filler = fill(disk, leave=leave)
        try:
            outcomes.append(run_cli([*argv, "--out", out]).complete)
        except UserError as e:
            assert str(e).startswith(f"--out {out}: ") and "no space left on the device" in str(e)
            outcomes.append(str(e).split("\n")[1].split(" whole shard")[0])
            filler.unlink()
            assert run_cli([*argv, "--out", out]).complete  # space freed: the same command finishes the set
        else:
            filler.unlink()
        shutil.rmtree(out)
    assert any(o not in (True, "Kept: 0 new samples in 0") for o in outcomes), outcomes  # a fault after a whole shard
    assert True in outcomes, outcomes

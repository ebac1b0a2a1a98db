"""Usable weights at every checkpoint: a LoRA checkpoint holds the LoRA users load; `ft export` makes the LoRA or
the full transformer from any checkpoint (no optimizer state read); a run killed after its last checkpoint and
before its export finishes the export on `--resume-from-checkpoint latest`; exports are written aside and
renamed, so a failed one leaves nothing that loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from helpers import run_cli, train, train_args

STEPS = ["--train-steps", "4", "--batch-size", "2", "--lr", "3e-3", "--lr-warmup-steps", "1", "--seed", "5",
         "--checkpointing-steps", "2", "--report-to", "none"]
LORA = ["--rank", "4", "--lora-alpha", "8"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_cog, cog_shards):
    out = tmp_path_factory.mktemp("export") / "lora"
    train("cogvideox", tiny_cog, cog_shards, out, *STEPS, *LORA)
    return out


def test_every_lora_checkpoint_holds_the_lora_users_load(lora_run, tiny_cog):
    from diffusers import CogVideoXPipeline

    final = load_file(lora_run / "pytorch_lora_weights.safetensors")
    last = lora_run / "checkpoints" / "checkpoint-000004"
    assert same(load_file(last / "pytorch_lora_weights.safetensors"), final)  # the last step's is the result
    earlier = load_file(lora_run / "checkpoints" / "checkpoint-000002" / "pytorch_lora_weights.safetensors")
    assert not same(earlier, final)
    pipe = CogVideoXPipeline.from_pretrained(tiny_cog)
    pipe.load_lora_weights(lora_run / "checkpoints" / "checkpoint-000002")  # a checkpoint loads as a LoRA folder
    assert pipe.get_active_adapters()


def test_ft_export_makes_the_lora_of_any_checkpoint(lora_run, tmp_path):
    checkpoint = lora_run / "checkpoints" / "checkpoint-000002"
    result = run_cli(["export", "--checkpoint", checkpoint, "--out", tmp_path / "step2"])
    assert result == tmp_path / "step2" / "pytorch_lora_weights.safetensors"
    files = ["lora_comfyui.safetensors", "pytorch_lora_weights.safetensors"]  # --lora-format both, the default
    for name in files:
        assert same(load_file(tmp_path / "step2" / name), load_file(checkpoint / name))
    assert sorted(p.name for p in (tmp_path / "step2").iterdir()) == files  # nothing aside
    run_cli(["export", "--checkpoint", checkpoint, "--out", tmp_path / "comfy", "--lora-format", "comfyui"])
    assert [p.name for p in (tmp_path / "comfy").iterdir()] == ["lora_comfyui.safetensors"]


def test_ft_export_makes_a_full_finetunes_transformer_from_a_checkpoint(tiny_cog, cog_shards, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    out = tmp_path / "full"
    train("cogvideox", tiny_cog, cog_shards, out, *STEPS, "--training-type", "full-finetune")
    exported = run_cli(["export", "--checkpoint", out / "checkpoints" / "checkpoint-000004", "--out", tmp_path / "x"])
    a = CogVideoXTransformer3DModel.from_pretrained(exported).state_dict()
    b = CogVideoXTransformer3DModel.from_pretrained(out / "transformer").state_dict()
    assert same(a, b)  # the last checkpoint's export is the run's result
    step2 = run_cli(["export", "--checkpoint", out / "checkpoints" / "checkpoint-000002", "--out", tmp_path / "y"])
    assert not same(CogVideoXTransformer3DModel.from_pretrained(step2).state_dict(), b)


def test_ft_export_refuses_what_is_not_a_checkpoint(tmp_path, lora_run):
    with pytest.raises(UserError, match="not a checkpoint folder"):
        run_cli(["export", "--checkpoint", tmp_path, "--out", tmp_path / "x"])
    with pytest.raises(UserError, match="not a checkpoint folder"):
        run_cli(["export", "--checkpoint", lora_run, "--out", tmp_path / "x"])


def test_a_run_killed_before_its_export_finishes_it_on_resume(tiny_cog, cog_shards, tmp_path, lora_run):
    out = tmp_path / "killed"
    argv = train_args("cogvideox", tiny_cog, cog_shards, out, *STEPS, *LORA)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FT_TEST_KILL_AT": "exporting"}
    done = subprocess.run([sys.executable, "-m", "ft.cli.main", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9  # SIGKILL after the last checkpoint, before the export
    assert (out / "checkpoints" / "checkpoint-000004").is_dir()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    summary = run_cli([*argv, "--resume-from-checkpoint", "latest"])
    assert summary["steps"] == 4 and summary["first_loss"] is None
    assert same(load_file(out / "pytorch_lora_weights.safetensors"),
                load_file(lora_run / "pytorch_lora_weights.safetensors"))  # the straight run's weights


def test_a_failed_export_leaves_nothing_that_loads(tmp_path):
    from ft.train.weights_io import write_aside

    target = tmp_path / "transformer"

    def half(tmp):
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_aside(target, half)
    assert list(tmp_path.iterdir()) == []  # no half folder, not even a hidden one


def digests(folder):
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_onto_a_full_disk_says_how_much_is_needed_and_leaves_nothing(lora_run, tmpfs):
    from ft.train.export import read_checkpoint_tensors
    from ft.train.weights_io import weights_bytes
    from helpers import fill

    checkpoint = lora_run / "checkpoints" / "checkpoint-000002"
    before = digests(checkpoint)
    needed = weights_bytes(read_checkpoint_tensors(checkpoint))
    disk = tmpfs("small", "2m")
    filler = fill(disk, leave=needed // 2)
    with pytest.raises(UserError) as error:  # refused before writing: the free space is read first
        run_cli(["export", "--checkpoint", checkpoint, "--out", disk / "lora"])
    message = str(error.value)
    assert message.startswith(f"--out {disk / 'lora'}: the weights need ") and " is free there" in message
    assert "the checkpoint is untouched" in message
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no folder, no hidden temporary
    filler.unlink()
    result = run_cli(["export", "--checkpoint", checkpoint, "--out", disk / "lora"])  # space freed: it goes
    assert same(load_file(result), load_file(checkpoint / "pytorch_lora_weights.safetensors"))
    # bytes free but no inode left for the file the library writes (ENOSPC all the same, found only while writing):
    # safetensors' own SafetensorError becomes the one line
    inodes = tmpfs("few-inodes", "2m,nr_inodes=3")  # the root, the --out folder, the hidden one aside: no file
    with pytest.raises(UserError) as error:
        run_cli(["export", "--checkpoint", checkpoint, "--out", inodes / "lora"])
    message = str(error.value)
    assert message.startswith(f"--out {inodes / 'lora'}: ") and "no space left on the device" in message
    assert "the weights need" in message and "Nothing half-written was left" in message
    assert list(inodes.iterdir()) == []
    assert digests(checkpoint) == before

"""Checkpoints and exact resume through the CLI: a run stopped at step N and resumed ends bitwise equal to a
straight run (LoRA and full finetune, gradient accumulation, across epoch boundaries, after a SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from helpers import FP32, run_cli

STEPS = ["--train-steps", "6", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--lr", "3e-3",
         "--lr-scheduler", "cosine", "--lr-warmup-steps", "1", "--seed", "9", "--checkpointing-steps", "3",
         "--report-to", "none"]


def train_args(model, shards, out, *extra):
    return ["train", "--model", "cogvideox", "--pretrained", model, *FP32, "--shards", shards, "--output-dir", out,
            *STEPS, *extra]


def weights(out, training_type):
    if training_type == "lora":
        return load_file(out / "pytorch_lora_weights.safetensors")
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(out / "transformer").state_dict()


def losses(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("training_type", ["lora", "full-finetune"])
def test_a_resumed_run_ends_bitwise_equal_to_a_straight_run(tiny_cog, cog_shards, tmp_path, training_type):
    extra = ["--training-type", training_type] + (["--rank", "4", "--lora-alpha", "8"] if training_type == "lora"
                                                  else [])
    straight = tmp_path / "straight"
    summary = run_cli(train_args(tiny_cog, cog_shards, straight, *extra))
    log = losses(straight)
    assert summary["steps"] == 6 and len({r["epoch"] for r in log}) >= 2  # crosses an epoch boundary
    assert [p.name for p in sorted((straight / "checkpoints").iterdir())] == ["checkpoint-000003",
                                                                             "checkpoint-000006"]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-000003", resumed / "checkpoints" / "checkpoint-000003")
    (resumed / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:4]))  # a killed run's log
    run_cli(train_args(tiny_cog, cog_shards, resumed, *extra, "--resume-from-checkpoint", "latest"))
    a, b = weights(straight, training_type), weights(resumed, training_type)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = losses(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]  # appended after step 3, not overwritten
    assert [r["loss"] for r in again] == [r["loss"] for r in log]


def test_a_run_killed_between_checkpoints_resumes_from_the_last_one(tiny_cog, cog_shards, tmp_path):
    # a constant schedule, so the killed run (--train-steps 400, to be sure it is still running) and the straight
    # run (6 steps) share their learning rates
    lora = ["--rank", "4", "--lora-alpha", "8", "--lr-scheduler", "constant"]
    straight = tmp_path / "straight"
    run_cli(train_args(tiny_cog, cog_shards, straight, *lora, "--checkpointing-steps", "2"))
    killed = tmp_path / "killed"
    argv = [str(a) for a in train_args(tiny_cog, cog_shards, killed, *lora, "--checkpointing-steps", "2",
                                       "--train-steps", "400")]
    process = subprocess.Popen([sys.executable, "-m", "ft.cli.main", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoints" / "checkpoint-000004").is_dir():
            assert process.poll() is None and time.time() < deadline, "training ended before its 2nd checkpoint"
            time.sleep(0.05)
        time.sleep(0.3)  # into the steps after it
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    steps_left = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert "checkpoint-000004" in steps_left
    # the straight run had --train-steps 6: resume with the same schedule, from its checkpoint 4
    for name in steps_left:
        if name != "checkpoint-000004":
            shutil.rmtree(killed / "checkpoints" / name)
    run_cli(train_args(tiny_cog, cog_shards, killed, *lora, "--checkpointing-steps", "2",
                       "--resume-from-checkpoint", "4"))
    a, b = weights(straight, "lora"), weights(killed, "lora")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_errors_limit_and_atomic_saves(tiny_cog, cog_shards, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="holds no checkpoint"):
        run_cli(train_args(tiny_cog, cog_shards, out, "--resume-from-checkpoint", "latest"))
    run_cli(train_args(tiny_cog, cog_shards, out, "--checkpointing-steps", "1", "--checkpointing-limit", "2",
                       "--rank", "4"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000005", "checkpoint-000006"]
    with pytest.raises(UserError, match="steps: 5, 6"):
        run_cli(train_args(tiny_cog, cog_shards, out, "--resume-from-checkpoint", "3", "--rank", "4"))
    # a save killed half-way leaves a hidden .tmp folder: never resumed from, removed by the next save
    half = out / "checkpoints" / ".checkpoint-000007.tmp"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")
    # resumed at its last step, the run only finishes its export (a kill may have come between the two)
    assert run_cli(train_args(tiny_cog, cog_shards, out, "--resume-from-checkpoint", "latest", "--rank", "4"))[
        "first_loss"] is None
    with pytest.raises(UserError, match="at step 6, past --train-steps 5; raise --train-steps"):
        run_cli(train_args(tiny_cog, cog_shards, out, "--resume-from-checkpoint", "latest", "--rank", "4",
                           "--train-steps", "5"))
    run_cli(train_args(tiny_cog, cog_shards, out, "--resume-from-checkpoint", "latest", "--rank", "4",
                       "--train-steps", "7", "--checkpointing-steps", "7"))
    assert not half.exists() and (out / "checkpoints" / "checkpoint-000007").is_dir()
    # the LoRA of another rank does not fit the checkpoint: said plainly
    with pytest.raises(UserError, match="does not fit this run"):
        run_cli(train_args(tiny_cog, cog_shards, out, "--resume-from-checkpoint", "latest", "--rank", "8",
                           "--train-steps", "8"))


def test_full_finetune_result_loads_in_diffusers_and_ft_generate(tiny_cog, cog_shards, tmp_path):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    out = tmp_path / "full"
    run_cli(train_args(tiny_cog, cog_shards, out, "--training-type", "full-finetune", "--train-steps", "2",
                       "--checkpointing-steps", "0", "--optimizer", "adam", "--report-to", "tensorboard"))
    transformer = CogVideoXTransformer3DModel.from_pretrained(out / "transformer")
    base = CogVideoXTransformer3DModel.from_pretrained(tiny_cog / "transformer")
    changed = [k for k, v in transformer.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) > 0.5 * len(base.state_dict())  # every weight trains, not just adapters
    pipe = CogVideoXPipeline.from_pretrained(tiny_cog, transformer=transformer)
    assert pipe.transformer is transformer
    assert not (out / "checkpoints").exists() and (out / "loss.png").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*"))
    video = run_cli(["generate", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--transformer-id",
                     out / "transformer", "--prompt", "a red circle", "--num-frames", "9", "--height", "32",
                     "--width", "32", "--num-inference-steps", "2", "--out", tmp_path / "v.mp4"])
    assert video.is_file()


def test_master_weights_in_fp32_compute_in_bf16(tiny_cog, cog_shards, tmp_path):
    out = tmp_path / "master"
    summary = run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, "--transformer-dtype", "bf16",
                       "--shards", cog_shards, "--output-dir", out, "--training-type", "full-finetune",
                       "--master-dtype", "fp32", "--train-steps", "2", "--batch-size", "2", "--report-to", "none",
                       "--checkpointing-steps", "2"])
    assert summary["steps"] == 2
    saved = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # saved in --transformer-dtype
    optimizer_files = list((out / "checkpoints" / "checkpoint-000002").glob("*.distcp"))
    assert optimizer_files  # fp32 master weights and their Adam moments are checkpointed


def test_optimizer_and_dropout_errors(tiny_cog, cog_shards, tmp_path):
    # CogVideoX's pre-patch sequence length would extrapolate the shift to sigma ~ 1 for every sample
    with pytest.raises(UserError, match="--flow-resolution-shifting.*fixed --flow-shift"):
        run_cli(train_args(tiny_cog, cog_shards, tmp_path / "o", "--flow-resolution-shifting"))
    with pytest.raises(UserError, match="bitsandbytes"):
        run_cli(train_args(tiny_cog, cog_shards, tmp_path / "o", "--optimizer", "adamw-8bit"))
    old = tmp_path / "old-shards"
    shutil.copytree(cog_shards, old)
    from ft.common.shards import Manifest

    manifest = Manifest.load(old)
    manifest.empty_caption = {}
    manifest.save(old)
    with pytest.raises(UserError, match="empty caption.*Rerun `ft precompute`"):
        run_cli(train_args(tiny_cog, old, tmp_path / "o", "--caption-dropout-p", "0.1"))


def test_caption_dropout_trains_on_the_stored_empty_caption(tiny_cog, cog_shards, tmp_path):
    from ft.train.config import TrainConfig
    from ft.train.loader import eval_batches
    from ft.train.trainer import Trainer

    def trainer(p):
        return Trainer(TrainConfig(model="cogvideox", pretrained=str(tiny_cog), transformer_dtype="fp32",
                                   shards=[str(cog_shards)], output_dir=str(tmp_path / f"o{p}"),
                                   caption_dropout_p=p, report_to="none"))

    always, never = trainer(1.0), trainer(0.0)
    batch = eval_batches(always.sets[0], 2, 1)[0]
    empty = always.empty_captions[0]
    with torch.no_grad():
        dropped = always.sample_losses(batch, 1)
        batch.cond = {k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in empty.items()}
        by_hand = never.sample_losses(batch, 1)
    torch.testing.assert_close(dropped, by_hand)


def test_two_shard_sets_mix_in_one_run(tiny_cog, cog_shards, tmp_path):
    other = tmp_path / "other-shards"
    shutil.copytree(cog_shards, other)
    mixed = run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--shards", cog_shards,
                     f"{other}:0.5", "--output-dir", tmp_path / "two", "--train-steps", "3",
                     "--batch-size", "2", "--report-to", "none", "--checkpointing-steps", "0"])
    assert mixed["steps"] == 3
    with pytest.raises(UserError, match="given twice"):
        run_cli(train_args(tiny_cog, f"{cog_shards}:0.5", tmp_path / "x", "--shards", cog_shards))
    with pytest.raises(UserError, match="finite number"):
        run_cli(train_args(tiny_cog, f"{other}:inf", tmp_path / "x"))
    from ft.common.shards import Manifest

    manifest = Manifest.load(other)
    manifest.encoder_fingerprint = "0" * 32
    manifest.save(other)
    with pytest.raises(UserError, match="other encoders"):
        run_cli(train_args(tiny_cog, cog_shards, tmp_path / "x", "--shards", other))


def test_a_samples_loss_does_not_depend_on_the_batch_it_is_in(tiny_cog, cog_shards, tmp_path):
    """Per-sample generators: splitting a global batch across ranks or micro-batches draws the same latents,
    noise and timesteps for each sample."""
    from ft.train.config import TrainConfig
    from ft.train.loader import Batch, eval_batches
    from ft.train.trainer import Trainer

    trainer = Trainer(TrainConfig(model="cogvideox", pretrained=str(tiny_cog), transformer_dtype="fp32",
                                  shards=[str(cog_shards)], output_dir=str(tmp_path), report_to="none"))
    pair = eval_batches(trainer.sets[0], 2, 1)[0]

    def single(i):
        return Batch({k: v[i:i + 1] for k, v in pair.latents.items()}, {k: v[i:i + 1] for k, v in pair.cond.items()},
                     pair.meta[i:i + 1], pair.keys[i:i + 1])

    with torch.no_grad():
        together = trainer.sample_losses(pair, 7)
        apart = torch.cat([trainer.sample_losses(single(0), 7), trainer.sample_losses(single(1), 7)])
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)


def test_report_to_wandb_without_wandb_is_a_clear_error(tiny_cog, cog_shards, tmp_path):
    try:  # wandb is not a dependency; where it is installed this test does not apply
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match="pip install wandb"):
        run_cli(train_args(tiny_cog, cog_shards, tmp_path / "o", "--report-to", "wandb"))


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tiny_cog, cog_shards, tmp_path):
    out = tmp_path / "out"
    run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4", "--checkpointing-steps", "2", "--train-steps", "6"))
    run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4", "--checkpointing-steps", "2", "--train-steps", "6",
                       "--resume-from-checkpoint", "2", "--checkpointing-limit", "1", "--lr", "1e-3"))
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-000006"]
    assert sorted(p.name for p in (root / "abandoned-000002").iterdir()) == ["checkpoint-000004",
                                                                             "checkpoint-000006"]
    state = json.loads((root / "checkpoint-000006" / "state.json").read_text())
    assert state["config"]["lr"] == 1e-3  # `latest` is the resumed run's, not the abandoned one's
    assert "torch" in state["rng"]  # RNG states live in state.json: a checkpoint moves between CPU and GPU


def test_damaged_or_unfitting_checkpoints_and_output_dirs_are_clear_errors(tiny_cog, cog_shards, tmp_path):
    out = tmp_path / "out"
    run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4", "--train-steps", "2", "--checkpointing-steps", "1"))
    with pytest.raises(UserError, match="holds checkpoints of an earlier run.*--resume-from-checkpoint latest"):
        run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4"))
    config_before = (out / "train_config.json").read_text()
    # fewer adapters than the checkpoint holds would silently drop trained weights
    with pytest.raises(UserError, match="would drop"):
        run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4", "--target-modules", "to_q",
                           "--resume-from-checkpoint", "1"))
    assert (out / "train_config.json").read_text() == config_before  # a refused attempt writes nothing
    state = out / "checkpoints" / "checkpoint-000002" / "state.json"
    state.write_text(state.read_text()[:50])
    with pytest.raises(UserError, match="is damaged.*steps: 1"):
        run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4", "--resume-from-checkpoint", "2"))
    data = next((out / "checkpoints" / "checkpoint-000001").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(UserError, match="is damaged"):
        run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4", "--resume-from-checkpoint", "1"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="--output-dir"):
        run_cli(train_args(tiny_cog, cog_shards, tmp_path / "a-file"))


def test_a_half_written_log_line_does_not_stop_a_resume(tiny_cog, cog_shards, tmp_path):
    out = tmp_path / "out"
    run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4", "--train-steps", "2", "--checkpointing-steps", "1"))
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    run_cli(train_args(tiny_cog, cog_shards, out, "--rank", "4", "--train-steps", "3", "--resume-from-checkpoint",
                       "latest"))
    assert [r["step"] for r in losses(out)] == [1, 2, 3]

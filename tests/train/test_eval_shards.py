"""The held-out loss (`--eval-shards`): fixed timesteps and noise over clips the model does not train on, logged as
eval_loss; the same weights give the same value twice, after a resume, and whatever the run's --seed."""

from __future__ import annotations

import json
import shutil

import pytest

from ft.common.errors import UserError
from helpers import BUCKETS, FP32, run_cli


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tiny_cog):
    from ft.cli.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("held-out")
    data = make_shapes_dataset(root / "clips", num_clips=3, frames=9, sizes=((32, 32), (32, 64)), seed=11)
    run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", data, "--out",
             root / "shards", *BUCKETS])
    return root / "shards"


def argv(model, shards, out, *extra):
    return ["train", "--model", "cogvideox", "--pretrained", model, *FP32, "--shards", shards, "--output-dir", out,
            "--rank", "4", "--batch-size", "2", "--lr", "1e-3", "--lr-warmup-steps", "0", *extra]


def eval_losses(out):
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


def test_eval_loss_is_logged_and_equal_after_a_resume(tiny_cog, cog_shards, held_out, tmp_path):
    common = ["--eval-shards", held_out, "--eval-steps", "2", "--checkpointing-steps", "2", "--seed", "4"]
    summary = run_cli(argv(tiny_cog, cog_shards, tmp_path / "a", "--train-steps", "4", *common))
    straight = eval_losses(tmp_path / "a")
    assert sorted(straight) == [2, 4] and straight[2] != straight[4]
    assert summary["eval_loss"] == straight[4]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run_cli(argv(tiny_cog, cog_shards, tmp_path / "b", "--train-steps", "4", *common,
                 "--resume-from-checkpoint", "2"))
    assert eval_losses(tmp_path / "b") == straight  # step 4 recomputed by the resumed run: the same value


def test_the_same_weights_give_the_same_value_twice_and_under_any_seed(tiny_cog, cog_shards, held_out, tmp_path):
    from ft.train.config import TrainConfig
    from ft.train.trainer import Trainer

    values = []
    for seed in (1, 2):  # LoRA's B starts at zero: both runs start from the base weights
        cfg = TrainConfig(model="cogvideox", pretrained=str(tiny_cog), transformer_dtype="fp32",
                          shards=[str(cog_shards)], output_dir=str(tmp_path / f"s{seed}"), eval_shards=str(held_out),
                          seed=seed, batch_size=2)
        trainer = Trainer(cfg)
        first, second = trainer.validation.held_out(trainer), trainer.validation.held_out(trainer)
        assert first == second
        values.append(first)
    assert values[0] == values[1]


def test_eval_shards_must_be_held_out_and_of_the_same_model(tiny_cog, cog_shards, ltx_shards, held_out, tmp_path):
    with pytest.raises(UserError, match="--eval-shards .* is a training shard set"):
        run_cli(argv(tiny_cog, cog_shards, tmp_path / "o", "--eval-shards", cog_shards))
    with pytest.raises(UserError, match="encoded for 'ltx_video'"):
        run_cli(argv(tiny_cog, cog_shards, tmp_path / "o", "--eval-shards", ltx_shards))
    with pytest.raises(UserError, match="--eval-steps must be > 0"):
        run_cli(argv(tiny_cog, cog_shards, tmp_path / "o", "--eval-shards", held_out, "--eval-steps", "0"))

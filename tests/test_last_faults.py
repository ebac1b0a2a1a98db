"""Issue 25's smaller faults, each made for real: wandb installed with no login, regex flags that do not compile,
flags that would do nothing, a 0-byte lock, advice for several processes, and the notes of short runs."""

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

"""A shard set is complete or says it is not: `ft train` refuses an incomplete one with the command that completes
it (`--allow-incomplete` trains anyway, with a warning giving the count), `ft inspect` shows it, older manifests
without the field are read and judged, and no sample is trained twice in a pass whatever is on disk."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from ft.cli.inspect_shards import describe
from ft.common.errors import UserError
from ft.common.shards import load_manifest, open_shard_set, shard_keys
from helpers import FP32, run_cli, train

# what this file's runs share besides the run's own flags
RUN = ["--rank", "4", "--batch-size", "1", "--train-steps", "2", "--lr-warmup-steps", "0"]


@pytest.fixture
def incomplete(tmp_path, cog_shards):
    out = tmp_path / "shards"
    shutil.copytree(cog_shards, out)
    manifest = load_manifest(out)
    manifest.complete, manifest.missing = False, {"9x32x64": 4}
    manifest.resume_command = f"ft precompute --config {out}/precompute_config.json"
    manifest.save(out)
    return out


def test_train_refuses_an_incomplete_set_with_the_command_that_completes_it(incomplete, tiny_cog, tmp_path):
    with pytest.raises(UserError, match=r"INCOMPLETE: 4 samples of the dataset are not encoded yet; run "
                                        r"`ft precompute --config .*precompute_config.json`.*--allow-incomplete"):
        train("cogvideox", tiny_cog, incomplete, tmp_path / "out", *RUN)
    assert "INCOMPLETE: 4 samples" in describe(str(incomplete))
    assert "9x32x64       4" in describe(str(incomplete)).split("not encoded yet (missing from training)")[1]


def test_allow_incomplete_trains_on_what_is_there_with_a_warning(incomplete, tiny_cog, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ft"):
        logging.getLogger("ft").propagate = True
        try:
            summary = train("cogvideox", tiny_cog, incomplete, tmp_path / "out", *RUN, "--allow-incomplete")
        finally:
            logging.getLogger("ft").propagate = False
    assert summary["steps"] == 2
    assert "training on the 6 samples encoded so far" in caplog.text
    assert load_manifest(incomplete).training_histogram() == {"1x32x32": 2, "9x32x32": 4}


def test_a_manifest_of_the_previous_version_is_read_and_judged(tmp_path, cog_shards):
    out = tmp_path / "shards"
    shutil.copytree(cog_shards, out)
    data = json.loads((out / "manifest.json").read_text())
    for field in ("complete", "missing", "inputs", "jobs", "resume_command"):  # what ft 0.1 did not write
        del data[field]
    (out / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(out)
    assert manifest.complete is True  # it has a training view: ft 0.1 wrote one only when the run finished
    assert "complete (an older manifest without the field: judged from its training view)" in describe(str(out))
    data["active"] = {}
    (out / "manifest.json").write_text(json.dumps(data))
    assert load_manifest(out).complete is False
    assert "written by an older ft whose run did not finish" in describe(str(out))


def test_an_unlisted_twin_of_a_listed_shard_is_never_adopted(tmp_path, tiny_cog, shapes_data, cog_shards):
    out = tmp_path / "shards"
    shutil.copytree(cog_shards, out)
    manifest = load_manifest(out)
    shutil.copy(out / manifest.shards[0].name, out / "shard-000099.tar")  # a re-encoded twin, as a kill once left
    again = run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset",
                     shapes_data, "--out", out, "--buckets", "9x32x32", "9x32x64", "1x32x32"])
    assert [s.name for s in again.shards] == [s.name for s in manifest.shards]
    assert not (out / "shard-000099.tar").exists()
    _, paths = open_shard_set(out)
    keys = [k for p in paths for k in shard_keys(p)]
    assert len(keys) == len(set(keys)) == 10


def test_a_pass_never_repeats_a_sample_whatever_the_manifest_lists(tmp_path, cog_shards):
    from ft.train.loader import ShardSet, plan_epoch

    out = tmp_path / "shards"
    shutil.copytree(cog_shards, out)
    manifest = load_manifest(out)
    twin = manifest.shards[0]
    shutil.copy(out / twin.name, out / "shard-000099.tar")  # a copy of a shard, listed beside it
    manifest.shards.append(type(twin)(**{**twin.__dict__, "name": "shard-000099.tar"}))
    manifest.save(out)
    index = ShardSet(out).index
    keys = index.keys(plan_epoch(index, seed=0, epoch=0, global_batch=1, shuffle_buffer=4).batches.ravel())
    assert len(keys) == len(set(keys)) == 10

"""Planning streamed into encoding (precompute/planning.py): a first run into an empty --out encodes its first
items while the rest are still being planned, two such runs write the same shard bytes, and planning up front
(`--on-error fail`, or any rerun) gives the same samples with the same tensor bytes."""

from __future__ import annotations

import logging

from ft.common.shards import load_manifest
from ft.pipelines.cogvideox import CogVideoXSpec
from ft.precompute import planned_sample
from helpers import BUCKETS, FP32, run_cli, shard_tensors


def argv(model, data, out, *extra):
    return ["precompute", "--model", "cogvideox", "--pretrained", model, *FP32, "--dataset", data, "--out", out,
            *BUCKETS, "--shard-samples", "3", *extra]




def test_a_first_run_encodes_while_it_plans(tiny_cog, shapes_data, tmp_path, monkeypatch, caplog):
    events: list[str] = []  # the real planning of an item and the real VAE calls, in the order they ran
    plan_facts, encode_video = planned_sample.media_facts, CogVideoXSpec.encode_video

    def planned(*args, **kwargs):
        events.append("plan")
        return plan_facts(*args, **kwargs)

    def encoded(self, vae, frames):
        events.append("encode")
        return encode_video(self, vae, frames)

    monkeypatch.setattr(planned_sample, "media_facts", planned)
    monkeypatch.setattr(CogVideoXSpec, "encode_video", encoded)
    with caplog.at_level(logging.INFO, logger="ft"):
        # no threads: planning and decoding take turns in one thread, so the order below is fixed
        manifest = run_cli(argv(tiny_cog, shapes_data, tmp_path / "out", "--decode-workers", "0"))
    assert events.count("plan") == 10 and events.count("encode") == manifest.active["samples"] == 10
    assert events[:2] == ["plan", "encode"]  # the first clip reached the VAE before the second was planned
    messages = [r.getMessage() for r in caplog.records]
    assert any("encoding on cpu as the items are planned" in m for m in messages)
    assert any(m.startswith("planned 10 samples while encoding") for m in messages)
    assert manifest.complete


def test_streamed_runs_write_the_same_shards_and_up_front_the_same_samples(tiny_cog, shapes_data, tmp_path):
    first = run_cli(argv(tiny_cog, shapes_data, tmp_path / "a"))
    second = run_cli(argv(tiny_cog, shapes_data, tmp_path / "b"))
    assert [s.name for s in first.shards] == [s.name for s in second.shards] and len(first.shards) > 1
    for shard in first.shards:
        assert (tmp_path / "a" / shard.name).read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    up_front = run_cli(argv(tiny_cog, shapes_data, tmp_path / "c", "--on-error", "fail"))
    assert up_front.active["samples"] == first.active["samples"]
    assert shard_tensors(tmp_path / "c") == shard_tensors(tmp_path / "a")
    # a rerun (shards in --out: planned up front) finds every sample there
    again = run_cli(argv(tiny_cog, shapes_data, tmp_path / "a", "--max-upscale", "2.5"))  # not the stamp's config
    assert [s.name for s in again.shards] == [s.name for s in first.shards]
    assert load_manifest(tmp_path / "a").active_keys(tmp_path / "a") == first.active_keys(tmp_path / "a")

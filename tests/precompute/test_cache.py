"""Precompute as a cache: the encoders' fingerprint from their files, a rerun that loads no model, and a sample's
video and text halves reused on their own (a recaption runs only the text encoder; a new clip only its own VAE
encoding). Encoder calls are counted by wrapping the family's real `encode_video` / `encode_prompts`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from ft.cli.synthetic import make_shapes_dataset
from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.common.shards import Manifest, iter_shard
from ft.pipelines.cogvideox import CogVideoXSpec
from ft.pipelines.fingerprint import FilesUnavailable, locate
from ft.pipelines.registry import get_spec
from helpers import FP32, run_cli

BUCKETS = ["--buckets", "9x32x32"]


@pytest.fixture
def calls(monkeypatch):
    """Counts of the real stage-1 calls: clips through the VAE, captions through the text encoders, and the
    components loaded (tokenizers, which load no model, apart)."""
    counts: Counter[str] = Counter()
    encode_video, encode_prompts = CogVideoXSpec.encode_video, CogVideoXSpec.encode_prompts
    load_component = CogVideoXSpec.load_component

    def video(self, vae, frames):
        counts["clips"] += frames.shape[0]
        return encode_video(self, vae, frames)

    def prompts(self, encoders, captions, length):
        counts["captions"] += len(captions)
        return encode_prompts(self, encoders, captions, length)

    def load(self, component, args, device=None):
        if not component.startswith("tokenizer"):
            counts["load " + component] += 1
        return load_component(self, component, args, device)

    monkeypatch.setattr(CogVideoXSpec, "encode_video", video)
    monkeypatch.setattr(CogVideoXSpec, "encode_prompts", prompts)
    monkeypatch.setattr(CogVideoXSpec, "load_component", load)
    return counts


def precompute(model, data, out, *extra):
    return run_cli(["precompute", "--model", "cogvideox", "--pretrained", model, *FP32, "--dataset", data,
                    "--out", out, *BUCKETS, *extra])


def samples(out):
    manifest = Manifest.load(out)
    return {s.key: s for shard in manifest.shards for s in iter_shard(out / shard.name)}


def edit_captions(data, edit):
    prompts = (data / "prompts.txt").read_text().splitlines()
    (data / "prompts.txt").write_text("\n".join(edit(prompts)) + "\n")


def test_unchanged_rerun_loads_no_model_and_encodes_nothing(tmp_path, tiny_cog, calls):
    data = make_shapes_dataset(tmp_path / "data", num_clips=4, seed=21)
    first = precompute(tiny_cog, data, tmp_path / "out")
    assert calls["clips"] == 4 and calls["load vae"] == 1 and calls["load text_encoder"] == 1
    calls.clear()
    again = precompute(tiny_cog, data, tmp_path / "out")
    assert calls == Counter()  # no encoder call and no model loaded
    assert again.encoder_fingerprint == first.encoder_fingerprint and again.complete
    assert [s.name for s in again.shards] == [s.name for s in first.shards]



def test_unchanged_rerun_of_job_i_of_n_stops_after_a_stat_before_importing_torch(tmp_path, tiny_cog, calls,
                                                                                   caplog):
    data = make_shapes_dataset(tmp_path / "data", num_clips=4, seed=26)
    out = tmp_path / "out"
    for index in ("0", "1"):  # job 1 finishes last and merges: it seals both jobs' stamps
        precompute(tiny_cog, data, out, "--num-jobs", "2", "--job-index", index)
    assert Manifest.load(out).complete
    calls.clear()
    with caplog.at_level("INFO", logger="ft"):
        again = precompute(tiny_cog, data, out, "--num-jobs", "2", "--job-index", "0")
    assert calls == Counter() and again.complete and "nothing changed since job 0 of 2" in caplog.text
    assert "items are this job's" not in caplog.text  # not even the slice was taken: nothing was planned
    # as a new process: it stops before torch (or diffusers) is imported
    code = ("import sys; from ft.cli.main import invoke; m = invoke(sys.argv[1:], standalone=False); "
            "print(m.complete, sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    args = ["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", data, "--out", out,
            *BUCKETS, "--num-jobs", "2", "--job-index", "1"]
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True []"
    (data / "videos" / "clip_000.mp4").touch()  # a file touched: the job plans again (and finds it encoded)
    calls.clear()
    precompute(tiny_cog, data, out, "--num-jobs", "2", "--job-index", "0")
    assert calls["clips"] == 0 and calls["load vae"] == 0


def test_a_clip_replaced_beside_a_metadata_file_is_seen_by_the_rerun(tmp_path, tiny_cog, calls):
    # --dataset names the metadata file: the media in its folder are stat'ed for the stamp too
    data = make_shapes_dataset(tmp_path / "data", num_clips=3, layout="jsonl", seed=27)
    precompute(tiny_cog, data / "metadata.jsonl", tmp_path / "out")
    other = make_shapes_dataset(tmp_path / "other", num_clips=1, seed=98)
    clip = next((data / "videos").glob("*.mp4"))
    shutil.copy(other / "videos" / "clip_000.mp4", clip)  # new bytes under the old name
    calls.clear()
    manifest = precompute(tiny_cog, data / "metadata.jsonl", tmp_path / "out")
    assert calls["clips"] == 1 and manifest.active["samples"] == 3


def test_one_media_under_two_names_of_two_jobs_is_noted_as_one_job_notes_it(tmp_path, tiny_cog, calls):
    from ft.precompute.jobs import owner

    data = make_shapes_dataset(tmp_path / "data", num_clips=3, seed=28)
    first = "videos/clip_000.mp4"
    copy = next(f"videos/copy_{i}.mp4" for i in range(100) if owner(f"videos/copy_{i}.mp4", 2) != owner(first, 2))
    shutil.copy(data / first, data / copy)
    caption = (data / "prompts.txt").read_text().splitlines()[0]
    with open(data / "videos.txt", "a") as f:
        f.write(copy + "\n")
    with open(data / "prompts.txt", "a") as f:
        f.write(caption + "\n")  # the same bytes, frames and caption: one sample
    single = precompute(tiny_cog, data, tmp_path / "one")
    [note] = [w for w in single.warnings if w["kind"] == "duplicate"]
    for index in ("0", "1"):
        jobs = precompute(tiny_cog, data, tmp_path / "two", "--num-jobs", "2", "--job-index", index)
    assert jobs.complete and jobs.active_keys(tmp_path / "two") == single.active_keys(tmp_path / "one")
    [merged] = [w for w in jobs.warnings if w["kind"] == "duplicate"]
    assert {Path(merged["path"]).name, Path(merged["reason"].split(" as ")[1].split(";")[0]).name} == \
        {Path(note["path"]).name, Path(note["reason"].split(" as ")[1].split(";")[0]).name} == {"clip_000.mp4",
                                                                                               Path(copy).name}
    assert "trained once" in merged["reason"] and jobs.inputs["warnings"]["kinds"]["duplicate"] == 1

def test_one_caption_changed_is_one_text_encoding_and_reuses_the_latents(tmp_path, tiny_cog, calls):
    data = make_shapes_dataset(tmp_path / "data", num_clips=4, seed=22)
    out = tmp_path / "out"
    precompute(tiny_cog, data, out)
    before = samples(out)
    calls.clear()
    edit_captions(data, lambda p: [p[0] + ", at dusk", *p[1:]])
    manifest = precompute(tiny_cog, data, out)
    assert calls == Counter({"captions": 1, "load text_encoder": 1})  # no VAE loaded, no clip encoded
    new = {k: s for k, s in samples(out).items() if k not in before}
    (sample,) = new.values()
    assert sample.meta["caption"].endswith(", at dusk")
    old = next(s for s in before.values() if s.meta["video_key"] == sample.meta["video_key"])
    assert old.meta["text_key"] != sample.meta["text_key"] and old.meta["source"] == sample.meta["source"]
    for name, tensor in old.tensors["latents"].items():
        assert torch.equal(sample.tensors["latents"][name], tensor)  # the stored latents, not re-encoded
    assert not torch.equal(sample.tensors["cond"]["prompt_embeds"], old.tensors["cond"]["prompt_embeds"])
    assert manifest.active["samples"] == 4 and manifest.complete


def test_an_id_token_on_every_caption_runs_only_the_text_encoder(tmp_path, tiny_cog, calls):
    data = make_shapes_dataset(tmp_path / "data", num_clips=3, seed=23)
    out = tmp_path / "out"
    precompute(tiny_cog, data, out)
    calls.clear()
    manifest = precompute(tiny_cog, data, out, "--id-token", "SKS")
    assert calls["clips"] == 0 and calls["load vae"] == 0 and calls["captions"] == 3
    assert manifest.active["samples"] == 3
    active = manifest.active_keys(out)
    assert all(s.meta["caption"].startswith("SKS ") for k, s in samples(out).items() if k in active)


def test_one_clip_added_is_one_video_encoding(tmp_path, tiny_cog, calls):
    data = make_shapes_dataset(tmp_path / "data", num_clips=3, seed=24)
    out = tmp_path / "out"
    precompute(tiny_cog, data, out)
    more = make_shapes_dataset(tmp_path / "more", num_clips=1, seed=99)
    shutil.copy(more / "videos" / "clip_000.mp4", data / "videos" / "added.mp4")
    with open(data / "videos.txt", "a") as f:
        f.write("videos/added.mp4\n")
    captions = (data / "prompts.txt").read_text().splitlines()
    with open(data / "prompts.txt", "a") as f:
        f.write(captions[0] + "\n")  # a caption already encoded: its text half is reused too
    calls.clear()
    manifest = precompute(tiny_cog, data, out)
    assert calls == Counter({"clips": 1, "load vae": 1})
    assert manifest.active["samples"] == 4


def test_a_shard_set_with_the_old_fingerprint_is_refused_with_the_reason(tmp_path, tiny_cog):
    data = make_shapes_dataset(tmp_path / "data", num_clips=2, seed=25)
    out = tmp_path / "out"
    precompute(tiny_cog, data, out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for info in manifest["encoders"].values():  # as an ft that fingerprinted loaded models wrote it
        info.pop("from")
    manifest["encoder_fingerprint"] = "0" * 32
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="fingerprinted the encoders from the loaded models.*new --out"):
        precompute(tiny_cog, data, out)


def test_fingerprint_from_files_follows_the_weights_and_the_dtype(tmp_path, tiny_cog):
    spec = get_spec("cogvideox")
    args = ModelArgs(model="cogvideox", pretrained=str(tiny_cog))
    base = spec.fingerprints_from_files(args)
    assert base == spec.fingerprints_from_files(args)
    assert base["vae"]["config"]["scaling_factor"] > 0 and base["vae"]["dtype"] == "bf16"
    other = spec.tiny_components(seed=5)["vae"]
    other.save_pretrained(tmp_path / "my-vae")
    moved = spec.fingerprints_from_files(ModelArgs(model="cogvideox", pretrained=str(tiny_cog),
                                                   vae_id=str(tmp_path / "my-vae"), vae_dtype="fp32"))
    assert moved["vae"]["weights"] != base["vae"]["weights"] and moved["vae"]["dtype"] == "fp32"
    assert moved["text_encoder"] == base["text_encoder"] and moved["tokenizer"] == base["tokenizer"]


def test_fingerprint_from_a_hub_id_in_the_cache_offline(tmp_path, tiny_cog):
    """A hub id whose files are in the Hugging Face cache is fingerprinted from there, offline, as its folder."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-cog" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_cog, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    spec = get_spec("cogvideox")
    from_hub = spec.fingerprints_from_files(ModelArgs(model="cogvideox", pretrained="someone/tiny-cog",
                                                      cache_dir=str(tmp_path / "hub")))
    assert from_hub == spec.fingerprints_from_files(ModelArgs(model="cogvideox", pretrained=str(tiny_cog)))
    with pytest.raises(FilesUnavailable, match="not in the Hugging Face cache"):
        spec.fingerprints_from_files(ModelArgs(model="cogvideox", pretrained="someone/elsewhere",
                                               cache_dir=str(tmp_path / "hub")))


def test_weights_that_cannot_be_read_from_files_fall_back_to_loading(tmp_path, tiny_cog, shapes_data, caplog,
                                                                    calls):
    """A .bin VAE: its bytes are not read as files (a pickle), so the models are loaded to fingerprint them."""
    get_spec("cogvideox").tiny_components(seed=0)["vae"].save_pretrained(tmp_path / "bin-vae",
                                                                         safe_serialization=False)
    with pytest.raises(FilesUnavailable):
        locate(str(tmp_path / "bin-vae"), None, None, None, None, tokenizer=False)
    with caplog.at_level("INFO", logger="ft"):
        manifest = precompute(tiny_cog, shapes_data, tmp_path / "out", "--vae-id", tmp_path / "bin-vae")
    assert "cannot be fingerprinted without loading them" in caplog.text
    assert manifest.num_samples == 10 and "from" not in manifest.encoders["vae"]
    calls.clear()
    precompute(tiny_cog, shapes_data, tmp_path / "out", "--vae-id", tmp_path / "bin-vae")
    assert calls["clips"] == 0 and calls["captions"] == 0  # the fallback's fingerprint is stable: all reused


def test_a_weights_file_that_is_not_safetensors_is_a_clear_error(tiny_cog, shapes_data, tmp_path):
    """A git-lfs pointer (a repo cloned without git-lfs) in place of the weights: the fingerprint falls back to
    loading, and loading names the file; no traceback."""
    model = tmp_path / "model"
    shutil.copytree(tiny_cog, model)
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 12345\n")
    with pytest.raises(UserError, match="could not load the CogVideoX vae.*git-lfs"):
        run_cli(["precompute", "--model", "cogvideox", "--pretrained", model, *FP32, "--dataset", shapes_data,
                 "--out", tmp_path / "out", *BUCKETS])

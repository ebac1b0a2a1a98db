"""`ft precompute` end to end on real mp4 clips: shards, manifest, reuse, rejects, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ft.cli.synthetic import make_shapes_dataset
from ft.common.errors import UserError
from ft.common.shards import Manifest, iter_shard, open_shard_set
from helpers import BUCKETS, FP32, run_cli


def precompute(model, data, out, *extra):
    return run_cli(["precompute", "--model", "cogvideox", "--pretrained", model, *FP32, "--dataset", data,
                    "--out", out, *BUCKETS, *extra])


def test_manifest_describes_the_shards(cog_shards, shapes_data):
    manifest, paths = open_shard_set(cog_shards)
    assert manifest.model_family == "cogvideox"
    assert manifest.num_samples == 10 and not manifest.rejected
    assert manifest.bucket_histogram() == {"1x32x32": 2, "9x32x32": 4, "9x32x64": 4}
    assert manifest.shapes == {"latent_channels": 4, "prompt_embeds": [16, 32]}
    assert manifest.encoding["max_sequence_length"] == 16  # the tiny transformer's max_text_seq_length
    assert set(manifest.encoders) == {"tokenizer", "text_encoder", "vae"}
    assert manifest.encoders["vae"]["config"]["scaling_factor"] > 0
    captions = {line.strip() for line in (shapes_data / "prompts.txt").read_text().splitlines()}
    for shard, path in zip(manifest.shards, paths, strict=True):
        samples = list(iter_shard(path, expected_sha256=shard.sha256))
        assert len(samples) == shard.samples
        for s in samples:
            assert s.meta["caption"] in captions
            assert s.meta["model_family"] == "cogvideox"
            frames, height, width = s.meta["bucket"]
            assert s.tensors["latents"]["mean"].shape == (4, (frames - 1) // 4 + 1, height // 8, width // 8)
            assert list(s.tensors["latents"]["logvar"].shape) == s.meta["latent_shape"]
            assert s.tensors["cond"]["prompt_embeds"].shape == (16, 32)
            assert len(s.meta["frame_indices"]) == frames
            assert s.meta["source_fps"] == (0.0 if s.meta["source"].endswith(".png") else 8.0)


def test_rerun_reuses_everything_and_a_grown_dataset_encodes_only_the_new(tmp_path, tiny_cog, shapes_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    out = tmp_path / "shards"
    first = precompute(tiny_cog, data, out)
    assert first.num_samples == 10
    again = precompute(tiny_cog, data, out)
    assert [s.name for s in again.shards] == [s.name for s in first.shards]  # nothing new written
    # grow the dataset by two clips
    more = make_shapes_dataset(tmp_path / "more", num_clips=2, seed=7)
    for line_v, line_p in zip((more / "videos.txt").read_text().splitlines(),
                              (more / "prompts.txt").read_text().splitlines(), strict=True):
        target = data / "videos" / ("new_" + line_v.split("/")[-1])
        shutil.copy(more / line_v, target)
        with open(data / "videos.txt", "a") as f:
            f.write(f"videos/{target.name}\n")
        with open(data / "prompts.txt", "a") as f:
            f.write(line_p + f", new clip {target.name}\n")  # clips may repeat; the captions make them new
    grown = precompute(tiny_cog, data, out)
    assert grown.num_samples == 12
    assert len(grown.shards) == len(first.shards) + 1 and grown.shards[-1].samples == 2


def test_bad_inputs_are_rejected_with_reasons_and_the_rest_encoded(tmp_path, tiny_cog):
    data = make_shapes_dataset(tmp_path / "data", num_clips=3, seed=1)
    (data / "videos" / "garbage.mp4").write_bytes(b"\x00not a video" * 100)
    short = make_shapes_dataset(tmp_path / "short", num_clips=1, frames=5, seed=2)
    shutil.copy(short / "videos" / "clip_000.mp4", data / "videos" / "short.mp4")
    with open(data / "videos.txt", "a") as f:
        f.write("videos/garbage.mp4\nvideos/missing.mp4\nvideos/short.mp4\n")
    with open(data / "prompts.txt", "a") as f:
        f.write("garbage\nmissing\nshort\n")
    manifest = precompute(tiny_cog, data, tmp_path / "out")
    assert manifest.num_samples == 3
    reasons = {r["path"].split("/")[-1]: r["reason"] for r in manifest.rejected}
    assert set(reasons) == {"garbage.mp4", "missing.mp4", "short.mp4"}
    # the 1-frame bucket is for images: the message names the shortest bucket a video may take
    assert reasons["short.mp4"].startswith("too short: 5 frames, the shortest video bucket needs 9")
    assert "not a readable video" in reasons["garbage.mp4"]
    assert reasons["missing.mp4"] == "file not found"
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())  # summarised; the records beside it
    assert on_disk["inputs"]["rejected"] == {"files": ["rejected.jsonl"], "count": 3,
                                             "kinds": {"missing": 1, "not-media": 1, "too-short": 1}}
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 3


def test_a_clip_too_short_for_every_bucket_is_rejected(tmp_path, tiny_cog):
    data = make_shapes_dataset(tmp_path / "data", num_clips=2, frames=5, seed=3)
    make_shapes_dataset(tmp_path / "long", num_clips=1, frames=17, seed=4)
    shutil.copy(tmp_path / "long" / "videos" / "clip_000.mp4", data / "videos" / "long.mp4")
    with open(data / "videos.txt", "a") as f:
        f.write("videos/long.mp4\n")
    with open(data / "prompts.txt", "a") as f:
        f.write("a long clip\n")
    manifest = run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", data,
                        "--out", tmp_path / "out", "--buckets", "9x32x32"])
    assert manifest.num_samples == 1
    assert all("too short: 5 frames, the shortest bucket needs 9" in r["reason"] for r in manifest.rejected)


def test_a_killed_runs_partial_shard_is_discarded(tmp_path, tiny_cog, shapes_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar.tmp").write_bytes(b"half a shard")
    manifest = precompute(tiny_cog, shapes_data, out)
    assert not list(out.glob("*.tmp")) and manifest.num_samples == 10


def test_an_out_folder_of_other_encoders_is_refused(tmp_path, tiny_cog, shapes_data, cog_shards):
    out = tmp_path / "out"
    shutil.copytree(cog_shards, out)
    with pytest.raises(UserError, match="other encoders.*new --out"):
        run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, "--vae-dtype", "fp32",
                 "--dataset", shapes_data, "--out", out, *BUCKETS])  # text encoder in bf16 this time


def test_uniform_frame_sampling_and_stride(tmp_path, tiny_cog, shapes_data):
    manifest = precompute(tiny_cog, shapes_data, tmp_path / "uniform", "--frame-sampling", "uniform")
    samples = [s for p in manifest.shards for s in iter_shard(tmp_path / "uniform" / p.name)]
    video = [s for s in samples if s.meta["bucket"][0] == 9]
    assert all(s.meta["frame_indices"] == [0, 2, 4, 6, 8, 10, 12, 14, 16] for s in video)
    manifest = precompute(tiny_cog, shapes_data, tmp_path / "stride", "--frame-stride", "2")
    samples = [s for p in manifest.shards for s in iter_shard(tmp_path / "stride" / p.name)]
    assert all(s.meta["frame_indices"] == list(range(0, 17, 2)) for s in samples if s.meta["bucket"][0] == 9)


def test_latents_are_the_vae_posterior_of_the_decoded_frames(cog_shards, tiny_cog, shapes_data):
    from ft.common.model_args import ModelArgs
    from ft.pipelines.registry import get_spec
    from ft.precompute.media import open_media, resize_center_crop

    spec = get_spec("cogvideox")
    vae = spec.load_component("vae", ModelArgs(model="cogvideox", pretrained=str(tiny_cog), vae_dtype="fp32"))
    manifest = Manifest.load(cog_shards)
    sample = next(s for s in iter_shard(cog_shards / manifest.shards[0].name) if s.meta["bucket"][0] == 9)
    frames = open_media(sample.meta["source"]).read(sample.meta["frame_indices"])
    x = resize_center_crop(frames, *sample.meta["bucket"][1:]).permute(1, 0, 2, 3)[None]
    with torch.no_grad():
        expected = spec.encode_video(vae, x)
    torch.testing.assert_close(sample.tensors["latents"]["mean"], expected["mean"][0], atol=1e-4, rtol=1e-4)


def test_a_lost_shard_is_encoded_again(tmp_path, tiny_cog, shapes_data):
    out = tmp_path / "out"
    first = precompute(tiny_cog, shapes_data, out, "--shard-samples", "4")
    assert len(first.shards) == 3
    (out / first.shards[1].name).unlink()
    again = precompute(tiny_cog, shapes_data, out, "--shard-samples", "4")
    assert again.num_samples == 10
    assert [s.name for s in again.shards] == [first.shards[0].name, first.shards[2].name, "shard-000003.tar"]
    _, paths = open_shard_set(out)
    assert all(p.is_file() for p in paths)


def test_a_rerun_on_an_edited_dataset_trains_only_on_what_it_now_holds(tmp_path, tiny_cog):
    from ft.train.loader import SetStream, ShardSet

    data = make_shapes_dataset(tmp_path / "data", num_clips=4, seed=11)
    out = tmp_path / "out"
    first = precompute(tiny_cog, data, out)
    assert first.active["samples"] == 4
    videos = (data / "videos.txt").read_text().splitlines()
    prompts = (data / "prompts.txt").read_text().splitlines()
    (data / "videos.txt").write_text("\n".join(videos[:3]) + "\n")  # one clip removed
    (data / "prompts.txt").write_text("\n".join([prompts[0] + ", at dusk", *prompts[1:3]]) + "\n")  # one recaptioned
    second = precompute(tiny_cog, data, out)
    assert second.num_samples == 5  # the old samples stay cached ...
    assert second.active["samples"] == 3 and second.training_histogram() == {"9x32x32": 3}
    stream = SetStream(ShardSet(out), 0, seed=0, batch_size=1).batches()
    captions = {next(stream)[0].meta[0]["caption"] for _ in range(12)}
    assert captions == {prompts[0] + ", at dusk", *prompts[1:3]}  # ... but training sees only the dataset


def test_an_interrupt_inside_a_sample_leaves_no_half_sample(tmp_path):
    from ft.common.shards import ShardWriter, shard_keys

    class Interrupted(ShardWriter):
        calls = 0

        def _add(self, name, data):
            Interrupted.calls += 1
            if Interrupted.calls == 5:  # the second member of the second sample
                raise KeyboardInterrupt
            super()._add(name, data)

    writer = Interrupted(tmp_path)
    sample = {"latents": {"mean": torch.zeros(2)}, "cond": {"prompt_embeds": torch.zeros(3)}}
    writer.write("a", sample, {"bucket": [1, 8, 8]})
    with pytest.raises(KeyboardInterrupt):
        writer.write("b", sample, {"bucket": [1, 8, 8]})
    assert writer.finish_shard() is None  # the damaged shard is discarded, its samples encoded again next run
    assert not list(tmp_path.iterdir())
    whole = ShardWriter(tmp_path / "ok")
    whole.write("a", sample, {"bucket": [1, 8, 8]})
    whole.finish_shard()
    assert shard_keys(tmp_path / "ok" / "shard-000000.tar") == {"a"}


def test_cogvideox_1_5_takes_any_4k_plus_1_frames_and_images(tmp_path, tiny_cog):
    """Latent frames are padded to the 1.5 temporal patch in training, so 9 frames and images encode as they are."""
    from diffusers import CogVideoXTransformer3DModel

    model = tmp_path / "cogvideox-1.5-tiny"
    shutil.copytree(tiny_cog, model)
    shutil.rmtree(model / "transformer")
    CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=32, num_layers=1, sample_width=8, sample_height=8, sample_frames=13, patch_size=2,
        patch_size_t=2, patch_bias=False, temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=True).save_pretrained(model / "transformer")
    data = make_shapes_dataset(tmp_path / "data", num_clips=2, num_images=1, seed=5)
    manifest = run_cli(["precompute", "--model", "cogvideox", "--pretrained", model, *FP32, "--dataset", data,
                        "--out", tmp_path / "out", "--buckets", "13x32x32"])
    assert manifest.training_histogram() == {"13x32x32": 2, "1x32x32": 1}
    assert not manifest.rejected


def test_a_complete_shard_missing_from_the_manifest_is_adopted(tmp_path, tiny_cog, shapes_data):
    out = tmp_path / "out"
    first = precompute(tiny_cog, shapes_data, out, "--shard-samples", "4")
    manifest = Manifest.load(out)
    lost = manifest.shards.pop()  # as if killed between the shard's rename and the manifest's save
    manifest.save(out)
    again = precompute(tiny_cog, shapes_data, out, "--shard-samples", "4")
    assert sorted(s.name for s in again.shards) == sorted(s.name for s in first.shards)
    adopted = next(s for s in again.shards if s.name == lost.name)
    assert adopted == lost  # samples, bytes, sha256 and buckets rebuilt from the file itself

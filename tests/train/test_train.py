"""`ft train` and `ft generate` through the CLI on precomputed shards of the tiny CogVideoX."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from ft.common.shards import Manifest
from helpers import FP32, run_cli

PROMPT = "a red circle moving left to right on a dark background"


def train(model, shards, out, *extra):
    return run_cli(["train", "--model", "cogvideox", "--pretrained", model, *FP32, "--shards", shards,
                    "--output-dir", out, "--rank", "8", "--lora-alpha", "16", "--batch-size", "2",
                    "--lr-warmup-steps", "0", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cog, cog_shards):
    out = tmp_path_factory.mktemp("train") / "out"
    summary = train(tiny_cog, cog_shards, out, "--train-steps", "50", "--lr", "3e-3", "--eval-batches", "4",
                    "--seed", "0")
    return out, summary


def test_loss_falls_over_50_steps(trained):
    out, summary = trained
    assert summary["steps"] == 50
    # the same 4 batches, the same noise and timesteps, before and after training
    assert summary["eval_loss_after"] < 0.95 * summary["eval_loss_before"], summary
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 51))
    assert all(np.isfinite(r["loss"]) and r["lr"] == pytest.approx(3e-3) for r in log)


def test_lora_is_saved_in_diffusers_format(trained):
    out, _ = trained
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert any(".to_q.lora_A." in k for k in weights) and any(".to_out.0.lora_B." in k for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained away from zero init
    config = json.loads((out / "train_config.json").read_text())
    assert config["rank"] == 8 and config["shards"]


def test_load_lora_weights_changes_the_pipelines_output(trained, tiny_cog):
    from diffusers import CogVideoXPipeline

    out, _ = trained

    def render(pipe):
        return pipe(prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16).frames[0]

    pipe = CogVideoXPipeline.from_pretrained(tiny_cog)  # fp32
    base = render(pipe)
    pipe.load_lora_weights(out)
    (adapter,) = pipe.get_active_adapters()
    loaded = pipe.transformer.peft_config[adapter]
    assert (loaded.r, loaded.lora_alpha) == (8, 16)  # alpha travels in the metadata: the scale is what was trained
    tuned = render(pipe)
    assert np.abs(tuned - base).max() > 1e-3


def test_generate_writes_a_video_with_and_without_lora(trained, tiny_cog, tmp_path):
    from ft.precompute.media import open_media

    out, _ = trained
    common = ["generate", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--prompt", PROMPT,
              "--num-frames", "9", "--height", "32", "--width", "64", "--num-inference-steps", "3"]
    with_lora = run_cli([*common, "--lora", out, "--out", tmp_path / "lora.mp4"])
    without = run_cli([*common, "--out", tmp_path / "base.mp4"])
    a, b = open_media(with_lora), open_media(without)
    assert (a.num_frames, a.height, a.width) == (9, 32, 64)
    assert not np.array_equal(a.read(list(range(9))), b.read(list(range(9))))


def test_training_is_reproducible_with_a_seed(tiny_cog, cog_shards, tmp_path):
    a = train(tiny_cog, cog_shards, tmp_path / "a", "--train-steps", "3", "--seed", "5")
    b = train(tiny_cog, cog_shards, tmp_path / "b", "--train-steps", "3", "--seed", "5")
    assert a["first_loss"] == b["first_loss"] and a["last_loss"] == b["last_loss"]
    wa, wb = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors"), load_file(
        tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_accumulation_and_bf16_run(tiny_cog, cog_shards, tmp_path):
    summary = run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, "--shards", cog_shards,
                       "--output-dir", tmp_path, "--rank", "4", "--train-steps", "2", "--batch-size", "1",
                       "--gradient_accumulation_steps", "2", "--gradient-checkpointing", "--target-modules", "to_q",
                       "to_v"])  # bf16 base (the default), finetrainers' underscore spelling
    assert summary["steps"] == 2
    weights = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[-3] for k in weights} == {"to_q", "to_v"}


def test_shards_of_another_family_or_shape_are_refused(tiny_cog, cog_shards, tmp_path):
    for field, value, message in [("model_family", "ltx_video", "encoded for 'ltx_video'"),
                                  ("shapes", {"latent_channels": 16, "prompt_embeds": [16, 32]}, "16 channels"),
                                  ("shapes", {"latent_channels": 4, "prompt_embeds": [16, 4096]}, "width 4096"),
                                  ("shapes", {"latent_channels": 4, "prompt_embeds": [226, 32]}, "226 text tokens")]:
        shards = tmp_path / f"{field}-{message[:3].strip()}"
        shutil.copytree(cog_shards, shards)
        manifest = Manifest.load(shards)
        setattr(manifest, field, value)
        manifest.save(shards)
        with pytest.raises(UserError, match=message):
            train(tiny_cog, shards, tmp_path / "out", "--train-steps", "1")


def test_user_errors_name_the_flag(tiny_cog, cog_shards, tmp_path):
    with pytest.raises(UserError, match="--batch-size 64"):
        train(tiny_cog, cog_shards, tmp_path / "o", "--train-steps", "1", "--batch-size", "64")
    with pytest.raises(UserError, match="--target-modules"):
        train(tiny_cog, cog_shards, tmp_path / "o", "--train-steps", "1", "--target-modules", "no_such_layer")
    with pytest.raises(UserError, match="--training-type"):
        train(tiny_cog, cog_shards, tmp_path / "o", "--training-type", "dreambooth")
    with pytest.raises(UserError, match="no such shard folder"):
        train(tiny_cog, tmp_path / "nothing", tmp_path / "o")
    with pytest.raises(UserError, match="--lora"):
        run_cli(["generate", "--model", "cogvideox", "--pretrained", tiny_cog, "--prompt", "x", "--lora", tmp_path])


def test_a_bucket_too_small_for_a_batch_never_repeats_a_sample(tmp_path):
    from ft.common.shards import Manifest, ShardWriter
    from ft.train.loader import SetStream, ShardSet

    writer = ShardWriter(tmp_path)
    for key, size in [("a0", 4), ("a1", 4), ("a2", 4), ("b0", 8)]:
        writer.write(key, {"latents": {"mean": torch.zeros(size)}}, {"bucket": [1, size, size], "key": key})
    writer.finish_shard()
    Manifest("cogvideox", {}, "", {}, {}, shards=writer.completed).save(tmp_path)
    stream = SetStream(ShardSet(tmp_path), 0, seed=0, batch_size=2).batches()
    batches = [[m["key"] for m in next(stream)[0].meta] for _ in range(12)]
    assert all(len(set(b)) == 2 for b in batches), batches  # never [b0, b0]
    assert {k for b in batches for k in b} == {"a0", "a1", "a2"}  # b0 alone cannot fill a batch


def test_the_background_reader_stops_with_its_consumer():
    import threading

    from ft.train.loader import background

    before = threading.active_count()
    reader = background(iter(range(10**9)), size=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    assert threading.active_count() == before + 1
    reader.close()
    for _ in range(50):
        if threading.active_count() == before:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() == before


def test_the_saved_lora_is_exactly_the_trained_one_after_load_lora_weights(tiny_cog, tmp_path):
    """What ft trains is what diffusers runs: same rank, alpha and weights, so the same transformer output."""
    from diffusers import CogVideoXPipeline

    from ft.common.model_args import ModelArgs
    from ft.pipelines.registry import get_spec
    from ft.train.lora import add_lora, save_lora

    spec = get_spec("cogvideox")
    transformer = spec.load_component("transformer", ModelArgs(model="cogvideox", pretrained=str(tiny_cog),
                                                                transformer_dtype="fp32"))
    params = add_lora(transformer, rank=4, alpha=12, target_modules=spec.default_lora_targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # stand-in for trained weights, B included
    save_lora(spec, transformer, tmp_path)

    inputs = {"hidden_states": torch.randn(1, 3, 4, 4, 4), "encoder_hidden_states": torch.randn(1, 16, 32),
              "timestep": torch.tensor([300]),
              "image_rotary_emb": spec.rotary_embeddings(dict(transformer.config), 3, 4, 4, torch.device("cpu"))}
    with torch.no_grad():
        ours = transformer(**inputs, return_dict=False)[0]
        pipe = CogVideoXPipeline.from_pretrained(tiny_cog)
        base = pipe.transformer(**inputs, return_dict=False)[0]
        pipe.load_lora_weights(tmp_path)
        loaded = pipe.transformer(**inputs, return_dict=False)[0]
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-5)

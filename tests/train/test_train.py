"""`ft train` through the CLI on precomputed shards of the tiny CogVideoX: a seed reproduces a run, gradient
accumulation and a bf16 base run, shards of another family or shape and bad flags are refused naming the flag, the
loader's batches and background reader, and the saved LoRA is what diffusers runs. The run every family makes
(the loss falls, the LoRA loads in diffusers, generate with and without it) is test_lora_families.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from ft.common.shards import Manifest, load_manifest
from helpers import run_cli, train

# what this file's runs share besides the run's own flags
RUN = ["--rank", "8", "--lora-alpha", "16", "--batch-size", "2", "--lr-warmup-steps", "0"]


def test_training_is_reproducible_with_a_seed(tiny_cog, cog_shards, tmp_path):
    a = train("cogvideox", tiny_cog, cog_shards, tmp_path / "a", *RUN, "--train-steps", "3", "--seed", "5")
    b = train("cogvideox", tiny_cog, cog_shards, tmp_path / "b", *RUN, "--train-steps", "3", "--seed", "5")
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
        manifest = load_manifest(shards)
        setattr(manifest, field, value)
        manifest.save(shards)
        with pytest.raises(UserError, match=message):
            train("cogvideox", tiny_cog, shards, tmp_path / "out", *RUN, "--train-steps", "1")


def test_user_errors_name_the_flag(tiny_cog, cog_shards, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(UserError, match="--batch-size 64"):
        train("cogvideox", tiny_cog, cog_shards, out, *RUN, "--train-steps", "1", "--batch-size", "64")
    with pytest.raises(UserError, match="--target-modules"):
        train("cogvideox", tiny_cog, cog_shards, out, *RUN, "--train-steps", "1", "--target-modules", "no_such_layer")
    with pytest.raises(UserError, match="--training-type"):
        train("cogvideox", tiny_cog, cog_shards, out, *RUN, "--training-type", "dreambooth")
    with pytest.raises(UserError, match="no such shard folder"):
        train("cogvideox", tiny_cog, tmp_path / "nothing", out, *RUN)
    with pytest.raises(UserError, match="--lora"):
        run_cli(["generate", "--model", "cogvideox", "--pretrained", tiny_cog, "--prompt", "x", "--lora", tmp_path])


def test_a_bucket_too_small_for_a_batch_never_repeats_a_sample(tmp_path):
    from ft.common.shards import ShardWriter
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
    from ft.train.lora_formats import LoraPlan

    spec = get_spec("cogvideox")
    transformer = spec.load_component("transformer", ModelArgs(model="cogvideox", pretrained=str(tiny_cog),
                                                                transformer_dtype="fp32"))
    params = add_lora(transformer, rank=4, alpha=12, target_modules=spec.default_lora_targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # stand-in for trained weights, B included
    plan = LoraPlan.make(spec, dict(transformer.config), 4, 12, [], str(tiny_cog), "diffusers")
    save_lora(plan, transformer, tmp_path, steps=0)

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

"""Validation during training on the tiny CogVideoX: prompts precomputed in stage 1, videos every N steps through
the pipeline around the live transformer (no text encoder in the trainer), and the run's weights untouched."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from ft.common.shards import iter_shard, load_manifest
from helpers import FP32, BuiltClasses, run_cli, train, train_log

STEPS = ["--num-inference-steps", "2"]


def validation_file(folder, rows, name="validation.json"):
    path = folder / name
    path.write_text(json.dumps({"data": rows}))
    return path


# what this file's runs share besides the run's own flags
RUN = ["--rank", "4", "--lora-alpha", "8", "--batch-size", "2", "--lr-warmup-steps", "0", "--lr", "1e-3",
       "--seed", "1"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, shapes_data):
    """Two prompts: one of the training captions (its stored conditioning must equal the sample's) and a new one."""
    caption = (shapes_data / "prompts.txt").read_text().splitlines()[0].strip()
    rows = [{"caption": caption, "image_path": None, "video_path": None, "num_inference_steps": 2, "height": 32,
             "width": 64, "num_frames": 9},
            {"caption": "a small bright square", "num_inference_steps": 2, "seed": 7}]
    return validation_file(tmp_path_factory.mktemp("validation"), rows), caption


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory, tiny_cog, shapes_data, cog_shards, prompts):
    """The session's CogVideoX shards with the validation prompts added by a second precompute run."""
    from ft.precompute import encoder

    out = tmp_path_factory.mktemp("val-shards") / "cog"
    shutil.copytree(cog_shards, out)
    config = json.loads((out / "precompute_config.json").read_text())
    loads = []
    original = encoder.Models.vae

    def counting_vae(self):  # the real loader, counted
        loads.append("vae")
        return original(self)

    encoder.Models.vae = counting_vae
    try:
        manifest = run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset",
                            shapes_data, "--out", out, "--buckets", *config["buckets"], "--batch-size", "2",
                            "--validation-dataset-file", prompts[0]])
    finally:
        encoder.Models.vae = original
    return out, manifest, loads


def test_precompute_adds_the_prompts_encoding_only_text(val_shards, prompts):
    from ft.common.shards.prompts import PromptTable

    out, manifest, loads = val_shards
    assert loads == []  # no clip was encoded again: only the text encoders ran
    assert manifest.prompts == {"folder": "prompts", "negative": PromptTable(out, manifest).key("")}
    table = PromptTable(out, load_manifest(out))
    assert table.missing([prompts[1], "a small bright square", ""]) == []
    # a validation prompt is keyed like a sample: the training caption's row IS the sample's conditioning
    sample = next(s for shard in manifest.shards for s in iter_shard(out / shard.name)
                  if s.meta["caption"] == prompts[1])
    assert sample.meta["text_key"] == table.key(prompts[1])
    stored = table.read(prompts[1])
    assert stored.keys() == sample.tensors["cond"].keys()
    assert all(torch.equal(stored[k], sample.tensors["cond"][k]) for k in stored)
    from ft.cli.inspect_shards import describe

    assert "prompt table   2 validation prompt(s) and the negative prompt, in prompts/" in describe(str(out))
    empty = load_file(out / manifest.empty_caption["file"])  # the older file caption dropout reads is the same
    assert all(torch.equal(table.negative()[k], empty[k]) for k in empty)


def test_a_damaged_prompt_file_is_refused(val_shards, tmp_path):
    from ft.common.shards.prompts import PromptTable

    out = tmp_path / "shards"
    shutil.copytree(val_shards[0], out)
    table = PromptTable(out, load_manifest(out))
    path = table.path(table.key(""))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is damaged.*digest"):
        table.negative()


def test_train_refuses_prompts_that_were_not_precomputed(tiny_cog, cog_shards, prompts, tmp_path):
    with pytest.raises(UserError, match=r"2 prompt\(s\) are not precomputed.*ft precompute --config .*"
                                        r"precompute_config.json --validation-dataset-file"):
        train("cogvideox", tiny_cog, cog_shards, tmp_path / "out", *RUN, "--train-steps", "1",
              "--validation-dataset-file", prompts[0])
    assert not (tmp_path / "out").exists()  # refused before anything was written


HUGE = {"caption": "a small bright square", "num_frames": 9, "height": 32768, "width": 32768}


def test_a_row_too_big_to_generate_is_refused_in_precompute_and_at_train_start(tiny_cog, shapes_data, val_shards,
                                                                              tmp_path):
    huge = validation_file(tmp_path, [{"caption": "a red circle"}, HUGE], "huge.json")
    # precompute: against the largest GPU ft estimate knows, before any encoder loads or any clip is probed
    with pytest.raises(UserError, match=r"huge.json row 2: num_frames 9, height 32768, width 32768: generating it "
                                        r"needs about [\d,.]+ GiB .*more than the 80 GiB of the largest GPU"):
        run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", shapes_data,
                 "--out", tmp_path / "shards", "--validation-dataset-file", huge])
    assert not (tmp_path / "shards").exists()
    # train start (the sizes come from the file given to train): against this machine's memory, before any weight
    with pytest.raises(UserError, match=r"huge.json row 2: .*height 32768.*more than this machine's memory .*Set the "
                                        r"row's num_frames, height and width columns .*or leave them out to generate "
                                        r"at 9x32x32"):
        train("cogvideox", tiny_cog, val_shards[0], tmp_path / "out", *RUN, "--validation-dataset-file", huge)
    assert not (tmp_path / "out").exists()


def test_a_bad_size_or_another_vae_is_refused_before_the_first_step(tiny_cog, val_shards, tmp_path):
    bad = validation_file(tmp_path, [{"caption": "x", "num_frames": 10}], "bad.json")
    with pytest.raises(UserError, match=r"bad.json row 1: num_frames 10.*4k\+1"):
        train("cogvideox", tiny_cog, val_shards[0], tmp_path / "out", *RUN, "--validation-dataset-file", bad)
    from ft.pipelines.registry import save_tiny_model

    other = save_tiny_model("cogvideox", tmp_path / "other", seed=5)
    good = validation_file(tmp_path, [{"caption": "a small bright square"}], "good.json")
    with pytest.raises(UserError, match=r"the VAE at .*other/vae is not the one .* (weights|config)"):
        train("cogvideox", tiny_cog, val_shards[0], tmp_path / "out", *RUN, "--validation-dataset-file", good,
              "--vae-id", other / "vae")


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_cog, val_shards, prompts):
    """Three steps with validation every 2 (steps 2 and 3), watched for text-encoder and tokenizer classes."""
    out = tmp_path_factory.mktemp("validated") / "out"
    with BuiltClasses() as built:
        summary = train("cogvideox", tiny_cog, val_shards[0], out, *RUN, "--train-steps", "3",
                        "--validation-dataset-file", prompts[0], "--validation-steps", "2")
    return out, summary, built


def test_videos_at_the_right_steps_with_their_frames_and_size(validated, prompts):
    from ft.precompute.media import open_media

    out, summary, _ = validated
    folders = sorted(p.name for p in (out / "validation").iterdir())
    assert folders == ["step-000002", "step-000003"]
    for folder in folders:
        videos = sorted((out / "validation" / folder).glob("*.mp4"))
        assert [v.name[:3] for v in videos] == ["00-", "01-"]
        sizes = [(m.num_frames, m.height, m.width) for m in map(open_media, videos)]
        assert sizes == [(9, 32, 64), (9, 32, 32)]  # the row's size; the second takes the first video bucket
        assert open_media(videos[0]).read(list(range(9))).std() > 0
        from PIL import Image

        assert Image.open(out / "validation" / folder / "contact_sheet.png").size[1] > 2 * 32
    validation = [r for r in train_log(out) if "validation" in r]
    assert [r["step"] for r in validation] == [2, 3]
    files = validation[0]["validation"]["videos"]
    assert [f["caption"] for f in files] == [prompts[1], "a small bright square"]
    assert (files[1]["seed"], files[1]["num_inference_steps"], files[1]["guidance_scale"]) == (7, 2, 6)
    assert (out / files[0]["file"]).is_file() and summary["validation"].endswith("step-000003")


@pytest.mark.slow
def test_a_kill_during_validation_leaves_no_half_folder_and_the_resumed_run_makes_it(validated, tiny_cog,
                                                                                     val_shards, prompts, tmp_path):
    import signal

    from helpers import finish, start

    out = tmp_path / "out"
    argv = ["train", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--shards", val_shards[0],
            "--output-dir", out, "--rank", "4", "--lora-alpha", "8", "--batch-size", "2", "--lr-warmup-steps", "0",
            "--lr", "1e-3", "--seed", "1", "--train-steps", "3", "--validation-dataset-file", prompts[0],
            "--validation-steps", "2", "--checkpointing-steps", "2", "--report-to", "none"]
    code, err = finish(start(argv, FT_TEST_KILL_AT="validation-video:1"))  # step 2: one of its two videos written
    assert code == -signal.SIGKILL, err[-3000:]
    assert (out / "checkpoints" / "checkpoint-000002").is_dir()
    assert not (out / "validation" / "step-000002").exists()  # no folder that looks done
    assert len(list((out / "validation" / ".step-000002.tmp").glob("*.mp4"))) == 1
    code, err = finish(start([*argv, "--resume-from-checkpoint", "latest"]))
    assert code == 0, err[-3000:]
    assert "step 2: its validation was cut short by the stop; making it again" in err
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002", "step-000003"]
    from ft.precompute.media import open_media

    for step in ("step-000002", "step-000003"):  # whole: the files of the run that was never stopped
        made, straight = out / "validation" / step, validated[0] / "validation" / step
        assert sorted(p.name for p in made.iterdir()) == sorted(p.name for p in straight.iterdir())
        assert [open_media(v).num_frames for v in sorted(made.glob("*.mp4"))] == [9, 9]
    assert not list((out / "validation").glob(".*"))


def test_no_text_encoder_or_tokenizer_is_built_in_training(validated):
    from ft.pipelines.tiny import t5_tokenizer, tiny_t5_encoder

    _, _, built = validated
    assert built == []
    with BuiltClasses() as control:  # the recorder sees what the trainer would have built
        tiny_t5_encoder(t5_tokenizer())
    assert {"T5Tokenizer", "T5EncoderModel"} <= set(control), control


def test_tensorboard_holds_the_scalars_and_the_videos(validated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = validated
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"train/loss", "train/lr"} <= set(events.Tags()["scalars"])
    assert {"validation/00", "validation/01", "validation/contact_sheet"} <= set(events.Tags()["images"])
    gifs = events.Images("validation/01")
    assert [g.step for g in gifs] == [2, 3] and gifs[0].encoded_image_string[:4] == b"GIF8"
    assert (gifs[0].width, gifs[0].height) == (32, 32)


def test_validation_leaves_the_training_weights_as_a_run_without_it(validated, tiny_cog, val_shards, tmp_path):
    out, summary, _ = validated
    plain = train("cogvideox", tiny_cog, val_shards[0], tmp_path / "plain", *RUN, "--train-steps", "3")
    assert plain["last_loss"] == summary["last_loss"]
    a, b = load_file(out / "pytorch_lora_weights.safetensors"), load_file(
        tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_samples_through_the_same_code(validated, tiny_cog, val_shards, tmp_path):
    """`ft generate` with the LoRA and the validation row's settings makes the validation video of the last step."""
    from ft.precompute.media import open_media

    out, _, _ = validated
    run_cli(["generate", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--lora", out, "--prompt",
             "a small bright square", "--num-frames", "9", "--height", "32", "--width", "32", *STEPS, "--seed", "7",
             "--out", tmp_path / "g.mp4"])
    generated = open_media(tmp_path / "g.mp4").read(list(range(9))).astype(int)
    validated_video = next((out / "validation" / "step-000003").glob("01-*.mp4"))
    # the same weights, embeddings, seed and sampler: equal up to the mp4 encoding of slightly different floats
    assert np.abs(generated - open_media(validated_video).read(list(range(9))).astype(int)).mean() < 2.0


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_prompts_split_across_ranks_without_a_hang(world):
    from ft.train.validation import assign_prompts

    signatures = [(2, 1), (2, 1), (30, 2), (2, 1), (30, 2)]
    slots = [assign_prompts(signatures, rank, world) for rank in range(world)]
    assert len({len(s) for s in slots}) == 1  # every rank runs as many generations
    for k in range(len(slots[0])):  # slot k costs every rank the same transformer calls
        assert len({signatures[s[k][0]] for s in slots}) == 1
    kept = sorted(i for s in slots for i, keep in s if keep)
    assert kept == list(range(len(signatures)))  # each prompt once

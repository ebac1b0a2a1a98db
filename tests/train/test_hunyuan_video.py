"""HunyuanVideo through the CLI: train (LoRA, full finetune, resume, a finetuned transformer) ->
generate, and what was trained loaded by diffusers' own HunyuanVideoPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.common.errors import UserError
from helpers import HUNYUAN_FP32, run_cli

PROMPT = "a red circle moving left to right on a dark background"


def train(model, shards, out, *extra):
    return run_cli(["train", "--model", "hunyuan_video", "--pretrained", model, *HUNYUAN_FP32, "--shards", shards,
                    "--output-dir", out, "--batch-size", "2", "--lr-warmup-steps", "0", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_hunyuan, hunyuan_shards):
    out = tmp_path_factory.mktemp("train-hunyuan") / "out"
    summary = train(tiny_hunyuan, hunyuan_shards, out, "--rank", "8", "--lora-alpha", "16", "--train-steps", "30",
                    "--lr", "3e-3", "--eval-batches", "4", "--seed", "0")
    return out, summary


def test_lora_training_lowers_the_loss(trained):
    out, summary = trained
    assert summary["steps"] == 30
    assert summary["eval_loss_after"] < 0.95 * summary["eval_loss_before"], summary
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)
    layers = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights}
    assert {"to_q", "add_q_proj", "to_add_out"} <= layers  # double-stream blocks' text projections too
    # finetrainers' regex: the double- and single-stream blocks, not the text token refiner (which has to_q too)
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in weights)
    assert not any("refiner" in k for k in weights)


def test_load_lora_weights_changes_the_pipelines_output(trained, tiny_hunyuan):
    from diffusers import HunyuanVideoPipeline

    out, _ = trained

    def render(pipe):  # the pipeline's own prompt encoding, with its default template
        return pipe(prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    pipe = HunyuanVideoPipeline.from_pretrained(tiny_hunyuan)  # fp32
    base = render(pipe)
    pipe.load_lora_weights(out)
    (adapter,) = pipe.get_active_adapters()
    loaded = pipe.transformer.peft_config[adapter]
    assert (loaded.r, loaded.lora_alpha) == (8, 16)
    # every trained weight arrived, the single-stream blocks' included: nothing dropped with a warning
    from peft.utils import get_peft_model_state_dict

    held = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(held) == len(saved)
    assert all(torch.equal(held[k.removeprefix("transformer.")], v) for k, v in saved.items())
    assert np.abs(render(pipe) - base).max() > 1e-3


def test_generate_writes_a_video_with_and_without_lora(trained, tiny_hunyuan, tmp_path):
    from ft.precompute.media import open_media

    out, _ = trained
    common = ["generate", "--model", "hunyuan-video", "--pretrained", tiny_hunyuan, *HUNYUAN_FP32, "--prompt",
              PROMPT, "--num-frames", "9", "--height", "32", "--width", "64", "--num-inference-steps", "2"]
    with_lora = open_media(run_cli([*common, "--lora", out, "--out", tmp_path / "lora.mp4"]))
    without = open_media(run_cli([*common, "--out", tmp_path / "base.mp4"]))
    assert (with_lora.num_frames, with_lora.height, with_lora.width) == (9, 32, 64)
    assert not np.array_equal(with_lora.read(list(range(9))), without.read(list(range(9))))


def test_generate_encodes_the_prompt_at_the_trained_text_length(trained, tiny_hunyuan, tmp_path):
    """The LoRA was trained on 32-token captions (HUNYUAN_TEXT): ft generate --lora encodes at 32, not the
    pipeline's 256, unless --max-sequence-length says otherwise; a LoRA moved away from its run keeps the default."""
    import shutil

    from ft.pipelines.registry import get_spec
    from ft.train.generate import GenerateConfig, text_length

    out, _ = trained
    spec = get_spec("hunyuan_video")
    tconfig = spec.load_config("transformer", GenerateConfig(model="hunyuan_video", pretrained=str(tiny_hunyuan),
                                                             prompt="x"))

    def length(**flags):
        return text_length(spec, GenerateConfig(model="hunyuan_video", pretrained=str(tiny_hunyuan), prompt="x",
                                                **flags), tconfig)

    assert length(lora=str(out)) == 32
    assert length(lora=str(out / "pytorch_lora_weights.safetensors")) == 32
    assert length(lora=str(out), max_sequence_length=48) == 48
    assert length() == 256
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "pytorch_lora_weights.safetensors", alone)
    assert length(lora=str(alone)) == 256


def test_full_finetune_loads_with_from_pretrained_and_a_resumed_run_equals_a_straight_one(
        tiny_hunyuan, hunyuan_shards, tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel

    flags = ["--training-type", "full-finetune", "--train-steps", "4", "--checkpointing-steps", "2", "--lr", "1e-3",
             "--seed", "3"]
    straight = train(tiny_hunyuan, hunyuan_shards, tmp_path / "straight", *flags)
    resumed = train(tiny_hunyuan, hunyuan_shards, tmp_path / "resumed", *flags, "--resume-from-checkpoint",
                    tmp_path / "straight" / "checkpoints" / "checkpoint-000002")
    assert straight["steps"] == resumed["steps"] == 4
    a = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "straight" / "transformer")
    b = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "resumed" / "transformer")
    base = HunyuanVideoTransformer3DModel.from_pretrained(tiny_hunyuan / "transformer")
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bitwise
    assert any(not torch.equal(sa[k], s0[k]) for k in sa)
    # ft generate takes the finetuned transformer as a component override
    video = run_cli(["generate", "--model", "hunyuan_video", "--pretrained", tiny_hunyuan, *HUNYUAN_FP32,
                     "--transformer-id", tmp_path / "straight" / "transformer", "--prompt", PROMPT, "--num-frames",
                     "1", "--height", "32", "--width", "32", "--num-inference-steps", "1", "--out",
                     tmp_path / "ft.mp4"])
    assert video.is_file()


def test_a_finetuned_transformer_in_its_own_folder_trains(trained, tiny_hunyuan, hunyuan_shards, tmp_path):
    """--pretrained BASE --transformer-id FINETUNE: the finetune's weights train (another loss on the same
    fixed-noise batches), the base's other components stay."""
    from ft.pipelines.registry import get_spec

    get_spec("hunyuan_video").tiny_components(seed=5)["transformer"].save_pretrained(tmp_path / "finetune")
    _, base_summary = trained
    summary = train(tiny_hunyuan, hunyuan_shards, tmp_path / "out", "--transformer-id", tmp_path / "finetune",
                    "--rank", "8", "--lora-alpha", "16", "--train-steps", "1", "--eval-batches", "4", "--seed", "0")
    assert summary["steps"] == 1 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert summary["eval_loss_before"] != pytest.approx(base_summary["eval_loss_before"])


def test_the_guidance_scale_acts_and_other_families_refuse_it(trained, tiny_hunyuan, hunyuan_shards, tiny_cog,
                                                              cog_shards, tmp_path):
    _, base_summary = trained  # --guidance-scale 1
    summary = train(tiny_hunyuan, hunyuan_shards, tmp_path / "g6", "--guidance-scale", "6", "--train-steps", "1",
                    "--eval-batches", "4", "--seed", "0")
    assert summary["eval_loss_before"] != pytest.approx(base_summary["eval_loss_before"])
    with pytest.raises(UserError, match="--guidance-scale 6.0: this CogVideoX transformer has no embedded guidance"):
        run_cli(["train", "--model", "cogvideox", "--pretrained", tiny_cog, "--shards", cog_shards, "--output-dir",
                 tmp_path / "cog", "--guidance-scale", "6"])


def test_a_negative_prompt_needs_true_cfg_and_acts_with_it(tiny_hunyuan, tmp_path):
    from ft.precompute.media import open_media

    common = ["generate", "--model", "hunyuan_video", "--pretrained", tiny_hunyuan, *HUNYUAN_FP32,
              "--prompt", "a red circle", "--num-frames", "5", "--height", "32", "--width", "32",
              "--num-inference-steps", "2"]
    with pytest.raises(UserError, match="--true-cfg-scale above 1"):
        run_cli([*common, "--negative-prompt", "blurry", "--out", tmp_path / "x.mp4"])
    plain = run_cli([*common, "--out", tmp_path / "plain.mp4"])
    guided = run_cli([*common, "--negative-prompt", "blurry", "--true-cfg-scale", "6", "--out", tmp_path / "cfg.mp4"])
    a, b = open_media(plain).read(list(range(5))), open_media(guided).read(list(range(5)))
    assert not np.array_equal(a, b)

"""HunyuanVideo's own training and generation facts through the CLI: which layers its LoRA takes, ft generate's
text length from the run, a finetuned transformer that trains in its own folder, the embedded guidance scale, and
true CFG with a negative prompt. Its LoRA run (the loss falls, the LoRA loads in HunyuanVideoPipeline, generate)
is test_lora_families.py's, and its full finetune with a resume test_full_finetune_families.py's."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from ft.common.errors import UserError
from helpers import HUNYUAN_FP32, run_cli, train

PROMPT = "a red circle moving left to right on a dark background"
# what this file's runs share besides the run's own flags
RUN = ["--batch-size", "2", "--lr-warmup-steps", "0"]


def test_the_lora_takes_both_streams_blocks_and_not_the_text_token_refiner(lora_run):
    out, _ = lora_run("hunyuan_video")
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    layers = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights}
    assert {"to_q", "add_q_proj", "to_add_out"} <= layers  # double-stream blocks' text projections too
    # finetrainers' regex: the double- and single-stream blocks, not the text token refiner (which has to_q too)
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in weights)
    assert not any("refiner" in k for k in weights)


def test_generate_encodes_the_prompt_at_the_trained_text_length(lora_run, tiny_hunyuan, tmp_path):
    """The LoRA was trained on 32-token captions (HUNYUAN_TEXT): ft generate --lora encodes at 32, not the
    pipeline's 256, unless --max-sequence-length says otherwise; a LoRA moved away from its run keeps the default."""
    import shutil

    from ft.pipelines.registry import get_spec
    from ft.train.generate import GenerateConfig, text_length

    out, _ = lora_run("hunyuan_video")
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


def test_a_finetuned_transformer_in_its_own_folder_trains(lora_run, tiny_hunyuan, hunyuan_shards, tmp_path):
    """--pretrained BASE --transformer-id FINETUNE: the finetune's weights train (another loss on the same
    fixed-noise batches), the base's other components stay."""
    from ft.pipelines.registry import get_spec

    get_spec("hunyuan_video").tiny_components(seed=5)["transformer"].save_pretrained(tmp_path / "finetune")
    _, base_summary = lora_run("hunyuan_video")
    summary = train("hunyuan_video", tiny_hunyuan, hunyuan_shards, tmp_path / "out", *RUN, "--transformer-id",
                    tmp_path / "finetune", "--rank", "8", "--lora-alpha", "16", "--train-steps", "1", "--eval-batches",
                    "4", "--seed", "0")
    assert summary["steps"] == 1 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert summary["eval_loss_before"] != pytest.approx(base_summary["eval_loss_before"])


def test_the_guidance_scale_acts_and_other_families_refuse_it(lora_run, tiny_hunyuan, hunyuan_shards, tiny_cog,
                                                              cog_shards, tmp_path):
    _, base_summary = lora_run("hunyuan_video")  # --guidance-scale 1
    summary = train("hunyuan_video", tiny_hunyuan, hunyuan_shards, tmp_path / "g6", *RUN, "--guidance-scale", "6",
                    "--train-steps", "1", "--eval-batches", "4", "--seed", "0")
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

"""Wan 2.2 A14B's two experts through the CLI on the tiny two-expert Wan: one precompute, then an `ft train
--expert high` and an `--expert low` run on the same shards. Each run loads only its expert, draws its timesteps on
its side of the boundary, lowers its fixed-noise loss and validates with the other expert's base weights; its LoRA
loads as diffusers loads it (load_into_transformer_2 for the low one) and changes the video; `ft generate --lora
--lora-2` samples as diffusers does; a resumed expert run ends bitwise equal to a straight one."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft.pipelines.wan import WanSpec
from helpers import BUCKETS, FP32, LORA_RUN, run_cli, train, train_log

PROMPT = "a red circle moving left to right on a dark background"
SIZE = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 4}
COMMON = ["--report-to", "none"]


@dataclass
class Runs:
    """What the module's one precompute and two expert runs did, phase by phase."""

    shards: Path
    outs: dict[str, Path] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    encoded: dict[str, int] = field(default_factory=dict)  # clips + captions through the encoders, per phase
    loaded: dict[str, list] = field(default_factory=dict)  # (component, subfolder) loaded, per phase
    timesteps: dict[str, list] = field(default_factory=dict)  # the integer timesteps the transformer was handed
    validation: dict[str, tuple] = field(default_factory=dict)  # (boundary_ratio, trained expert's component)


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_wan_a14b, shapes_data) -> Runs:
    """The real encoders, loads and predict, watched (wrapped, each calling the real method)."""
    root = tmp_path_factory.mktemp("a14b-runs")
    (root / "validation.json").write_text(json.dumps({"data": [{"caption": PROMPT, "num_inference_steps": 3,
                                                                "num_frames": 5, "height": 32, "width": 32}]}))
    result, phase = Runs(root / "shards"), ["precompute"]
    real = {name: getattr(WanSpec, name) for name in ("encode_video", "encode_prompts", "load_component", "predict",
                                                        "build_pipeline")}

    def count(n):
        result.encoded[phase[0]] = result.encoded.get(phase[0], 0) + n

    def encode_video(self, vae, frames):
        count(frames.shape[0])
        return real["encode_video"](self, vae, frames)

    def encode_prompts(self, encoders, prompts, length):
        count(len(prompts))
        return real["encode_prompts"](self, encoders, prompts, length)

    def load_component(self, component, args, device=None):
        if not component.startswith("tokenizer"):
            result.loaded.setdefault(phase[0], []).append((component, self._source(component, args)[1]))
        return real["load_component"](self, component, args, device)

    def predict(self, transformer, step, dtype):
        result.timesteps.setdefault(phase[0], []).extend(step.timesteps.long().tolist())
        return real["predict"](self, transformer, step, dtype)

    def build_pipeline(self, transformer, vae, scheduler, conditioning=None):
        pipe = real["build_pipeline"](self, transformer, vae, scheduler, conditioning)
        trained = next(n for n in ("transformer", "transformer_2") if getattr(pipe, n) is transformer)
        result.validation[phase[0]] = (pipe.config.boundary_ratio, trained)
        return pipe

    precompute = ["precompute", "--model", "wan", "--pretrained", tiny_wan_a14b, *FP32, "--dataset", shapes_data,
                  "--out", result.shards, *BUCKETS, "--batch-size", "2", "--validation-dataset-file",
                  root / "validation.json"]
    with pytest.MonkeyPatch.context() as patch:
        for name in real:
            patch.setattr(WanSpec, name, locals()[name])
        run_cli(precompute)
        digest = folder_digest(result.shards)
        for expert in ("high", "low"):
            phase[0] = expert
            result.outs[expert] = root / expert
            result.summaries[expert] = train(
                "wan", tiny_wan_a14b, result.shards, root / expert, *LORA_RUN, *COMMON, "--expert", expert,
                "--train-steps", "30", "--eval-batches", "4", "--validation-dataset-file", root / "validation.json",
                "--validation-steps", "30")
        assert folder_digest(result.shards) == digest  # the trainings wrote nothing into the shard set
        phase[0] = "rerun"
        run_cli(precompute)
    return result


def test_one_precompute_serves_both_experts(runs):
    """The VAE and UMT5 run once, in the one precompute; each expert run loads its own transformer and nothing else
    (high: transformer/, low: transformer_2/), and a rerun of the precompute encodes and loads nothing."""
    assert runs.encoded["precompute"] > 0 and set(runs.encoded) == {"precompute"}
    for expert, subfolder in (("high", "transformer"), ("low", "transformer_2")):
        other = "transformer_2" if expert == "high" else "transformer"
        # the run's transformer, then validation's VAE and the other expert's base weights
        assert runs.loaded[expert] == [("transformer", subfolder), ("vae", "vae"), ("transformer", other)]
    assert "rerun" not in runs.loaded


def test_each_experts_draws_stay_on_its_side_of_the_boundary(runs):
    """Every timestep each run handed its transformer (training steps and the fixed-noise loss) is one WanPipeline
    gives that expert: >= 875 for high, < 875 for low."""
    high, low = runs.timesteps["high"], runs.timesteps["low"]
    assert len(high) >= 60 and len(low) >= 60
    assert min(high) >= 875 and max(low) < 875
    assert len(set(low)) > 20  # drawn across the low-noise range, not pinned


def test_each_experts_lora_lowers_its_loss_and_loads_as_diffusers_loads_it(runs, tiny_wan_a14b):
    """The fixed-noise loss falls in each run; validation sampled with both experts (the trained one live); each
    LoRA loads with WanPipeline.load_lora_weights (load_into_transformer_2=True for low) into its expert only and
    changes the video; `ft generate --lora HIGH --lora-2 LOW` gives diffusers' frames (to the uint8 rounding)."""
    from diffusers import WanPipeline

    from ft.pipelines.registry import spec_for
    from ft.train.generate import GenerateConfig, generate_frames, load_pipeline_with_lora, resolve_size

    for expert, trained in (("high", "transformer"), ("low", "transformer_2")):
        summary = runs.summaries[expert]
        assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05, summary
        assert runs.validation[expert] == (0.875, trained)
        assert len(list((runs.outs[expert] / "validation").rglob("*.mp4"))) == 1

    def frames(pipe):
        return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **SIZE).frames[0]

    base = frames(WanPipeline.from_pretrained(tiny_wan_a14b))
    both = WanPipeline.from_pretrained(tiny_wan_a14b)
    both.load_lora_weights(runs.outs["high"])
    assert both.transformer.peft_config and not getattr(both.transformer_2, "peft_config", None)
    high_only = frames(both)
    both.load_lora_weights(runs.outs["low"], load_into_transformer_2=True, adapter_name="low")
    assert list(both.transformer_2.peft_config) == ["low"]
    theirs = frames(both)
    low = WanPipeline.from_pretrained(tiny_wan_a14b)
    low.load_lora_weights(runs.outs["low"], load_into_transformer_2=True)
    low_only = frames(low)
    for changed in (high_only, low_only, theirs):
        assert np.abs(changed - base).max() > 1e-3
    assert np.abs(theirs - high_only).max() > 1e-3 and np.abs(theirs - low_only).max() > 1e-3
    cfg = GenerateConfig(model="wan", pretrained=str(tiny_wan_a14b), transformer_dtype="fp32", vae_dtype="fp32",
                         text_encoder_dtype="fp32", lora=str(runs.outs["high"]), lora_2=str(runs.outs["low"]),
                         prompt=PROMPT, **SIZE)
    spec = spec_for(cfg)
    ours = generate_frames(spec, cfg, load_pipeline_with_lora(spec, cfg, "cpu"), resolve_size(spec, cfg))
    assert np.abs(ours.astype(np.float32) / 255 - theirs).max() <= 1 / 255 + 1e-6


def test_generate_refuses_an_experts_lora_given_for_the_other(runs, tiny_wan_a14b, tiny_wan, tmp_path, caplog):
    from ft.common.errors import UserError

    common = ["generate", "--model", "wan", *FP32, "--prompt", PROMPT, "--num-frames", "5", "--height", "32",
              "--width", "32", "--num-inference-steps", "2", "--out", tmp_path / "x.mp4"]
    with pytest.raises(UserError, match=r"--lora .*trained as the low-noise expert .*pass it as --lora-2"):
        run_cli([*common, "--pretrained", tiny_wan_a14b, "--lora", runs.outs["low"]])
    with pytest.raises(UserError, match=r"--lora-2 .*trained as the high-noise expert .*pass it as --lora\."):
        run_cli([*common, "--pretrained", tiny_wan_a14b, "--lora-2", runs.outs["high"]])
    with pytest.raises(UserError, match=r"--lora-2: --pretrained .* has one transformer"):
        run_cli([*common, "--pretrained", tiny_wan, "--lora-2", runs.outs["low"]])
    assert run_cli([*common, "--pretrained", tiny_wan_a14b, "--lora-2", runs.outs["low"]]).is_file()
    assert "the high-noise expert (--lora) samples without a LoRA" in caplog.text


def test_a_resumed_expert_run_ends_bitwise_equal_to_a_straight_one(runs, tiny_wan_a14b, tmp_path):
    """test_resume.py's check on the low-noise expert (transformer_2/, rejection-drawn timesteps): stopped at step 3
    and resumed, the run ends with the straight run's LoRA and losses, bitwise."""
    steps = ["--expert", "low", "--train-steps", "6", "--batch-size", "2", "--gradient-accumulation-steps", "2",
             "--lr", "3e-3", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1", "--seed", "9",
             "--checkpointing-steps", "3", "--rank", "4", "--lora-alpha", "8", *COMMON]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train("wan", tiny_wan_a14b, runs.shards, straight, *steps)
    log = train_log(straight)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-000003", resumed / "checkpoints" / "checkpoint-000003")
    (resumed / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:3]))
    train("wan", tiny_wan_a14b, runs.shards, resumed, *steps, "--resume-from-checkpoint", "latest")
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_log(resumed)] == [r["loss"] for r in log]
    assert json.loads((straight / "train_config.json").read_text())["expert"] == "low"
    from ft.common.errors import UserError

    with pytest.raises(UserError, match=r"trained --expert low, this run --expert high; resume it with --expert low"):
        train("wan", tiny_wan_a14b, runs.shards, resumed, *steps, "--expert", "high", "--resume-from-checkpoint",
              "latest")

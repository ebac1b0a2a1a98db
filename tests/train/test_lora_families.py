"""Each family's LoRA run end to end (CogVideoX, LTX-Video, HunyuanVideo, Wan; one parametrised test a step): LoRA
training lowers the fixed-noise loss; the LoRA is saved in diffusers' layout, loads into the family's own diffusers
pipeline with its rank, alpha and every weight, and changes that pipeline's output; `ft generate` writes the video
with and without it. The run is tests/train's `lora_run(family)`, which the family's own tests reuse."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import FAMILIES, LORA_RUNS, run_cli, train_log

PROMPT = "a red circle moving left to right on a dark background"


@dataclass(frozen=True)
class Family:
    pipeline: str  # diffusers' pipeline class of the family
    alias: str  # the name `ft generate --model` is given (another spelling than the registry's, where there is one)
    sampling_steps: int  # the pipeline's and ft generate's
    fps: float  # ft generate's mp4: the family's frame rate (LTXPipeline's frame_rate)
    loss_falls_below: float  # the fixed-noise loss after training is under this fraction of the loss before
    render: dict = field(default_factory=dict)  # the pipeline's call takes these besides
    config: dict = field(default_factory=dict)  # train_config.json holds these besides rank and alpha


CASES = {"cogvideox": Family("CogVideoXPipeline", "cogvideox", 3, 8.0, 0.95, {"max_sequence_length": 16}),
         "ltx_video": Family("LTXPipeline", "ltx", 2, 25.0, 1.0, config={"first_frame_conditioning_p": 0.5}),
         "hunyuan_video": Family("HunyuanVideoPipeline", "hunyuan-video", 2, 24.0, 0.95),
         "wan": Family("WanPipeline", "wan2.1", 2, 16.0, 0.95)}


@pytest.fixture(params=sorted(CASES))
def family(request):
    return request.param


def test_lora_training_lowers_the_fixed_noise_loss(family, lora_run):
    out, summary = lora_run(family)
    steps = LORA_RUNS[family][0]
    assert summary["steps"] == steps
    # the same eval batches, the same noise and timesteps, before and after training
    assert summary["eval_loss_after"] < CASES[family].loss_falls_below * summary["eval_loss_before"], summary
    log = train_log(out)
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert all(np.isfinite(r["loss"]) and r["lr"] == pytest.approx(3e-3) for r in log)


def test_the_lora_is_saved_in_diffusers_layout_with_its_run_config(family, lora_run):
    import json

    out, _ = lora_run(family)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert any(".to_q.lora_A." in k for k in weights) and any(".to_out.0.lora_B." in k for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained away from zero init
    config = json.loads((out / "train_config.json").read_text())
    assert config["rank"] == 8 and config["lora_alpha"] == 16 and config["shards"]
    assert {k: config[k] for k in CASES[family].config} == CASES[family].config


def test_load_lora_weights_changes_the_pipelines_output(family, lora_run, tiny_model):
    import diffusers
    from peft.utils import get_peft_model_state_dict

    out, _ = lora_run(family)
    case = CASES[family]

    def render(pipe):  # the pipeline's own prompt encoding (with its default template), scheduler and defaults
        return pipe(prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=case.sampling_steps,
                    generator=torch.Generator().manual_seed(0), output_type="np", **case.render).frames[0]

    pipe = getattr(diffusers, case.pipeline).from_pretrained(tiny_model(family))  # fp32
    base = render(pipe)
    pipe.load_lora_weights(out)
    (adapter,) = pipe.get_active_adapters()
    loaded = pipe.transformer.peft_config[adapter]
    assert (loaded.r, loaded.lora_alpha) == (8, 16)  # alpha travels in the metadata: the scale is what was trained
    held = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(held) == len(saved)  # every trained weight arrived: nothing dropped with a warning
    assert all(torch.equal(held[k.removeprefix("transformer.")], v) for k, v in saved.items())
    assert np.abs(render(pipe) - base).max() > 1e-3


def test_generate_writes_a_video_with_and_without_the_lora(family, lora_run, tiny_model, tmp_path):
    from ft.precompute.media import open_media

    out, _ = lora_run(family)
    case = CASES[family]
    _, dtypes, _ = FAMILIES[family]
    common = ["generate", "--model", case.alias, "--pretrained", tiny_model(family), *dtypes, "--prompt", PROMPT,
              "--num-frames", "9", "--height", "32", "--width", "64", "--num-inference-steps", case.sampling_steps]
    a = open_media(run_cli([*common, "--lora", out, "--out", tmp_path / "lora.mp4"]))
    b = open_media(run_cli([*common, "--out", tmp_path / "base.mp4"]))
    assert (a.num_frames, a.height, a.width, a.fps) == (9, 32, 64, case.fps)
    assert not np.array_equal(a.read(list(range(9))), b.read(list(range(9))))

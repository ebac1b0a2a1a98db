"""finetrainers' CogVideoX and Wan crush_smol examples (examples/training/sft/{cogvideox,wan}/crush_smol_lora/train.sh
in a-r-r-o-w/finetrainers) run through `ft precompute` and `ft train` on the tiny models.

The argument list is the script's, flag for flag, its validation flags included. Changed: the paths (model,
dataset config, validation file, output), the step counts (training, validation, inference), and the script's
training.json and validation.json, rewritten to a local folder in finetrainers' crush-smol layout (videos/,
videos.txt, prompt.txt) and to the tiny model's size. The script offers several parallel settings and uses DDP_2;
this test takes its DDP_1 line, since data-parallel degrees above 1 are not in ft yet (that refusal is tested
below). `--report_to wandb` needs wandb, which ft does not install; where it is missing the test reports to none
instead. With wandb installed (the dev extra) and no login here, the run logs offline (WANDB_MODE=offline, the fix
`ft train` names when there is no key).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ft.common.errors import UserError
from helpers import run_cli

REPORT_TO = "wandb" if importlib.util.find_spec("wandb") else "none"
REGEX = "(transformer_blocks|single_transformer_blocks).*(to_q|to_k|to_v|to_out.0)"
# examples/training/sft/wan/crush_smol_lora/train.sh: the same arrays but for the model and its LoRA targets
WAN = {"model_name": "wan", "regex": "blocks.*(to_q|to_k|to_v|to_out.0)"}


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def crush_smol_argv(model: Path, dataset_config: Path, output_dir: Path, steps: int,
                    parallel: str = "DDP_1", validation_file: Path | None = None, model_name: str = "cogvideox",
                    regex: str = REGEX) -> list[str]:
    """train.sh's arrays, in its order; only the paths and --train_steps are parameters (and, for another
    family's script, its --model_name and --target_modules)."""
    backend = "ptd"
    parallel_cmd = {
        "DDP_1": f"--parallel_backend {backend} --pp_degree 1 --dp_degree 1 --dp_shards 1 --cp_degree 1 --tp_degree 1",
        "DDP_2": f"--parallel_backend {backend} --pp_degree 1 --dp_degree 2 --dp_shards 1 --cp_degree 1 --tp_degree 1",
        "CP_2": f"--parallel_backend {backend} --pp_degree 1 --dp_degree 1 --dp_shards 1 --cp_degree 2 --tp_degree 1",
    }[parallel].split()
    model_cmd = ["--model_name", model_name, "--pretrained_model_name_or_path", str(model)]
    dataset_cmd = ["--dataset_config", str(dataset_config), "--dataset_shuffle_buffer_size", "10",
                   "--enable_precomputation", "--precomputation_items", "25", "--precomputation_once"]
    dataloader_cmd = ["--dataloader_num_workers", "0"]
    diffusion_cmd = ["--flow_weighting_scheme", "logit_normal"]
    training_cmd = ["--training_type", "lora", "--seed", "42", "--batch_size", "1", "--train_steps", str(steps),
                    "--rank", "32", "--lora_alpha", "32", "--target_modules", regex,
                    "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "--checkpointing_steps", "1000",
                    "--checkpointing_limit", "2", "--enable_slicing", "--enable_tiling"]
    optimizer_cmd = ["--optimizer", "adamw", "--lr", "5e-5", "--lr_scheduler", "constant_with_warmup",
                     "--lr_warmup_steps", "1000", "--lr_num_cycles", "1", "--beta1", "0.9", "--beta2", "0.99",
                     "--weight_decay", "1e-4", "--epsilon", "1e-8", "--max_grad_norm", "1.0"]
    validation_cmd = ["--validation_dataset_file", str(validation_file), "--validation_steps", "2"] if (
        validation_file) else []
    miscellaneous_cmd = ["--tracker_name", f"finetrainers-{model_name}", "--output_dir", str(output_dir),
                         "--init_timeout", "600", "--nccl_timeout", "600", "--report_to", REPORT_TO]
    return [*parallel_cmd, *model_cmd, *dataset_cmd, *dataloader_cmd, *diffusion_cmd, *training_cmd,
            *optimizer_cmd, *validation_cmd, *miscellaneous_cmd]


@pytest.fixture(scope="module")
def crush_smol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """finetrainers/crush-smol's layout (videos/*.mp4, videos.txt, prompt.txt) with LLM-style captions, and the
    example's training.json pointing at it with the tiny model's bucket."""
    from ft.cli.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("crush")
    data = make_shapes_dataset(root / "crush-smol", num_clips=3, frames=17, sizes=((32, 48),), seed=3)
    captions = (data / "prompts.txt").read_text().splitlines()
    (data / "prompts.txt").unlink()
    (data / "prompt.txt").write_text("".join(f"The video shows {c}\n" for c in captions))
    config = {"datasets": [{"data_root": str(data), "dataset_type": "video", "id_token": "PIKA_CRUSH",
                            "video_resolution_buckets": [[9, 32, 32]], "reshape_mode": "bicubic",
                            "remove_common_llm_caption_prefixes": True}]}
    (root / "training.json").write_text(json.dumps(config, indent=2))
    # the example's validation.json layout (finetrainers' examples), at the tiny model's size and 2 steps
    rows = [{"caption": f"PIKA_CRUSH {caption}", "image_path": None, "video_path": None, "num_inference_steps": 2,
             "height": 32, "width": 32, "num_frames": 9} for caption in captions[:2]]
    (root / "validation.json").write_text(json.dumps({"data": rows}, indent=2))
    return root


def test_crush_smol_example_runs_through_both_stages(crush_smol, tiny_cog, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # as the script exports
    monkeypatch.chdir(tmp_path)
    argv = crush_smol_argv(tiny_cog, crush_smol / "training.json", tmp_path / "out", steps=3,
                           validation_file=crush_smol / "validation.json")
    shards = tmp_path / "shards"
    manifest = run_cli(["precompute", *argv, "--out", shards])
    assert manifest.training_histogram() == {"9x32x32": 3} and not manifest.rejected
    assert manifest.encoding["resize_mode"] == "stretch" and manifest.encoding["frame_sampling"] == "uniform"
    from ft.common.shards import iter_shard

    samples = [s.meta for shard in manifest.shards for s in iter_shard(shards / shard.name)]
    assert all(m["caption"].startswith("PIKA_CRUSH a ") for m in samples), [m["caption"] for m in samples]
    assert all(m["frame_indices"] == [0, 2, 4, 6, 8, 10, 12, 14, 16] for m in samples)  # spread over 17 frames

    summary = run_cli(["train", *argv, "--shards", shards])
    assert summary["steps"] == 3
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        rank = f.get_tensor(next(k for k in keys if "lora_A" in k)).shape[0]
    assert rank == 32
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(f"transformer_blocks.0.attn1.{proj}.lora_A" in k for k in keys), keys
    steps = sorted(p.name for p in (tmp_path / "out" / "validation").iterdir())
    assert steps == ["step-000002", "step-000003"]  # every --validation_steps and at the last
    assert len(list((tmp_path / "out" / "validation" / "step-000003").glob("*.mp4"))) == 2


def test_the_wan_crush_smol_example_runs_through_both_stages(crush_smol, tiny_wan, tmp_path, monkeypatch):
    """finetrainers' sft/wan/crush_smol_lora script: its argument list and training.json carry over to Wan."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    argv = crush_smol_argv(tiny_wan, crush_smol / "training.json", tmp_path / "out", steps=2,
                           validation_file=crush_smol / "validation.json", **WAN)
    manifest = run_cli(["precompute", *argv, "--out", tmp_path / "shards"])
    assert manifest.model_family == "wan" and manifest.training_histogram() == {"9x32x32": 3}
    assert run_cli(["train", *argv, "--shards", tmp_path / "shards"])["steps"] == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(next(k for k in keys if "lora_A" in k)).shape[0] == 32
    for attn in ("attn1", "attn2"):  # the regex reaches self- and cross-attention of every block
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            assert any(f"blocks.1.{attn}.{proj}.lora_A" in k for k in keys), keys
    assert len(list((tmp_path / "out" / "validation" / "step-000002").glob("*.mp4"))) == 2


@pytest.mark.slow
def test_the_wan_example_with_cp_degree_2_runs_under_torchrun_as_one_process_does(crush_smol, tiny_wan, tmp_path):
    """The Wan script's argument list with `--cp_degree 2` (its ptd backend) under torchrun: each sample's sequence
    split over the 2 processes, validation generated by both together; the loss curve is the 1-process one
    (tests/train/test_context_parallel.py states the tolerance). finetrainers attends with ring attention; ft picks
    Ulysses for the tiny model's 2 heads (the same attention within float rounding)."""
    from helpers import torchrun, train_log

    runs = {}
    for parallel, nproc in (("DDP_1", 1), ("CP_2", 2)):
        out = tmp_path / parallel
        argv = crush_smol_argv(tiny_wan, crush_smol / "training.json", out, steps=2,
                               validation_file=crush_smol / "validation.json", parallel=parallel, **WAN)
        argv = [*argv, "--transformer_dtype", "fp32", "--report_to", "none"]
        if parallel == "DDP_1":
            run_cli(["precompute", *argv, "--out", tmp_path / "shards"])
            run_cli(["train", *argv, "--shards", tmp_path / "shards"])
        else:
            done = torchrun(nproc, ["train", *argv, "--shards", tmp_path / "shards"])
            assert done.returncode == 0, done.stderr[-3000:]
            assert "context parallel over 2 processes" in done.stderr
        assert len(list((out / "validation" / "step-000002").glob("*.mp4"))) == 2
        runs[parallel] = [r["loss"] for r in train_log(out) if "loss" in r]
    assert runs["CP_2"] == pytest.approx(runs["DDP_1"], rel=1e-5)


def test_the_scripts_other_settings_say_what_ft_lacks(crush_smol, tiny_cog, tmp_path):
    # its DDP_2 setting is ft train's own (torchrun starts the processes; tests/train/test_distributed.py runs it)
    from ft.cli.finetrainers import translate
    from ft.cli.main import command_configs

    argv = crush_smol_argv(tiny_cog, crush_smol / "training.json", tmp_path / "out", steps=3, parallel="DDP_2")
    (run,) = translate("train", [str(a) for a in argv] + ["--shards", str(tmp_path / "shards")], None,
                       command_configs()).runs
    assert run[run.index("--dp-degree") + 1] == "2" and run[run.index("--dp-shards") + 1] == "1"
    argv = crush_smol_argv(tiny_cog, crush_smol / "training.json", tmp_path / "out", steps=3)
    with pytest.raises(UserError, match="--validation_prompts: finetrainers v0.0.x's inline validation"):
        run_cli(["train", *argv, "--validation_prompts", "a cat", "--shards", tmp_path / "shards"])


def test_a_two_dataset_config_precomputes_both_from_the_console_script(crush_smol, tiny_cog, tmp_path):
    """The real entry point (standalone mode) runs every dataset's precompute, not only the first."""
    import os
    import subprocess
    import sys

    config = json.loads((crush_smol / "training.json").read_text())
    second = dict(config["datasets"][0], id_token="OTHER")
    config["datasets"].append(second)
    (tmp_path / "two.json").write_text(json.dumps(config))
    argv = ["precompute", "--model_name", "cogvideox", "--pretrained_model_name_or_path", str(tiny_cog),
            "--transformer_dtype", "fp32", "--vae_dtype", "fp32", "--text_encoder_dtype", "fp32",
            "--dataset_config", str(tmp_path / "two.json"), "--out", str(tmp_path / "shards")]
    result = subprocess.run([sys.executable, "-m", "ft.cli.main", *argv], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["0-crush-smol", "1-crush-smol"]


def test_the_wan_i2v_example_runs_through_both_stages(crush_smol, tmp_path, monkeypatch):
    """finetrainers' sft/wan_i2v/3dgs_dissolve script on a tiny Wan 2.1 I2V checkpoint: its arrays (rank 16, its lr
    and shuffle buffer), a training.json of its layout, and its validation.json's rows, which give each prompt a
    `video_path` whose first frame conditions it. Its `--compile_modules text_encoder image_encoder transformer vae`
    becomes ft's transformer alone (the encoders run in precompute), checked on the translation: compiling on this
    CPU would take minutes, so the run leaves the flag out."""
    from ft.cli.finetrainers import translate
    from ft.cli.main import command_configs
    from ft.pipelines.registry import save_tiny_model

    monkeypatch.chdir(tmp_path)
    model = save_tiny_model("wan:i2v", tmp_path / "wan-i2v")
    clip = sorted((crush_smol / "crush-smol" / "videos").glob("*.mp4"))[0]
    rows = [{"caption": "3DGS_DISSOLVE a red circle", "video_path": str(clip), "num_inference_steps": 2,
             "num_frames": 9, "height": 32, "width": 32}]
    (tmp_path / "validation.json").write_text(json.dumps({"data": rows}))
    argv = crush_smol_argv(model, crush_smol / "training.json", tmp_path / "out", steps=2,
                           validation_file=tmp_path / "validation.json", **WAN)
    argv[argv.index("--rank") + 1] = argv[argv.index("--lora_alpha") + 1] = "16"
    argv[argv.index("--lr") + 1] = "1e-4"
    manifest = run_cli(["precompute", *argv, "--out", tmp_path / "shards"])
    assert manifest.encoding["image"]["kind"] == "channel-concat" and manifest.encoding["image"]["image_encoder"]
    assert run_cli(["train", *argv, "--shards", tmp_path / "shards"])["steps"] == 2
    assert len(list((tmp_path / "out" / "validation" / "step-000002").glob("*.mp4"))) == 1
    compile_flags = ["--compile_modules", "text_encoder", "image_encoder", "transformer", "vae", "--compile_scopes",
                     "regional"]
    (run,) = translate("train", [*argv, *compile_flags, "--shards", str(tmp_path / "shards")], None,
                       command_configs()).runs
    assert [run[i + 1] for i, a in enumerate(run) if a == "--compile-modules"] == ["transformer"]

"""The `ft` command line as a user meets it: --help of every command, clear errors, spellings, config files, demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BUCKETS, FP32, run_cli

FT = [sys.executable, "-m", "ft.cli.main"]
COMMANDS = {
    "precompute": ["--dataset", "--buckets", "--frame-sampling", "--max-sequence-length", "--out"],
    "train": ["--shards", "--training-type", "--rank", "--lora-alpha", "--target-modules", "--train-steps",
              "--gradient-accumulation-steps", "--transformer-dtype", "--transformer-id", "--vae-id",
              "--tokenizer-2-id", "--text-encoder-3-dtype"],
    "generate": ["--prompt", "--lora", "--num-inference-steps", "--guidance-scale"],
    "estimate": ["--pretrained", "--buckets", "--training-type", "--rank", "--batch-size", "--dp-shards"],
    "demo": ["--workdir"],
    "inspect": ["--verify"],
    "models": [],
    "run": ["ft precompute ARGS", "ft train ARGS"],
}


def ft(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*FT, *map(str, args)], capture_output=True, text=True, env={
        **__import__("os").environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}, **kw)


def test_top_level_help_lists_every_command():
    result = ft("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = ft(command, "--help")
    assert result.returncode == 0, result.stderr
    for flag in COMMANDS[command]:
        assert flag in result.stdout, f"{command} --help does not mention {flag}"


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "ft"
    assert script.is_file()
    assert subprocess.run([script, "models"], capture_output=True, text=True).stdout.startswith("cogvideox")


def test_help_does_not_import_torch():
    code = "import sys, ft.cli.main; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.parametrize("argv,message", [
    (["precompute", "--model", "cogvideox", "--pretrained", "{model}", "--dataset", "{tmp}/nope", "--out", "{tmp}/o"],
     "--dataset {tmp}/nope: no such file or folder"),
    (["precompute", "--model", "cogvideox", "--pretrained", "{tmp}", "--dataset", "{data}", "--out", "{tmp}/o"],
     "has no vae/ folder"),
    (["precompute", "--model", "cogvideox", "--pretrained", "{model}", "--dataset", "{data}", "--out", "{tmp}/o",
      "--buckets", "10x32x32"], "--buckets 10x32x32: CogVideoX takes 4k+1 frames"),
    (["precompute", "--model", "cogvideox", "--pretrained", "{model}", "--dataset", "{data}", "--out", "{tmp}/o",
      "--buckets", "9x30x32"], "multiples of 16"),
    (["train", "--model", "sora", "--pretrained", "{model}", "--shards", "{tmp}", "--output-dir", "{tmp}/o"],
     "--model 'sora' is not a model family ft knows; use one of: cogvideox"),
    (["train", "--model", "cogvideox", "--pretrained", "{model}", "--shards", "{tmp}", "--output-dir", "{tmp}/o",
      "--transformer-dtype", "int8"], "--transformer-dtype 'int8' is not one of"),
    (["train", "--model", "cogvideox", "--pretrained", "{model}", "--shards", "{tmp}", "--output-dir", "{tmp}/o"],
     "has no manifest.json"),
])
def test_user_mistakes_get_a_clear_message_and_no_traceback(argv, message, tmp_path, tiny_cog, shapes_data):
    fill = {"model": tiny_cog, "tmp": tmp_path, "data": shapes_data}
    result = ft(*[a.format(**fill) for a in argv])
    assert result.returncode == 2, result.stderr
    assert message.format(**fill) in result.stderr
    assert "Traceback" not in result.stderr


def test_finetrainers_spellings_and_a_config_file(tmp_path, tiny_cog, cog_shards):
    config = tmp_path / "run.toml"
    config.write_text(f'model = "cogvideox"\npretrained = "{tiny_cog}"\ntransformer-dtype = "fp32"\n'
                      f'train_steps = 50\nrank = 4\nbatch_size = 2\n')
    summary = run_cli(["train", "--config", config, "--shards", cog_shards, "--output_dir", tmp_path / "out",
                       "--train_steps", "2", "--lr_warmup_steps", "0"])  # the flag overrides the file
    assert summary["steps"] == 2
    saved = (tmp_path / "out" / "train_config.json").read_text()
    assert '"rank": 4' in saved and '"transformer_dtype": "fp32"' in saved


def test_inspect_describes_and_verifies(cog_shards):
    result = ft("inspect", cog_shards, "--verify")
    assert result.returncode == 0, result.stderr
    for text in ("samples        10 in 1 shards", "training view  10 samples", "9x32x64", "1x32x32",
                 "rejected       0", "verified", "fingerprint"):
        assert text in result.stdout


def test_demo_runs_end_to_end(tmp_path):
    from ft.cli.demo import run_demo

    summary = run_demo(tmp_path / "demo", steps=30)
    for name in ("model/model_index.json", "data/videos.txt", "shards/manifest.json",
                 "out/pytorch_lora_weights.safetensors", "sample.mp4"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def test_precompute_accepts_each_dataset_layout(tmp_path, tiny_cog):
    from ft.cli.synthetic import make_shapes_dataset

    for layout in ("sidecar", "csv", "jsonl", "parquet"):
        data = make_shapes_dataset(tmp_path / layout, num_clips=2, num_images=1, layout=layout, seed=9)
        manifest = run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", data,
                            "--out", tmp_path / f"{layout}-shards", *BUCKETS])
        assert manifest.num_samples == 3 and not manifest.rejected, layout


def test_a_typo_in_a_config_file_is_an_error(tmp_path, tiny_cog, cog_shards):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: cogvideox\npretrained: {tiny_cog}\ntrain_step: 2\n")
    result = ft("train", "--config", config, "--shards", cog_shards, "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert "'train_step' is not a setting of this command; did you mean 'train-steps'?" in result.stderr


@pytest.mark.parametrize("size,message", [(["--height", "30"], "multiples of 16"),
                                          (["--num-frames", "10"], "4k+1 frames")])
def test_generate_checks_the_size_before_loading_anything(size, message, tiny_cog, tmp_path):
    result = ft("generate", "--model", "cogvideox", "--pretrained", tiny_cog, "--prompt", "x", "--out",
                tmp_path / "v.mp4", *size)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("flags,message", [(["--text-encoder-2-id", "x"], "--text-encoder-2-id: CogVideoX has no"),
                                           (["--text-encoder-3-dtype", "fp32"], "CogVideoX has no text_encoder_3"),
                                           (["--max-sequence-length", "8"], "takes exactly 16 text tokens")])
def test_flags_that_would_do_nothing_are_refused(flags, message, tiny_cog, shapes_data, tmp_path):
    result = ft("precompute", "--model", "cogvideox", "--pretrained", tiny_cog, "--dataset", shapes_data,
                "--out", tmp_path / "o", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr

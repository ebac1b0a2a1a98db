"""`ft demo`: the whole two-stage run on a tiny random model and a generated dataset, on a CPU, in minutes.

It builds a toy model of the family with random weights and a tokenizer made here, saves it as a diffusers folder,
writes real mp4 clips of moving shapes (and two stills) with captions, then runs `ft precompute`, `ft train` and
`ft generate` by parsing the very command lines it prints, so it exercises the same code a user's run does.
The runs use fp32 because bf16 convolutions are slow on CPUs; on a GPU the default bf16 applies.

`--model family:variant` runs one of a family's tiny variants (`ft demo --model cogvideox:i2v`: image-to-video
models train on each clip's first frame and generate from a still). `--model wan:a14b` (or `wan2.2-a14b`) demos
Wan 2.2 A14B's two experts (pipelines/wan_experts.py): a tiny two-transformer Wan, one
precompute, then `ft train --expert high` and `--expert low` one after the other on the same shards, and
`ft generate --lora out/high --lora-2 out/low`.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

from ft.common.logs import log

DEMO_PROMPT = "a red circle moving left to right on a dark background"
TWO_EXPERT_DEMOS = {"wan2.2-a14b": "wan:a14b", "wan2.2-t2v-a14b": "wan:a14b"}  # other names of the tiny variant


def _run(argv: list[str]) -> object:
    from .commands import invoke

    log.info("$ ft " + " ".join(shlex.quote(a) for a in argv))
    return invoke(argv, standalone=False)


def run_demo(workdir: str | Path = "demo-run", steps: int = 60, model: str = "cogvideox") -> dict:
    """Build a tiny random `model` (any family `ft models` lists), then precompute, train and generate."""
    from ft.pipelines.image import resolve_conditioning
    from ft.pipelines.registry import get_spec, save_tiny_model
    from ft.train.reporting import LOG_NAME
    from ft.train.weights_io import LORA_WEIGHTS_NAME

    from .synthetic import make_shapes_dataset

    family, _, variant = TWO_EXPERT_DEMOS.get(model.lower(), model).partition(":")  # `family:variant`
    spec = get_spec(family)  # an unknown family fails here, before anything is written
    model = f"{spec.name}:{variant}" if variant else spec.name
    started = time.time()
    wd = Path(workdir)
    model_dir, data, shards, out, sample = wd / "model", wd / "data", wd / "shards", wd / "out", wd / "sample.mp4"
    if not (model_dir / "model_index.json").is_file():
        log.info(f"building a tiny random {model} in {model_dir}")
        save_tiny_model(model, model_dir, seed=0)
    if not (data / "videos.txt").is_file():
        log.info(f"writing 12 clips and 2 stills of moving shapes to {data}")
        make_shapes_dataset(data, num_clips=12, frames=17, sizes=((32, 32), (32, 64)), num_images=2, seed=0)
    from ft.common.model_args import ModelArgs, is_processor

    spec = spec.for_checkpoint(ModelArgs(model=spec.name, pretrained=str(model_dir)))  # HunyuanVideo-I2V's own
    base = ["--model", spec.name, "--pretrained", str(model_dir)]
    fp32 = [a for c in (*spec.component_classes, *spec.image_component_classes)
            if not is_processor(c)
            for a in (f"--{c.replace('_', '-')}-dtype", "fp32")]
    index = json.loads((model_dir / "model_index.json").read_text())
    experts = bool(index.get("boundary_ratio"))  # Wan 2.2 A14B: each expert its own run
    configs = {c: json.loads((model_dir / c / "config.json").read_text()) for c in ("transformer", "vae")}
    # the buckets this model takes (CogVideoX-5b-I2V's layout takes only its sample size), and an image-to-video
    # model's first frame for `ft generate`
    buckets = [b for b in ("9x32x32", "9x32x64", "1x32x32")
               if spec.check_bucket(tuple(map(int, b.split("x"))), configs["vae"], configs["transformer"]) is None]
    image = [] if resolve_conditioning(spec, "auto", configs["transformer"], index, str(model_dir)) is None else [
        "--image", str(sorted(data.rglob("*.png"))[0])]
    _run(["precompute", *base, *fp32, "--dataset", str(data), "--out", str(shards),
          "--buckets", *buckets, "--batch-size", "2"])
    shutil.rmtree(out, ignore_errors=True)  # a rerun of the demo trains afresh (train refuses old checkpoints)
    runs = {expert: out / expert for expert in ("high", "low")} if experts else {"": out}
    summaries = {}
    for expert, run_out in runs.items():  # a two-expert model: each expert its own run on the same shards
        summaries[expert] = _run(["train", *base, *fp32, "--shards", str(shards), "--output-dir", str(run_out),
                                  *(["--expert", expert] if expert else []), "--training-type", "lora",
                                  "--train-steps", str(steps), "--rank", "16", "--lora-alpha", "16", "--lr", "2e-3",
                                  "--lr-warmup-steps", "5", "--batch-size", "2", "--eval-batches", "4", "--seed",
                                  "0"])
    loras = ["--lora", str(runs["high"]), "--lora-2", str(runs["low"])] if experts else ["--lora", str(out)]
    _run(["generate", *base, *fp32, *loras, "--prompt", DEMO_PROMPT, *image, "--out", str(sample),
          "--num-frames", "9", "--height", "32", "--width", "32", "--num-inference-steps", "10"])
    if experts:
        for expert, summary in summaries.items():
            print(f"  expert {expert}: fixed-noise loss {summary['eval_loss_before']:.4f} before, "
                  f"{summary['eval_loss_after']:.4f} after ({runs[expert]})")
    out = list(runs.values())[-1]
    summary = {**summaries[list(runs)[-1]], **({"experts": summaries} if experts else {})}

    losses = [json.loads(line)["loss"] for line in (out / LOG_NAME).read_text().splitlines()]
    window = max(1, len(losses) // 6)
    curve = [sum(losses[i : i + window]) / len(losses[i : i + window]) for i in range(0, len(losses), window)]
    assert isinstance(summary, dict)
    print(f"\nft demo done in {time.time() - started:.0f}s")
    print(f"  model    {model_dir}   (a diffusers folder: tiny {model}, random weights)")
    print(f"  data     {data}   (videos.txt + prompts.txt, real mp4 clips)")
    print(f"  shards   {shards}   (`ft inspect {shards}` describes them)")
    print(f"  out      {out}   ({LORA_WEIGHTS_NAME}, {LOG_NAME})")
    print(f"  sample   {sample}   (\"{DEMO_PROMPT}\")")
    print(f"  training loss, mean of each {window} steps: " + " -> ".join(f"{x:.3f}" for x in curve))
    print(f"  fixed-noise loss on 4 batches: {summary['eval_loss_before']:.4f} before, "
          f"{summary['eval_loss_after']:.4f} after")
    return summary

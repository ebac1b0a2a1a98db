"""`ft demo`: the whole two-stage run on a tiny random model and a generated dataset, on a CPU, in minutes.

It builds a toy model of the family with random weights and a tokenizer made here, saves it as a diffusers folder,
writes real mp4 clips of moving shapes (and two stills) with captions, then runs `ft precompute`, `ft train` and
`ft generate` by parsing the very command lines it prints, so it exercises the same code a user's run does.
The runs use fp32 because bf16 convolutions are slow on CPUs; on a GPU the default bf16 applies.

`--model wan2.2-a14b` demos Wan 2.2 A14B's two experts (pipelines/wan_experts.py): a tiny two-transformer Wan, one
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
TWO_EXPERT_DEMOS = {"wan2.2-a14b": "wan", "wan2.2-t2v-a14b": "wan"}  # demo name -> family (tiny_a14b_components)


def _run(argv: list[str]) -> object:
    from .commands import invoke

    log.info("$ ft " + " ".join(shlex.quote(a) for a in argv))
    return invoke(argv, standalone=False)


def run_demo(workdir: str | Path = "demo-run", steps: int = 60, model: str = "cogvideox") -> dict:
    """Build a tiny random `model` (any family `ft models` lists), then precompute, train and generate."""
    from ft.pipelines.registry import get_spec, save_tiny_model
    from ft.train.reporting import LOG_NAME
    from ft.train.weights_io import LORA_WEIGHTS_NAME

    from .synthetic import make_shapes_dataset

    experts = model.lower() in TWO_EXPERT_DEMOS
    spec = get_spec(TWO_EXPERT_DEMOS.get(model.lower(), model))  # an unknown family fails here, before any write
    model = spec.name
    started = time.time()
    wd = Path(workdir)
    model_dir, data, shards, out, sample = wd / "model", wd / "data", wd / "shards", wd / "out", wd / "sample.mp4"
    if not (model_dir / "model_index.json").is_file():
        log.info(f"building a tiny random {model}{' with two experts' if experts else ''} in {model_dir}")
        if experts:
            from diffusers import WanPipeline

            from ft.pipelines.wan_experts import tiny_a14b_components

            WanPipeline(**tiny_a14b_components(0)).save_pretrained(model_dir)
        else:
            save_tiny_model(model, model_dir, seed=0)
    if not (data / "videos.txt").is_file():
        log.info(f"writing 12 clips and 2 stills of moving shapes to {data}")
        make_shapes_dataset(data, num_clips=12, frames=17, sizes=((32, 32), (32, 64)), num_images=2, seed=0)
    base = ["--model", model, "--pretrained", str(model_dir)]
    fp32 = [a for c in spec.component_classes if not c.startswith("tokenizer")
            for a in (f"--{c.replace('_', '-')}-dtype", "fp32")]
    _run(["precompute", *base, *fp32, "--dataset", str(data), "--out", str(shards),
          "--buckets", "9x32x32", "9x32x64", "1x32x32", "--batch-size", "2"])
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
    _run(["generate", *base, *fp32, *loras, "--prompt", DEMO_PROMPT, "--out", str(sample),
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

"""Peak memory and s/step of `ft train` at real model size, fed from shards: the number to hold against
finetrainers' published one. Run by bench/gpu.sh on a CUDA machine; `--tiny` runs the same code on a CPU.

    python bench/gpu_step.py --model cogvideox --pretrained THUDM/CogVideoX-5b --bucket 49x480x720 --rank 128
    python bench/gpu_step.py --tiny      # the tiny model on the CPU: checks the script, measures nothing useful

What runs is `ft train` itself (LoRA, batch 1, gradient checkpointing, bf16), in this process so that the CUDA
peak can be read after it. Its inputs are made here, without a download:
- the model folder: the checkpoint's real transformer configuration (its spec's `checkpoints`) with random
  weights made on the device in bf16 and saved, beside the family's training scheduler config;
- the shards: synthetic samples of the real shapes (`ft estimate`'s latent and conditioning shapes) written with
  ShardWriter, and a manifest as `ft precompute` writes it (family, VAE config, shapes).
Step time and the share of it spent waiting for data come from the run's train_log.jsonl (after --warmup steps);
peak memory is CUDA's max allocated and max reserved over the training run (peak RSS on a CPU).
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import tempfile
from pathlib import Path
from typing import Any

import torch

from ft.common.cli import invoke
from ft.common.shards import Manifest, ShardWriter
from ft.pipelines.base import ModelSpec, import_class
from ft.pipelines.estimate import EstimateConfig, conditioning_shapes, estimate
from ft.pipelines.registry import get_spec, save_tiny_model

GB = 1e9
# finetrainers' published memory for CogVideoX-5b LoRA training with precomputed latents and embeddings.
PUBLISHED = {("cogvideox", "CogVideoX-5b"): ("finetrainers, CogVideoX-5b LoRA, precomputed", 20.7)}
TARGET = 0.9  # ours: at least 10% under the published max reserved


def write_shards(folder: Path, family: str, vae_config: dict, latent_shape: tuple[int, ...],
                 cond_shapes: dict[str, tuple[int, ...]], bucket: list[int], samples: int) -> Path:
    """Synthetic shards of the real shapes (bf16, random values) with a manifest like `ft precompute`'s."""
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, max_samples=16)
    for i in range(samples):
        latents = {"mean": torch.randn(latent_shape, generator=g).bfloat16(),
                   "logvar": torch.full(latent_shape, -6.0).bfloat16()}
        cond = {name: torch.randn(shape, generator=g).bfloat16() for name, shape in cond_shapes.items()}
        key = f"{i:032x}"
        writer.write(key, {"latents": latents, "cond": cond},
                     {"key": key, "caption": f"synthetic sample {i}", "source": f"synthetic/{i}.mp4", "source_fps": 8.0,
                      "frame_indices": list(range(bucket[0])), "bucket": bucket, "latent_shape": list(latent_shape),
                      "model_family": family})
    writer.finish_shard()
    shapes = {"latent_channels": latent_shape[0], **{k: list(v) for k, v in cond_shapes.items()}}
    Manifest(model_family=family, encoders={"vae": {"config": vae_config}}, encoder_fingerprint="synthetic",
             encoding={}, shapes=shapes, shards=writer.completed, complete=True).save(folder)
    return folder


def save_random_transformer(spec: ModelSpec, config: dict, folder: Path, device: torch.device) -> None:
    """The real-size transformer with random weights, made on `device` in bf16 (no fp32 copy) and saved."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = import_class(*spec.component_classes["transformer"]).from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder / "transformer")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def meta_config(module: str, cls_name: str, config: dict) -> dict:
    """A component's full config (the class defaults filled in), without building it."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return json.loads(json.dumps(dict(import_class(module, cls_name).from_config(config).config), default=list))


def prepare(args: argparse.Namespace, root: Path) -> tuple[str, str, Any]:
    """Write the model folder and the shards; returns (display name, family name, the estimate or None)."""
    spec = get_spec(args.model)
    bucket = [int(x) for x in args.bucket.split("x")]
    if args.tiny:
        save_tiny_model(spec.name, root / "model")
        tiny = spec.tiny_components()
        tconfig = dict(tiny["transformer"].config)
        vae_config = json.loads(json.dumps(dict(tiny["vae"].config), default=list))
        latent_shape = tuple(spec.encode_video(tiny["vae"], torch.zeros(1, 3, *bucket))["mean"].shape[1:])
        cond_shapes = {k: shape for k, (shape, _) in conditioning_shapes(spec, tconfig).items()}
        name, est = "tiny", None
    else:
        ckpt = spec.find_checkpoint(args.pretrained)
        if ckpt is None:
            raise SystemExit(f"{args.pretrained}: not a checkpoint with built-in configs (the spec's checkpoints)")
        est = estimate(EstimateConfig(model=spec.name, pretrained=args.pretrained, buckets=[args.bucket],
                                      rank=args.rank))
        tconfig, name = dict(ckpt.configs["transformer"]), ckpt.display_name
        if args.layers:  # a shallow copy of the real width, to check this path on a CPU
            accepted = inspect.signature(import_class(*spec.component_classes["transformer"]).__init__).parameters
            tconfig.update({k: args.layers for k in ("num_layers", "num_single_layers") if k in accepted})
            name += f" ({args.layers} layer{'s' if args.layers > 1 else ''})"
        vae_config = meta_config(*spec.component_classes["vae"], ckpt.configs["vae"])
        latent_shape, cond_shapes = est.buckets[0].latent_shape, est.buckets[0].cond_shapes
        if not args.dry_run:
            save_random_transformer(spec, tconfig, root / "model", torch.device(args.device))
            spec.tiny_components()["scheduler"].save_pretrained(root / "model" / "scheduler")  # size-independent
    write_shards(root / "shards", spec.name, vae_config, latent_shape, cond_shapes, bucket, args.samples)
    return name, spec.name, est


def train(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """`ft train` on the prepared folders; returns the measured numbers."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    argv = ["train", "--model", args.model, "--pretrained", root / "model", "--shards", root / "shards",
            "--output-dir", root / "out", "--training-type", "lora", "--rank", args.rank, "--lora-alpha", args.rank,
            "--batch-size", 1, "--train-steps", args.warmup + args.steps, "--lr-warmup-steps", 0,
            "--checkpointing-steps", 0, "--report-to", "none", "--device", args.device,
            "--transformer-dtype", "fp32" if args.tiny else "bf16"]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    invoke([str(a) for a in argv], standalone=False)
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated() / GB, torch.cuda.max_memory_reserved() / GB
    else:
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    records = [json.loads(line) for line in (root / "out" / "train_log.jsonl").read_text().splitlines()]
    timed = [r for r in records if "seconds" in r and r["step"] > args.warmup]
    return {"allocated": allocated, "reserved": reserved, "s_per_step": sum(r["seconds"] for r in timed) / len(timed),
            "wait_share": sum(r["data_wait_share"] * r["seconds"] for r in timed) / sum(r["seconds"] for r in timed)}


def table(args: argparse.Namespace, name: str, family: str, est: Any, r: dict[str, Any]) -> str:
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (peak RSS)"
    lines = [f"`ft train` {name} LoRA r{args.rank}, batch 1, {args.bucket}, gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}, {'fp32' if args.tiny else 'bf16'}, fed from shards; "
             f"{args.steps} steps after {args.warmup} warm-up; {where}", "",
             "| run | peak allocated | peak reserved | s/step | waiting for data |", "|---|---|---|---|---|",
             f"| ft (measured) | {r['allocated']:.2f} GB | {r['reserved']:.2f} GB | {r['s_per_step']:.3f} | "
             f"{r['wait_share']:.1%} |"]
    if est is not None and not args.layers:
        gb = (est.train_static_bytes + est.buckets[0].activations_checkpointed) / GB
        lines.append(f"| `ft estimate` (static + activations, checkpointing on) | {gb:.2f} GB | | | |")
    published = PUBLISHED.get((family, name))
    if published:
        label, gb = published
        lines.append(f"| {label} | | {gb:.1f} GB | | |")
        verdict = "met" if r["reserved"] <= TARGET * gb else "NOT met"
        lines += ["", f"ours / published max reserved: {r['reserved'] / gb:.0%} (target <= {TARGET:.0%}: {verdict})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cogvideox")
    parser.add_argument("--pretrained", default="THUDM/CogVideoX-5b")
    parser.add_argument("--bucket", default="49x480x720")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16, help="synthetic samples written to the shards")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the family's tiny model at 9x32x32 (a CPU check)")
    parser.add_argument("--layers", type=int, default=0, help="only this many transformer blocks (a CPU check of "
                        "the real-width path); 0: all")
    parser.add_argument("--dry-run", action="store_true", help="write the real-shape shards only; build and train "
                        "nothing (a CPU check of the real-size path)")
    parser.add_argument("--save", default=None, help="also write the table to bench/results/<SAVE>.md")
    args = parser.parse_args()
    if args.tiny:
        args.bucket, args.rank, args.steps, args.warmup = "9x32x32", 4, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        name, family, est = prepare(args, root)
        if args.dry_run:
            manifest = Manifest.load(root / "shards")
            print(f"dry run: {manifest.num_samples} synthetic samples of {args.bucket} "
                  f"({manifest.num_bytes / 1e6:.1f} MB, shapes {manifest.shapes}) for {name}; nothing trained")
            return
        body = table(args, name, family, est, train(args, root))
    if args.save:
        from report import save_result

        save_result(args.save, body)
    else:
        print(body)


if __name__ == "__main__":
    main()

"""Peak memory and s/step of LoRA training at real model size, fed from shards: the number to hold against
finetrainers' published one. Run by bench/gpu.sh on a CUDA machine; `--tiny` runs the same code on a CPU.

    python bench/gpu_step.py --model cogvideox --pretrained THUDM/CogVideoX-5b --bucket 49x480x720 --rank 128
    python bench/gpu_step.py --tiny      # the tiny model on the CPU: checks the script, measures nothing useful

The transformer is the checkpoint's real configuration (pipelines/real_configs.py) with random weights made
directly on the device in bf16 (no download, no fp32 copy); LoRA (fp32) on the family's targets; gradient
checkpointing; batch 1. Synthetic shards of the real shapes (`ft estimate`'s latent and conditioning shapes) are
written with ShardWriter and streamed by ft's training loader with its background thread, and each step runs
the family's own stage-2 code (prepare_latents, sample_timesteps, forward) with AdamW, as `ft train` does.
Peak memory counts everything from before the model is built: CUDA max allocated and max reserved (RSS on a CPU).
"""

from __future__ import annotations

import argparse
import inspect
import resource
import tempfile
import time
from pathlib import Path

import torch

from ft.common.shards import Manifest, ShardWriter
from ft.pipelines.base import import_class
from ft.pipelines.estimate import EstimateConfig, estimate
from ft.pipelines.real_configs import find_checkpoint, get_family
from ft.pipelines.registry import SPECS
from ft.train.loader import ShardStream, background
from ft.train.lora import add_lora

GB = 1e9
# finetrainers' published memory for CogVideoX-5b LoRA training with precomputed latents and embeddings.
PUBLISHED = {("cogvideox", "CogVideoX-5b"): ("finetrainers, CogVideoX-5b LoRA, precomputed", 20.7)}
TARGET = 0.9  # ours: at least 10% under the published max reserved


def write_shards(folder: Path, latent_shape: tuple[int, ...], cond_shapes: dict[str, tuple[int, ...]],
                 bucket: list[int], samples: int, family: str) -> Manifest:
    """Synthetic shards of the real shapes (bf16 tensors, random values) and their manifest."""
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, max_samples=16)
    for i in range(samples):
        latents = {"mean": torch.randn(latent_shape, generator=g).bfloat16(),
                   "logvar": torch.full(latent_shape, -6.0).bfloat16()}
        cond = {name: torch.randn(shape, generator=g).bfloat16() for name, shape in cond_shapes.items()}
        writer.write(f"{i:032d}", {"latents": latents, "cond": cond}, {"bucket": bucket, "fps": 8.0})
    writer.finish_shard()
    manifest = Manifest(model_family=family, encoders={}, encoder_fingerprint="synthetic", encoding={}, shapes={},
                        shards=writer.completed)
    manifest.save(folder)
    return manifest


def build_transformer(module: str, cls_name: str, config: dict, device: torch.device) -> torch.nn.Module:
    """The real-size model with random weights, made on `device` in bf16 (no fp32 copy ever exists)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            return import_class(module, cls_name).from_config(config)
    finally:
        torch.set_default_dtype(default)


def peak_memory(device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / GB, torch.cuda.max_memory_reserved() / GB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return rss, rss


def run(args: argparse.Namespace) -> dict:
    family = get_family(args.model)
    if family.name not in SPECS:
        raise SystemExit(f"{family.display_name} has no ModelSpec yet: ft cannot train it, so there is nothing to "
                         "measure.")
    spec = SPECS[family.name]()
    device = torch.device(args.device)
    tiny = spec.tiny_components() if args.tiny else None
    scheduler = (tiny or spec.tiny_components())["scheduler"]  # the family's training schedule; size-independent
    module, cls_name = family.components["transformer"]
    if tiny:
        name, est, tconfig, vae_config = "tiny", None, dict(tiny["transformer"].config), dict(tiny["vae"].config)
        frames = torch.zeros(1, 3, *args.bucket_tuple)
        latent_shape = tuple(spec.encode_video(tiny["vae"], frames)["mean"].shape[1:])
        cond_shapes = {k: shape for k, (shape, _) in family.cond_shapes(tconfig).items()}
    else:
        ckpt = find_checkpoint(family.name, args.pretrained)
        if ckpt is None:
            raise SystemExit(f"{args.pretrained}: not a checkpoint with built-in configs (pipelines/real_configs.py)")
        est = estimate(EstimateConfig(model=family.name, pretrained=args.pretrained, buckets=[args.bucket],
                                      rank=args.rank))
        name, tconfig, vae_config = ckpt.display_name, dict(ckpt.configs["transformer"]), ckpt.configs["vae"]
        if args.layers:  # a shallow copy of the real width, to check this path on a CPU
            accepted = inspect.signature(import_class(module, cls_name).__init__).parameters
            tconfig.update({k: args.layers for k in ("num_layers", "num_single_layers") if k in accepted})
            name += f" ({args.layers} layer{'s' if args.layers > 1 else ''})"
        latent_shape, cond_shapes = est.buckets[0].latent_shape, est.buckets[0].cond_shapes
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_shards(Path(tmp), latent_shape, cond_shapes, list(args.bucket_tuple), args.samples,
                                family.name)
        batches = background(iter(ShardStream(tmp, manifest, batch_size=1, seed=0)))
        if args.dry_run:
            batch = next(batches)
            batches.close()
            shapes = {g: {k: tuple(v.shape) for k, v in group.items()} for g, group in
                      (("latents", batch.latents), ("cond", batch.cond))}
            print(f"dry run: {manifest.num_samples} synthetic samples ({manifest.num_bytes / 1e6:.1f} MB) streamed "
                  f"as {shapes}; {name} transformer config {module}.{cls_name}({tconfig}); not built, not trained")
            return {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        transformer = (tiny["transformer"].to(device) if tiny else
                       build_transformer(module, cls_name, tconfig, device))
        params = add_lora(transformer, args.rank, args.rank, spec.default_lora_targets)
        if args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        generator = torch.Generator(device).manual_seed(0)
        dtype = torch.float32 if args.tiny else torch.bfloat16
        times, waits = [], []
        for step in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            batch = next(batches).to(device)
            got = time.perf_counter()
            latents = spec.prepare_latents(batch.latents, vae_config, generator)
            noise = torch.randn(latents.shape, generator=generator, device=device)
            t = spec.sample_timesteps(scheduler, latents.shape[0], generator, device)
            prediction, target, weights = spec.forward(transformer, scheduler, latents, batch.cond, noise, t, dtype)
            loss = (weights.float().reshape(-1, 1, 1, 1, 1) * (prediction.float() - target.float()) ** 2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
                waits.append(got - start)
        batches.close()
    allocated, reserved = peak_memory(device)
    return {"name": name, "family": family.name, "allocated": allocated, "reserved": reserved,
            "s_per_step": sum(times) / len(times), "wait_share": sum(waits) / sum(times), "loss": loss.item(),
            "estimate": None if est is None or args.layers else
            (est.train_static_bytes + est.buckets[0].activations_checkpointed) / GB}


def table(args: argparse.Namespace, r: dict, device: torch.device) -> str:
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (peak RSS)"
    lines = [f"{r['name']} LoRA r{args.rank}, batch 1, {args.bucket}, gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}, {'fp32' if args.tiny else 'bf16'}, fed from shards; "
             f"{args.steps} steps after "
             f"{args.warmup} warm-up; {where}", "",
             "| run | peak allocated | peak reserved | s/step | waiting for data |", "|---|---|---|---|---|",
             f"| ft (measured) | {r['allocated']:.2f} GB | {r['reserved']:.2f} GB | {r['s_per_step']:.3f} | "
             f"{r['wait_share']:.1%} |"]
    if r["estimate"] is not None:
        lines.append(f"| `ft estimate` (static + activations, checkpointing on) | {r['estimate']:.2f} GB | | | |")
    published = PUBLISHED.get((r["family"], r["name"]))
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
    parser.add_argument("--dry-run", action="store_true", help="write and stream the real-shape shards; build and "
                        "train nothing (a CPU check of the real-size path)")
    parser.add_argument("--save", default=None, help="also write the table to bench/results/<SAVE>.md")
    args = parser.parse_args()
    if args.tiny:
        args.bucket, args.rank, args.steps, args.warmup = "9x32x32", 4, 2, 1
    args.bucket_tuple = tuple(int(x) for x in args.bucket.split("x"))
    device = torch.device(args.device)
    result = run(args)
    if not result:
        return
    body = table(args, result, device)
    if args.save:
        from report import save_result

        save_result(args.save, body)
    else:
        print(body)


if __name__ == "__main__":
    main()

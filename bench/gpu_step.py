"""Peak memory and s/step of `ft train` at real model size, fed from shards, one row per configuration: the
numbers to hold against finetrainers' published ones. Run by bench/gpu.sh on a CUDA machine; `--tiny` runs the
same rows on a CPU.

    python bench/gpu_step.py --model cogvideox --pretrained THUDM/CogVideoX-5b --bucket 49x480x720 --rank 128 \
        --rows lora-bf16 lora-fp8 --compile-rows lora-bf16
    python bench/gpu_step.py --tiny --rows lora-bf16 lora-fp8 lora-fp8-offload24 full-bf16 lora-bf16-aoff  # CPU

Rows (ROWS): LoRA in bf16; LoRA with fp8 storage of the frozen base (--layerwise-upcasting-modules transformer);
LoRA with fp8 storage and the fewest --offload-blocks that `ft estimate` says fit a 24 GB card; a full finetune
(bf16 weights, gradients and AdamW moments); LoRA in bf16 with --activation-offload (the checkpointed blocks'
inputs in pinned CPU memory: the long-sequence row, against lora-bf16 at the same bucket). A row listed in
--compile-rows is measured again with --compile-modules transformer (regional): its first step (compile included)
and its steady s/step.

What runs is `ft train` itself (batch 1, gradient checkpointing), in this process so that the CUDA peak can be
read after each row. Its inputs are made here, once per model, without a download:
- the model folder: the checkpoint's real transformer configuration (its spec's `checkpoints`) with random
  weights made on the device in bf16 (its init kernels run on the GPU: no CPU copy of 13B parameters) and saved,
  beside the family's training scheduler config; every row loads it as a user's run would;
- the shards: synthetic samples of the real shapes (`ft estimate`'s latent and conditioning shapes) written with
  ShardWriter, and a manifest as `ft precompute` writes it (family, VAE config, shapes).
Step time and the share of it spent waiting for data come from each run's train_log.jsonl (after --warmup steps,
and leaving out steps that compiled); peak memory is CUDA's max allocated and max reserved over the run (peak
RSS of the process on a CPU, which only grows). Each row is printed as soon as it is measured.
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

from ft.cli.estimate import EstimateConfig, conditioning_shapes, estimate
from ft.cli.main import invoke
from ft.common.shards import Manifest, ShardWriter, load_manifest, parse_bucket
from ft.pipelines.base import ModelSpec
from ft.pipelines.loading import import_class
from ft.pipelines.registry import get_spec, save_tiny_model
from ft.train.reporting import LOG_NAME

GB = 1e9
# (flags of `ft train`, flags of `ft estimate`) per row; "offload24" is resolved with ft estimate (offload_blocks)
ROWS: dict[str, dict[str, Any]] = {
    "lora-bf16": {"training": "lora", "fp8": False, "offload_fit_gib": None},
    "lora-fp8": {"training": "lora", "fp8": True, "offload_fit_gib": None},
    "lora-fp8-offload24": {"training": "lora", "fp8": True, "offload_fit_gib": 24},
    "full-bf16": {"training": "full-finetune", "fp8": False, "offload_fit_gib": None},
    "lora-bf16-aoff": {"training": "lora", "fp8": False, "offload_fit_gib": None, "activation_offload": True},
}
# finetrainers' published peaks (GB), precomputed latents and embeddings, gradient checkpointing: the LoRA
# minimums with fp8 storage (its README, LoRA rank 128 at 49x512x768; CogVideoX-5b at 49x480x720), and its
# CogVideoX-5b bf16 LoRA max reserved
PUBLISHED = {("cogvideox", "lora-bf16"): 20.7, ("cogvideox", "lora-fp8"): 18.0, ("ltx_video", "lora-fp8"): 5.0,
             ("hunyuan_video", "lora-fp8"): 32.0}
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
    bucket = list(parse_bucket(args.bucket))
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


def row_flags(args: argparse.Namespace, row: str, est_kwargs: dict[str, Any]) -> tuple[list[str], Any]:
    """The `ft train` flags of a row and its `ft estimate` (None for the tiny model)."""
    spec = ROWS[row]
    flags = ["--training-type", spec["training"]]
    kwargs = dict(est_kwargs, training_type=spec["training"])
    if spec["training"] == "lora":
        flags += ["--rank", str(args.rank), "--lora-alpha", str(args.rank)]
    if spec["fp8"]:
        flags += ["--layerwise-upcasting-modules", "transformer"]
        kwargs["layerwise_upcasting_modules"] = ["transformer"]
    if spec.get("activation_offload"):
        flags += ["--activation-offload"]
        kwargs["activation_offload"] = True
    est = estimate(EstimateConfig(**kwargs)) if kwargs.get("pretrained") else None
    if spec["offload_fit_gib"]:
        n = est.offload_to_fit(est.buckets[0], spec["offload_fit_gib"]) if est is not None else 1
        if n is None:
            raise SystemExit(f"{row}: ft estimate finds no --offload-blocks that fits {spec['offload_fit_gib']} GB")
        n = max(1, n)
        flags += ["--offload-blocks", str(n)]
        if est is not None:
            est = estimate(EstimateConfig(**kwargs, offload_blocks=n))
    return flags, est


def train(args: argparse.Namespace, root: Path, name: str, flags: list[str]) -> dict[str, Any]:
    """`ft train` on the prepared folders with a row's flags; returns the measured numbers."""
    import gc

    device = torch.device(args.device)
    out = root / f"out-{name}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    argv = ["train", "--model", args.model, "--pretrained", root / "model", "--shards", root / "shards",
            "--output-dir", out, "--batch-size", 1, "--train-steps", args.warmup + args.steps, "--lr-warmup-steps",
            0, "--checkpointing-steps", 0, "--report-to", "none", "--device", args.device, "--transformer-dtype",
            "fp32" if args.tiny else "bf16", *flags]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    summary = invoke([str(a) for a in argv], standalone=False)
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated() / GB, torch.cuda.max_memory_reserved() / GB
    else:
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    timed = [r for r in records if "seconds" in r and r["step"] > args.warmup and not r.get("graphs_compiled")]
    total = sum(r["seconds"] for r in timed)
    result = {"allocated": allocated, "reserved": reserved, "s_per_step": total / len(timed) if timed else None,
              "wait_share": sum(r["data_wait_share"] * r["seconds"] for r in timed) / total if timed else None,
              "first_step": records[0]["seconds"], "compile_seconds": (summary or {}).get("compile_seconds")}
    gc.collect()  # this row's model, optimizer and compiled code, before the next row's peak is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


HEADER = ["| row | flags | peak allocated | peak reserved | s/step | first step (compile) | waiting for data | "
          "`ft estimate` (checkpointing on) | finetrainers published |", "|---|---|---|---|---|---|---|---|---|"]


def row_line(family: str, row: str, compiled: bool, flags: list[str], est: Any, r: dict[str, Any]) -> str:
    pairs = [flags[i:i + 2] for i, f in enumerate(flags) if f.startswith("--")]
    shown = " ".join(" ".join(p) for p in pairs if p[0] not in ("--rank", "--lora-alpha") and p != ["--training-type",
                                                                                                 "lora"])
    estimated = f"{est.peak(est.buckets[0], True) / GB:.2f} GB" if est is not None else ""
    published = PUBLISHED.get((family, row))
    pub = f"{published:.1f} GB" if published and not compiled else ""
    first = f"{r['first_step']:.1f} s" + (f" ({r['compile_seconds']:.1f} s)" if compiled and r["compile_seconds"]
                                          else "")
    rate = f"{r['s_per_step']:.3f}" if r["s_per_step"] is not None else "-"
    wait = f"{r['wait_share']:.1%}" if r["wait_share"] is not None else "-"
    return (f"| {row}{' compiled' if compiled else ''} | {shown or '-'} | {r['allocated']:.2f} GB | "
            f"{r['reserved']:.2f} GB | {rate} | {first} | {wait} | {estimated} | {pub} |")


def verdicts(family: str, measured: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for (fam, row), gb in PUBLISHED.items():
        if fam == family and row in measured:
            ratio = measured[row]["reserved"] / gb
            lines.append(f"{row}: ours / finetrainers' published peak {ratio:.0%} (target <= {TARGET:.0%}: "
                         f"{'met' if ratio <= TARGET else 'NOT met'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cogvideox")
    parser.add_argument("--pretrained", default="THUDM/CogVideoX-5b")
    parser.add_argument("--bucket", default="49x480x720")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--rows", nargs="+", default=["lora-bf16"], choices=list(ROWS))
    parser.add_argument("--compile-rows", nargs="*", default=[], choices=list(ROWS),
                        help="rows measured again with --compile-modules transformer")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the compiled rows (aot_eager: a quick CPU check)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8, help="synthetic samples written to the shards")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the family's tiny model at 9x32x32 (a CPU check)")
    parser.add_argument("--layers", type=int, default=0, help="only this many transformer blocks (a CPU check of "
                        "the real-width path); 0: all")
    parser.add_argument("--dry-run", action="store_true", help="write the real-shape shards and print each row's "
                        "flags and estimate; build and train nothing (a CPU check of the real-size path)")
    parser.add_argument("--save", default=None, help="also write the table to bench/results/<SAVE>.md")
    args = parser.parse_args()
    if args.tiny:
        args.bucket, args.rank, args.steps, args.warmup = "9x32x32", 4, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        name, family, _ = prepare(args, root)
        est_kwargs = {} if args.tiny or args.layers else {"model": family, "pretrained": args.pretrained,
                                                          "buckets": [args.bucket], "rank": args.rank}
        where = (torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (peak RSS of the "
                 "process so far)")
        title = (f"`ft train` {name}, batch 1, {args.bucket}, gradient checkpointing "
                 f"{'on' if args.gradient_checkpointing else 'off'}, {'fp32' if args.tiny else 'bf16'} compute, fed "
                 f"from shards; {args.steps} steps after {args.warmup} warm-up; {where}")
        lines = [title, "", *HEADER]
        published_family = None if args.tiny or args.layers else family  # real size only
        if args.dry_run:
            manifest = load_manifest(root / "shards")
            print(f"dry run: {manifest.num_samples} synthetic samples of {args.bucket} "
                  f"({manifest.num_bytes / 1e6:.1f} MB, shapes {manifest.shapes}) for {name}; nothing trained")
            for row in args.rows:
                flags, est = row_flags(args, row, est_kwargs)
                peak = f"{est.peak(est.buckets[0], True) / GB:.2f} GB" if est is not None else "-"
                print(f"{row}: ft train {' '.join(flags)} (ft estimate: {peak}, fits {est.fits(est.buckets[0])} GiB)"
                      if est is not None else f"{row}: ft train {' '.join(flags)}")
            return
        print("\n".join(lines), flush=True)
        measured: dict[str, dict[str, Any]] = {}
        for row in args.rows:
            for compiled in (False, True) if row in args.compile_rows else (False,):
                flags, est = row_flags(args, row, est_kwargs)
                if compiled:
                    flags += ["--compile-modules", "transformer", "--compile-backend", args.compile_backend]
                r = train(args, root, f"{row}{'-compiled' if compiled else ''}", flags)
                if not compiled:
                    measured[row] = r
                line = row_line(published_family, row, compiled, flags, None if args.layers else est, r)
                print(line, flush=True)
                lines.append(line)
        tail = verdicts(published_family, measured)
        if tail:
            print("\n" + "\n".join(tail), flush=True)
            lines += ["", *tail]
    if args.save:
        from report import save_result

        save_result(args.save, "\n".join(lines))


if __name__ == "__main__":
    main()

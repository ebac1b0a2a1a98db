"""The `ft train` run: load the transformer only, add LoRA, stream shard batches, optimize, save.

The loss is the family's own objective (ModelSpec.forward gives prediction, target and per-sample weights):
mean over elements of weight * (prediction - target)^2, averaged over the batch. Gradient accumulation counts in
optimizer steps: `--train-steps` optimizer steps of `--gradient-accumulation-steps` micro-batches each.
Progress goes to a tqdm bar (loss, lr, s/step) and to OUT/train_log.jsonl, one JSON line per logged step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ft.common.config import to_jsonable
from ft.common.dtypes import parse_dtype
from ft.common.errors import UserError
from ft.common.logs import log, quiet_libraries
from ft.common.runtime import pick_device, seed_everything
from ft.common.shards import Manifest, open_shard_set
from ft.common.video import parse_bucket
from ft.pipelines.base import ModelSpec
from ft.pipelines.registry import spec_for

from .config import TrainConfig
from .loader import Batch, ShardStream, background
from .lora import add_lora, save_lora


def batch_loss(spec: ModelSpec, transformer: Any, scheduler: Any, batch: Batch, vae_config: dict,
               generator: Any, dtype: Any) -> Any:
    """Per-sample losses [B] of one batch: fresh latent draw, noise and timesteps from `generator`."""
    import torch

    latents = spec.prepare_latents(batch.latents, vae_config, generator)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    timesteps = spec.sample_timesteps(scheduler, latents.shape[0], generator, latents.device)
    prediction, target, weights = spec.forward(transformer, scheduler, latents, batch.cond, noise, timesteps, dtype)
    weights = weights.float().reshape(-1, *([1] * (prediction.ndim - 1)))
    return (weights * (prediction.float() - target.float()) ** 2).flatten(1).mean(1)


def fixed_loss(spec: ModelSpec, transformer: Any, scheduler: Any, batches: list[Batch], vae_config: dict,
               device: str, dtype: Any, seed: int) -> float:
    """Mean loss over `batches` with a fixed seed for latents, noise and timesteps: comparable across a run."""
    import torch

    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        losses = [batch_loss(spec, transformer, scheduler, b.to(device), vae_config, generator, dtype).mean().item()
                  for b in batches]
    return sum(losses) / max(1, len(losses))


def check_buckets_fit(spec: ModelSpec, manifest: Manifest, vae_config: dict, transformer_config: dict,
                     folder: str) -> None:
    """Every bucket in the shards must be one this transformer takes (a 1.5 transformer on 1.0 shards, say)."""
    for bucket in manifest.training_histogram():
        problem = spec.check_bucket(parse_bucket(bucket), vae_config, transformer_config)
        if problem:
            raise UserError(f"{folder} holds {bucket} samples, which this transformer cannot take: {problem}. "
                            "Precompute again with --buckets that fit it.")


def check_batches_possible(manifest: Manifest, batch_size: int, folder: str) -> None:
    histogram = manifest.training_histogram()
    usable = {b: n for b, n in histogram.items() if n >= batch_size}
    if not usable:
        raise UserError(f"--batch-size {batch_size}: no bucket of {folder} has that many samples "
                        f"({', '.join(f'{b}: {n}' for b, n in histogram.items())}); lower --batch-size.")
    for bucket, n in histogram.items():
        if n < batch_size:
            log.warning(f"bucket {bucket} has {n} samples, fewer than --batch-size {batch_size}; it is not used")


def build_optimizer(cfg: TrainConfig, params: list[Any]) -> tuple[Any, Any]:
    import torch
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  eps=cfg.epsilon)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.train_steps, num_cycles=cfg.lr_num_cycles)
    return optimizer, scheduler


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; returns a summary (steps, first/last loss, fixed-noise eval losses, paths)."""
    import torch
    from tqdm import tqdm

    spec = spec_for(cfg)
    shards = cfg.shards[0]  # one shard set until mixing lands
    manifest, _ = open_shard_set(shards)
    transformer_config = spec.load_config("transformer", cfg)
    spec.check_shards(manifest, transformer_config)
    vae_config = manifest.encoders.get("vae", {}).get("config", {})
    check_buckets_fit(spec, manifest, vae_config, transformer_config, shards)
    check_batches_possible(manifest, cfg.batch_size, shards)
    active = manifest.active_keys(shards)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(to_jsonable(cfg), indent=2) + "\n")

    quiet_libraries()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dtype = parse_dtype(cfg.transformer_dtype, "--transformer-dtype")
    if device.startswith("cuda"):  # the fp32 LoRA matmuls run on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    transformer = spec.load_component("transformer", cfg, device)
    scheduler = spec.load_scheduler(cfg)
    params = add_lora(transformer, cfg.rank, cfg.lora_alpha, cfg.target_modules or spec.default_lora_targets)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer, lr_schedule = build_optimizer(cfg, params)
    n_trainable = sum(p.numel() for p in params)
    n_samples = len(active) if active is not None else manifest.num_samples
    log.info(f"training {spec.display_name} LoRA rank {cfg.rank} ({n_trainable / 1e6:.2f}M parameters) on {device}, "
             f"{n_samples} samples in {len(manifest.shards)} shards")

    stream = ShardStream(shards, manifest, cfg.batch_size, cfg.seed, cfg.shuffle_buffer, active)
    batches = background(iter(stream))
    eval_set = [next(batches) for _ in range(cfg.eval_batches)]
    summary: dict[str, Any] = {"output_dir": str(out)}
    if eval_set:
        summary["eval_loss_before"] = fixed_loss(spec, transformer, scheduler, eval_set, vae_config, device, dtype,
                                                 cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    losses: list[float] = []
    log_file = open(out / "train_log.jsonl", "w")
    bar = tqdm(range(1, cfg.train_steps + 1), desc="train", unit="step")
    last = time.time()
    try:
        for step in bar:
            step_loss = 0.0
            for _ in range(cfg.gradient_accumulation_steps):
                batch = next(batches).to(device)
                epoch = batch.epoch
                loss = batch_loss(spec, transformer, scheduler, batch, vae_config, generator, dtype).mean()
                (loss / cfg.gradient_accumulation_steps).backward()
                step_loss += loss.item() / cfg.gradient_accumulation_steps
            if not math.isfinite(step_loss):
                raise UserError(f"step {step}: the loss is {step_loss}; training diverged. Lower --lr, or train "
                                "with --transformer-dtype fp32 to find the cause.")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else
                                                       float("inf")).item()
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.time()
            seconds, last = now - last, now
            losses.append(step_loss)
            lr = lr_schedule.get_last_lr()[0]
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
            if step % cfg.logging_steps == 0 or step == cfg.train_steps:
                log_file.write(json.dumps({"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                           "seconds": round(seconds, 4), "epoch": epoch}) + "\n")
                log_file.flush()
    finally:
        batches.close()  # stops the reader thread
        log_file.close()
        bar.close()
    transformer.eval()
    if eval_set:
        summary["eval_loss_after"] = fixed_loss(spec, transformer, scheduler, eval_set, vae_config, device, dtype,
                                                cfg.seed)
        log.info(f"fixed-noise loss on {len(eval_set)} batches: {summary['eval_loss_before']:.4f} -> "
                 f"{summary['eval_loss_after']:.4f}")
    if device.startswith("cuda"):
        summary["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        log.info(f"peak GPU memory {summary['peak_gpu_memory_gb']:.2f} GB")
    lora_path = save_lora(spec, transformer, out)
    window = max(1, min(10, len(losses) // 4))
    summary.update(steps=len(losses), first_loss=sum(losses[:window]) / window,
                   last_loss=sum(losses[-window:]) / window, lora=str(lora_path))
    log.info(f"saved the LoRA to {lora_path}; mean loss of the first {window} steps {summary['first_loss']:.4f}, "
             f"of the last {window} {summary['last_loss']:.4f}")
    return summary

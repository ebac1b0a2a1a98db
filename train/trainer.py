"""The `ft train` run: load only the transformer, stream optimizer steps from the shards, optimize, checkpoint;
in one process or many (torchrun, srun: DDP, FSDP2 or HSDP, see parallel.py).

One optimizer step is `--batch-size x processes x --gradient-accumulation-steps` samples of one bucket; each
process takes its part of each micro-batch (loader.py). For each sample, a generator keyed on (seed, step, sample
key) draws, in this order, its caption-dropout coin, its latent from the stored posterior, its noise and its sigma;
the family feeds its transformer (ModelSpec.predict) and the shared objective (objectives.py) scores the output:
the loss is the mean over elements of weight * (prediction - target)^2, averaged over the step's samples. The
state (TrainState) is checkpointed every `--checkpointing-steps` by all ranks together; a run resumed from step N
ends bitwise equal to a straight one in the same layout, and continues the same data and noise in another.

Under several processes rank 0 alone writes logs, trackers, configs and the exported weights; every rank stops
with the failing rank's message when one fails where the others would wait for it (train/dist.py).

What the run settles before any weight loads (output folder, shard sets, image conditioning, device) is in
preflight.py; checkpoints, and what a resume must keep of the run that wrote one, in checkpoints.py.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from ft.common.config import to_jsonable
from ft.common.dtypes import parse_dtype
from ft.common.errors import UserError
from ft.common.faults import environment_fault
from ft.common.logs import log, quiet_libraries, quiet_other_ranks
from ft.common.runtime import seed_everything, steady_malloc
from ft.common.shards import bucket_name, kill_point
from ft.pipelines.base import StepInputs, TrainOptions, randn_per_sample, transformer_blocks
from ft.pipelines.memory import device_memory
from ft.pipelines.registry import spec_for
from ft.train import dist

from .activation_offload import enable as enable_checkpointing
from .checkpoints import (
    RESUME_SENSITIVE,
    check_samples_per_step,
    dcp_failure,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    set_aside_later_checkpoints,
)
from .compile import CompileWatch, apply_compile, compile_summary
from .config import TRAIN_CONFIG_NAME, TrainConfig
from .context_parallel import check_context_parallel, enable_context_parallel
from .loader import Batch, DataStream, background, eval_batches
from .lora import plan_lora, save_lora
from .objectives import build_objective, sample_generator, uniform_per_sample
from .parallel import (
    Layout,
    build_mesh,
    clip_grad_norm,
    cp_mesh,
    export_state,
    parallelize,
    resolve_layout,
    set_gradient_sync,
    trainable_parameters,
)
from .preflight import (
    FP8_SEVERAL_PROCESSES,
    OFFLOAD_SEVERAL_PROCESSES,
    open_shard_sets,
    prepare_output_dir,
    run_conditioning,
    training_device,
)
from .reporting import LOG_NAME, PLOT_NAME, RunLog, check_wandb_login, plot_losses, stopped_by_fault
from .state import TrainState
from .trainable import build_optimizer, load_dtype, make_trainable, save_result, uses_autocast
from .validation import Validation

EVAL_STEP = -1  # the "global batch" keying the fixed-noise eval draws


def to_device(tensor: Any, device: str) -> Any:
    """A small CPU tensor on `device` without a stream sync (pinned memory, asynchronous copy)."""
    if not str(device).startswith("cuda"):
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.world = dist.world_from_env()
        self.layout: Layout = dist.same_on_every_rank(
            lambda: resolve_layout(cfg.dp_degree, cfg.dp_shards, self.world, cfg.cp_degree))
        if not self.world.main:
            quiet_other_ranks(self.world.rank)
        self.device = training_device(cfg.device, self.world)
        if self.world.size > 1:
            dist.init_process_group(self.world, self.device, cfg.init_timeout)
        # a context-parallel group reads one stream: the data-parallel ranks divide the samples
        self.samples_per_step = cfg.batch_size * self.layout.dp_world * cfg.gradient_accumulation_steps
        self.pending: BaseException | None = None  # a rank-0 write that failed, for the next agree()
        self.mesh = self.gradient_mesh = None
        error = None
        try:  # a rank failing here makes the others stop too (agree), instead of waiting in a collective
            dist.same_on_every_rank(self.check_run)
            self.build()
        except Exception as e:
            error = e
        dist.agree(error)
        if self.resume_from is not None:
            dist.same_on_every_rank(lambda: self.resume(self.resume_from))
        meshes = [self.mesh] if self.world.size > 1 else []
        if self.layout.cp > 1:  # the gradients' flattened dims, and the cp group diffusers flattened for the split
            config = self.transformer._parallel_config.context_parallel_config
            meshes += [self.gradient_mesh, config._flattened_mesh]
        dist.set_timeout(cfg.nccl_timeout, *meshes)

    def check_run(self) -> None:
        """What every rank checks alike before any weight loads: the model, the shard sets, the output folder."""
        cfg = self.cfg
        if cfg.report_to == "wandb":
            check_wandb_login()
        self.spec = spec_for(cfg)
        self.transformer_config = self.spec.load_config("transformer", cfg)
        self.options = TrainOptions.from_config(cfg)  # what the family's predict reads of the run
        if cfg.guidance_scale != 1.0 and not (self.spec.embedded_guidance
                                              and self.transformer_config.get("guidance_embeds", True)):
            raise UserError(f"--guidance-scale {cfg.guidance_scale}: this {self.spec.display_name} transformer has no "
                            "embedded guidance input; leave it at 1.")
        if cfg.layerwise_upcasting_modules and self.world.size > 1:
            raise UserError(FP8_SEVERAL_PROCESSES)
        if cfg.offload_blocks and self.world.size > 1:
            raise UserError(OFFLOAD_SEVERAL_PROCESSES)
        self.sets = open_shard_sets(cfg, self.spec, self.transformer_config, self.samples_per_step)
        self.image_conditioning = run_conditioning(cfg, self.spec, self.sets, self.transformer_config)
        if cfg.image_noise and self.image_conditioning is None:
            raise UserError("--image-noise noises the conditioning image of an image-to-video run; this run is "
                            "text-to-video: drop --image-noise.")
        if cfg.noised_image_dropout and self.image_conditioning is None:
            raise UserError("--noised-image-dropout drops the conditioning image of an image-to-video run; this run "
                            "is text-to-video: drop --noised-image-dropout.")
        self.validation = Validation(cfg, self.spec, self.sets, self.transformer_config,  # checks its files
                                     device_memory(self.device), self.image_conditioning)
        self.vae_config = self.sets[0].manifest.encoders.get("vae", {}).get("config", {})
        held_out = [self.validation.held_out.set] if self.validation.held_out else []  # --eval-shards
        self.cp_mode = check_context_parallel(cfg, self.spec, self.transformer_config, self.sets + held_out,
                                              [prompt.size for prompt in self.validation.prompts], self.device)
        self.out = prepare_output_dir(cfg)
        self.resume_from = resolve_checkpoint(self.out, cfg.resume_from_checkpoint) if (
            cfg.resume_from_checkpoint) else None
        # what the LoRA files will be (each adapted module has a key in every layout written), --init-lora read
        self.lora_plan = plan_lora(cfg, self.spec, self.transformer_config, resuming=self.resume_from is not None) if (
            cfg.training_type == "lora") else None
        self.config_json = to_jsonable(cfg)

    def build(self) -> None:
        """Load the transformer (on the CPU under several processes), make it trainable, wrap it for the layout,
        and build the optimizer and the data stream."""
        cfg, world = self.cfg, self.world
        quiet_libraries()
        steady_malloc()  # no page faults from the allocator in the steps (common/runtime.py says why)
        seed_everything(cfg.seed)  # the same LoRA init on every rank
        self.dtype = parse_dtype(cfg.transformer_dtype, "--transformer-dtype")
        self.autocast = uses_autocast(cfg)
        if self.device.startswith("cuda"):  # fp32 matmuls (LoRA, master weights) run on tensor cores
            import torch

            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.cuda.reset_peak_memory_stats(self.device)
        from dataclasses import replace

        load_cfg = replace(cfg, transformer_dtype=load_dtype(cfg))
        # several processes: load on the CPU, then shard block by block onto the device (parallel.py); offloading:
        # load on the CPU, then move all but the offloaded blocks' weights (train/offload.py); fp8 storage: cast on
        # the CPU, so that the device never holds the whole transformer in --transformer-dtype
        on_cpu = world.size > 1 or cfg.offload_blocks > 0 or bool(cfg.layerwise_upcasting_modules)
        transformer = self.spec.load_component("transformer", load_cfg, "cpu" if on_cpu else self.device)
        self.model_dtype = parse_dtype(load_dtype(cfg))
        scheduler = self.spec.load_scheduler(cfg)
        self.objective = build_objective(self.spec.objective, scheduler, cfg, self.spec.display_name,
                                         self.spec.timestep_filter())
        make_trainable(cfg, self.spec, transformer, self.lora_plan)
        self.activation_offload = None
        if cfg.gradient_checkpointing:  # with --activation-offload, each block's saved input goes to the CPU
            self.activation_offload = enable_checkpointing(transformer, self.device, cfg.activation_offload)
        transformer.train()
        self.mesh, self.gradient_mesh = build_mesh(self.layout, self.device, self.cp_mode)
        if self.layout.cp > 1:  # the hooks before any wrapping: FSDP2 and DDP run them inside their own
            enable_context_parallel(transformer, cp_mesh(self.mesh), self.cp_mode, self.device,
                                    self.spec.cp_plan(transformer))
            log.info(f"context parallel over {self.layout.cp} processes: {self.cp_mode} attention "
                     f"({'--cp-mode' if cfg.cp_mode else 'the default'} for "
                     f"{self.transformer_config.get('num_attention_heads')} heads)")
        self.offloader = None
        if cfg.offload_blocks:  # one process (check_run)
            from ft.train.offload import BlockOffloader

            self.offloader = BlockOffloader(transformer, transformer_blocks(transformer, self.spec.block_lists),
                                            cfg.offload_blocks, self.device)
            log.info(f"--offload-blocks {cfg.offload_blocks}: {self.offloader.offloaded_bytes() / 1e9:.2f} GB of "
                     "frozen weights stay in CPU memory")
            self.transformer = transformer
        else:
            self.transformer = parallelize(transformer, self.layout, self.gradient_mesh, self.device,
                                           self.spec.block_lists, compute_dtype=self.dtype if self.autocast else None)
        if cfg.compile_modules:  # after fully_shard and the offloading hooks, which run eagerly around each block
            apply_compile(self.transformer, transformer_blocks(self.transformer, self.spec.block_lists),
                          cfg.compile_scopes[0], cfg.compile_backend)
        self.params = trainable_parameters(self.transformer)
        optimizer, lr_schedule = build_optimizer(cfg, self.params)
        self.state = TrainState(self.transformer, optimizer, lr_schedule)
        self.stream = DataStream(self.sets, cfg.seed, cfg.batch_size, rank=self.layout.dp_rank(world.rank),
                                 world=self.layout.dp_world,
                                 shuffle_buffer=cfg.shuffle_buffer, accumulation=cfg.gradient_accumulation_steps)
        self.empty_captions = [s.empty_caption() if cfg.caption_dropout_p > 0 else None for s in self.sets]

    def resume(self, path: Path) -> None:
        state = self.state.state_dict()
        extra = load_checkpoint(path, state["tensors"])
        check_samples_per_step(path, extra, self.samples_per_step, self.cfg, self.layout.dp_world)
        self.state.load_state_dict({"tensors": state["tensors"], "extra": extra})
        before = extra.get("config", {})
        if before.get("expert") != self.cfg.expert and "expert" in before:  # its LoRA is the other transformer's
            raise UserError(f"--resume-from-checkpoint: {path} trained --expert {before['expert']}, this run "
                            f"--expert {self.cfg.expert}; resume it with --expert {before['expert']}, or train the "
                            "other expert in another --output-dir.")
        changed = [k for k in RESUME_SENSITIVE if k in before and before[k] != self.config_json.get(k)]
        if changed:
            log.warning(f"resuming with other settings than the run that wrote {path} ({', '.join(changed)}): "
                        "the run continues, but not exactly as a straight run would")
        if self.state.step > self.cfg.train_steps:
            raise UserError(f"--resume-from-checkpoint: {path} is at step {self.state.step}, past --train-steps "
                            f"{self.cfg.train_steps}; raise --train-steps to train further (or `ft export "
                            f"--checkpoint {path} --out DIR` for its weights).")
        if self.state.step == self.cfg.train_steps:
            log.info(f"{path} is the run's last step ({self.state.step}): nothing left to train, finishing its "
                     "export")
        saved = (self.state.data_position or {}).get("fingerprints")
        if saved is not None and saved != self.stream.fingerprints():
            log.warning(f"the shard sets changed since {path} was saved (re-precomputed or edited): training goes "
                        "on from the same position, but the data order from here is not the straight run's")

        def set_aside() -> list[Path]:
            try:
                return set_aside_later_checkpoints(self.out, self.state.step)
            except OSError as e:
                raise UserError(f"could not move the checkpoints after step {self.state.step} aside in "
                                f"{self.out} ({e}); make the folder writable and resume again.") from e

        later = dist.run_on_rank_zero(set_aside) or []
        if later:
            log.warning(f"{len(later)} checkpoint(s) after step {self.state.step} belong to the run that went on "
                        f"from it; moved to {later[0].parent} so that `latest` and --checkpointing-limit mean this run")
        parallel = extra.get("parallel", {})
        saved_layout = Layout(parallel.get("dp_degree", 1), parallel.get("dp_shards", 1), parallel.get("cp_degree", 1))
        moved = "" if saved_layout == self.layout else f" (saved under {saved_layout.name}, now {self.layout.name})"
        log.info(f"resumed from {path} at step {self.state.step}{moved}")

    # ------------------------------------------------------------------------------------------------ the step

    def sample_losses(self, batch: Batch, draw_key: int, caption_dropout: bool = True) -> Any:
        """Per-sample losses [B] of one micro-batch; all randomness from the samples' own generators, keyed on
        `draw_key` (the global batch number; EVAL_STEP for the fixed-noise loss, which drops no caption)."""
        import torch

        cfg, spec, objective = self.cfg, self.spec, self.objective
        generators = [sample_generator(cfg.seed, draw_key, key) for key in batch.keys]
        dropped = uniform_per_sample(generators) < (cfg.caption_dropout_p if caption_dropout else 0.0)
        cond = batch.cond
        empty = self.empty_captions[batch.set_index]
        if empty is not None and bool(dropped.any()):
            mask = to_device(dropped, self.device)
            cond = {k: torch.where(mask.reshape(-1, *([1] * (v.ndim - 1))), empty[k].to(v.device, v.dtype), v)
                    for k, v in cond.items()}
        latents = spec.prepare_latents(batch.latents, self.vae_config, self.transformer_config, generators)
        noise = randn_per_sample(tuple(latents.shape[1:]), generators, latents.device)
        sigmas = to_device(objective.sample_sigmas(generators, spec.latent_sequence_length(latents)), latents.device)
        noisy, timesteps = objective.noised(latents, noise, sigmas)
        image = spec.prepare_image(batch.image, self.vae_config, self.transformer_config, generators,
                                   self.image_conditioning, self.options) if self.image_conditioning is not None else {}
        inputs = StepInputs(latents, noise, noisy, sigmas, timesteps, cond, batch.meta, generators, self.options,
                            image, self.image_conditioning)
        context = torch.autocast(self.device.split(":")[0], dtype=self.dtype) if self.autocast else nullcontext()
        with context:
            output, element_weights = spec.predict(self.transformer, inputs, self.model_dtype)
        return objective.sample_losses(output, latents, noise, noisy, sigmas, timesteps, element_weights)

    def fixed_loss(self, batches: list[Batch]) -> float:
        """Mean loss over `batches` with draws keyed on EVAL_STEP: comparable across a run, and across runs."""
        import torch

        self.transformer.eval()
        with torch.no_grad():
            losses = [self.sample_losses(b.to(self.device), EVAL_STEP, caption_dropout=False).mean().item()
                      for b in batches]
        self.transformer.train()
        return sum(losses) / max(1, len(losses))

    def optimizer_step(self, batches: Any, step: int) -> dict[str, float]:
        """One optimizer step on this rank's micro-batches of it; the loss and grad norm are over every rank."""

        cfg, optimizer = self.cfg, self.state.optimizer
        t0 = time.perf_counter()
        micro, error = None, None
        try:
            micro = next(batches)
        except Exception as e:  # a corrupt shard on one rank: every rank stops with its message (no hang)
            error = e
        waited = time.perf_counter() - t0
        dist.agree(error or self.pending)  # and rank 0's failed log write of the step before
        total = None
        for m, batch in enumerate(micro):
            batch = batch.to(self.device)
            if self.activation_offload is not None:  # its counts are of one micro-batch
                self.activation_offload.reset()
            set_gradient_sync(self.transformer, self.layout, m == len(micro) - 1)  # sync on the last only
            loss = self.sample_losses(batch, batch.position["batches"]).mean()
            # a cp rank's backward carries its share of the sample's gradient, and the reduction averages over the
            # cp ranks too (parallel.py): scaled by the degree, the average of the shares is their sum
            (loss * self.layout.cp / len(micro)).backward()
            part = loss.detach() / len(micro)
            total = part if total is None else total + part
        self.state.data_position, epoch = micro[-1].position, micro[-1].epoch
        grad_norm = clip_grad_norm(self.params, cfg.max_grad_norm)
        *rank_losses, norm_value = self.gather(total.float(), grad_norm.float().to(total.device))
        rank_losses = rank_losses[::self.layout.cp]  # a cp group's ranks hold the same loss: counted once
        loss_value = sum(rank_losses) / len(rank_losses)
        if not math.isfinite(loss_value):
            bad = next(r for r, v in enumerate(rank_losses) if not math.isfinite(v))
            where = f" on rank {bad * self.layout.cp}" if len(rank_losses) > 1 else ""
            raise dist.raised_everywhere(UserError(
                f"step {step}: the loss is {rank_losses[bad]}{where}; training diverged. Lower --lr, or train with "
                "--transformer-dtype fp32 to find the cause."))
        optimizer.step()
        self.state.lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        self.state.step = step
        meta = micro[-1].meta[0]  # batches fed from elsewhere than shards (bench/train_step.py) carry no bucket
        bucket = bucket_name(*meta["bucket"]) if "bucket" in meta else ""
        return {"loss": loss_value, "grad_norm": norm_value, "epoch": epoch, "data_wait": waited, "bucket": bucket}

    def gather(self, loss: Any, norm: Any) -> list[float]:
        """Every rank's loss, then the (global) grad norm, read from the device in one go."""
        import torch

        if self.world.size == 1:
            return torch.stack([loss, norm]).tolist()
        import torch.distributed as torch_dist

        losses = [torch.zeros_like(loss) for _ in range(self.world.size)]
        torch_dist.all_gather(losses, loss)
        return torch.stack([*losses, norm]).tolist()

    # ------------------------------------------------------------------------------------------------ the run

    def checkpoint(self) -> Path:
        """A checkpoint for exact resume; a LoRA run's also holds the LoRA as users load it (a full finetune's
        transformer is made from any checkpoint by `ft export`, which reads no optimizer state)."""
        state = self.state.state_dict()
        extra = {**state["extra"], "config": self.config_json, "parallel": self.layout.as_dict(),
                 "samples_per_step": self.samples_per_step}
        write_weights = None
        if self.cfg.training_type == "lora":
            gathered = export_state(self.transformer, trainable_only=True) if self.world.size > 1 else None
            write_weights = partial(save_lora, self.lora_plan, self.transformer, steps=self.state.step, state=gathered)
        path = save_checkpoint(self.out, self.state.step, state["tensors"], extra, self.cfg.checkpointing_limit,
                               write_weights)
        log.info(f"saved {path}")
        return path

    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, main = self.cfg, self.world.main
        # this rank's share under FSDP (a DTensor's numel is the whole tensor's)
        n_trainable = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.params)
        samples = sum(s.trained_samples() for s in self.sets)
        what = f"LoRA rank {cfg.rank}" if cfg.training_type == "lora" else "full finetune"
        share = "" if self.layout.shards == 1 else " on each rank, its shard"
        log.info(f"training {self.spec.display_name} {what} ({n_trainable / 1e6:.2f}M trainable parameters{share}) "
                 f"on {self.device}{'' if self.world.size == 1 else ' x ' + str(self.world.size)} "
                 f"({self.layout.name}), {samples} samples in {len(self.sets)} shard set(s), "
                 f"{self.samples_per_step} per optimizer step")
        dist.run_on_rank_zero(lambda: (self.out / TRAIN_CONFIG_NAME).write_text(
            json.dumps(self.config_json, indent=2) + "\n"))
        eval_set = eval_batches(self.sets[0], cfg.batch_size, cfg.eval_batches) if cfg.eval_batches else []
        if len(eval_set) < cfg.eval_batches:
            log.warning(f"--eval-batches {cfg.eval_batches}: {self.sets[0].folder} has samples for "
                        f"{len(eval_set)} batches of {cfg.batch_size}; using those")
        summary: dict[str, Any] = {"output_dir": str(self.out)}
        if eval_set:
            summary["eval_loss_before"] = self.fixed_loss(eval_set)
        start = self.state.step
        run_log = dist.run_on_rank_zero(lambda: RunLog(self.out, cfg.report_to, self.config_json,
                                                       resumed_step=start if self.resume_from else None))
        batches = background(self.stream.batches(self.state.data_position))
        bar = tqdm(range(start + 1, cfg.train_steps + 1), desc="train", unit="step", initial=start,
                   total=cfg.train_steps, disable=not main)
        losses: list[float] = []
        watch = CompileWatch() if cfg.compile_modules else None
        times: list[tuple[float, dict[str, float]]] = []  # each step's seconds and what it compiled
        try:
            if self.resume_from is not None:  # a validation the stop cut short is made first
                self.validation.after_resume(self, start, run_log)
            for step in bar:
                t0 = time.perf_counter()
                metrics = self.optimizer_step(batches, step)
                seconds = time.perf_counter() - t0
                compiled = watch.take() if watch else {}
                if step == start + 1 and self.activation_offload is not None:
                    log.info(self.activation_offload.summary())
                times.append((seconds, compiled))
                losses.append(metrics["loss"])
                lr = self.state.lr_schedule.get_last_lr()[0]
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}",
                                samples_s=f"{self.samples_per_step / seconds:.1f}")
                if run_log and (step % cfg.logging_steps == 0 or step == cfg.train_steps):
                    record = {"step": step, "loss": metrics["loss"], "lr": lr, "grad_norm": metrics["grad_norm"],
                              "seconds": round(seconds, 4), "samples_per_s": round(self.samples_per_step / seconds, 3),
                              "data_wait_share": round(metrics["data_wait"] / seconds, 4), "epoch": metrics["epoch"],
                              "bucket": metrics["bucket"], **compiled}
                    self.rank_zero_write(lambda record=record: run_log.write(record))
                if cfg.checkpointing_steps and (step % cfg.checkpointing_steps == 0 or step == cfg.train_steps):
                    self.checkpoint()
                self.validation.after_step(self, step, run_log)  # videos and eval_loss, when due
        except KeyboardInterrupt:
            kept = list_checkpoints(self.out)
            hint = (f"the first comes at step {cfg.checkpointing_steps}" if cfg.checkpointing_steps else
                    "set --checkpointing-steps to save some")
            where = (f"the last checkpoint is step {kept[-1][0]} ({kept[-1][1]}); continue with the same command "
                     "plus --resume-from-checkpoint latest" if kept else f"no checkpoint was saved yet ({hint})")
            log.error(f"interrupted at step {self.state.step}: {where}.")
            raise
        except RuntimeError as e:  # a collective gave up: another rank hung or died (its own output says why)
            if self.world.size == 1 or not dist.peer_lost(e):
                raise
            kept = list_checkpoints(self.out)
            last = f"The last checkpoint is step {kept[-1][0]}" if kept else "No checkpoint was saved yet"
            raise UserError(f"rank {self.world.rank} stopped at step {self.state.step}: another rank stopped "
                            f"answering ({dist.peer_lost(e)}); see that rank's output for why. {last}; the same "
                            "command plus --resume-from-checkpoint latest goes on.") from None
        except BaseException as e:  # the disk filled or went read-only: stop cleanly, the last checkpoint stands
            if environment_fault(e) is None or isinstance(e, (SystemExit, GeneratorExit)):
                raise
            message = stopped_by_fault(environment_fault(e), self.out, self.state.step,  # type: ignore[arg-type]
                                       list_checkpoints(self.out))
            # a DCP save fails on every rank alike (its CheckpointException gathers every rank's failures): rank 0
            # prints the message once
            raise dist.RankError(message, quiet=self.world.rank != 0 and dcp_failure(e)) from e
        finally:
            if watch:
                watch.close()
            batches.close()  # stops the reader thread
            if run_log:
                run_log.close()
            bar.close()
        dist.agree(self.pending)  # rank 0's last log line failed: every rank stops before the export
        if watch:
            summary.update(compile_summary(times))
        return self.finish(summary, eval_set, losses)

    def rank_zero_write(self, write: Any) -> None:
        """Rank 0's writes between collectives (a log line): in one process a failure raises at once; under
        several it is carried to the next point every rank meets, so the others stop with it instead of waiting."""
        if not self.world.main:
            return
        if self.world.size == 1:
            write()
            return
        try:
            write()
        except Exception as e:
            self.pending = self.pending or e

    def finish(self, summary: dict[str, Any], eval_set: list[Batch], losses: list[float]) -> dict[str, Any]:
        import torch

        self.transformer.eval()
        if eval_set:
            summary["eval_loss_after"] = self.fixed_loss(eval_set)
            log.info(f"fixed-noise loss on {len(eval_set)} batches: {summary['eval_loss_before']:.4f} -> "
                     f"{summary['eval_loss_after']:.4f}")
        if self.device.startswith("cuda"):
            summary["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            log.info(f"peak GPU memory {summary['peak_gpu_memory_gb']:.2f} GB")
        kill_point("exporting")  # test hook (FT_TEST_KILL_AT=exporting): killed after the last checkpoint
        result = self.export()
        plot = plot_losses(self.out / LOG_NAME, self.out / PLOT_NAME) if self.world.main else None
        window = max(1, min(10, len(losses) // 4))
        summary.update(self.validation.summary)
        summary.update(steps=self.state.step, first_loss=sum(losses[:window]) / window if losses else None,
                       last_loss=sum(losses[-window:]) / window if losses else None, result=str(result),
                       plot=str(plot) if plot else None)
        if self.cfg.training_type == "lora":
            summary["lora"] = str(result)
        if losses:
            steps = f"{window} steps" if window > 1 else "step"
            log.info(f"saved {result}; mean loss of the first {steps} {summary['first_loss']:.4f}, of the "
                     f"last {steps} {summary['last_loss']:.4f}")
        else:  # resumed at the last step: only the export was left to do
            log.info(f"saved {result}")
        return summary

    def export(self) -> Path:
        """The LoRA or the full transformer, written once (by rank 0, from the weights gathered on its CPU)."""
        if self.world.size == 1:
            return save_result(self.cfg, self.spec, self.transformer, self.out, self.lora_plan, self.state.step)
        full = export_state(self.transformer, trainable_only=self.cfg.training_type == "lora")
        result = dist.run_on_rank_zero(lambda: save_result(self.cfg, self.spec, self.transformer, self.out,
                                                           self.lora_plan, self.state.step, full_state=full))
        return dist.broadcast_object(result)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; returns a summary (steps, first/last loss, fixed-noise eval losses, paths)."""
    try:
        summary = Trainer(cfg).fit()
    except BaseException:
        dist.destroy(together=False)
        raise
    dist.destroy()
    return summary

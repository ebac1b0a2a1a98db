"""What `ft train` settles before any weight loads, alike on every rank: the output folder (a fresh run never writes
over an earlier run's checkpoints), the --shards sets (checked against each other, the transformer and the samples
of one optimizer step), how the run conditions on an image, and the device each process trains on; and why fp8
storage and block offloading are refused under several processes. The trainer (trainer.py) calls these from
`Trainer.check_run` and its constructor, so that a bad flag or shard set stops every rank before any weight loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ft.common.errors import UserError
from ft.common.logs import log
from ft.common.runtime import pick_device
from ft.common.shards import parse_bucket, require_complete
from ft.pipelines.image import ImageConditioning, check_image_shards, describe_conditioning, read_model_index
from ft.train import dist

from .checkpoints import list_checkpoints
from .loader import ShardSet, check_compatible, parse_shard_arg

if TYPE_CHECKING:
    from ft.pipelines.base import ModelSpec

    from .config import TrainConfig


FP8_SEVERAL_PROCESSES = (
    "--layerwise-upcasting-modules (fp8 storage) trains in one process only: diffusers' layerwise casting changes "
    "each layer's weights between fp8 and --transformer-dtype around its forward, while FSDP2 shards and gathers "
    "those same weights as flat buffers of one dtype, and DDP broadcasts them at start; fp8 storage is for fitting "
    "ONE GPU. With several GPUs, train in bf16 with --dp-shards (FSDP2 splits the weights over the processes).")
OFFLOAD_SEVERAL_PROCESSES = (
    "--offload-blocks trains in one process only: with several GPUs, shard the transformer over them with "
    "--dp-shards instead (FSDP2 keeps 1/N of every block on each GPU and gathers one block at a time, which is what "
    "offloading does with the CPU).")


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """--output-dir, made; a fresh run never writes over an earlier run's checkpoints."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {out}: cannot make this folder ({e.strerror}); pass a writable folder.") from e
    if not os.access(out, os.W_OK):
        raise UserError(f"--output-dir {out} is not writable; pass a folder you can write to.")
    existing = list_checkpoints(out)
    if existing and not cfg.resume_from_checkpoint:
        steps = ", ".join(str(step) for step, _ in existing)
        raise UserError(f"--output-dir {out} holds checkpoints of an earlier run (steps {steps}): add "
                        "--resume-from-checkpoint latest to go on with it, or pass another --output-dir (a fresh run "
                        "here would mix the two).")
    return out


def open_shard_sets(cfg: TrainConfig, spec: ModelSpec, transformer_config: dict, samples_per_step: int
                    ) -> list[ShardSet]:
    """The --shards sets, checked against each other and against the transformer before any weight loads; each
    bucket is checked against the samples of one optimizer step (every process's batches together)."""
    need = (f"the {samples_per_step} samples of an optimizer step (--batch-size {cfg.batch_size} x "
            f"{samples_per_step // (cfg.batch_size * cfg.gradient_accumulation_steps)} processes x "
            f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps})")
    sets = [ShardSet(*parse_shard_arg(arg)) for arg in cfg.shards]
    check_compatible(sets)
    for s in sets:
        require_complete(s.manifest, s.folder, cfg.allow_incomplete)
        spec.check_shards(s.manifest, transformer_config)
        vae_config = s.manifest.encoders.get("vae", {}).get("config", {})
        for bucket, count in s.manifest.training_histogram().items():
            problem = spec.check_bucket(parse_bucket(bucket), vae_config, transformer_config)
            if problem:
                raise UserError(f"{s.folder} holds {bucket} samples, which this transformer cannot take: {problem}. "
                                "Precompute again with --buckets that fit it.")
            if count < samples_per_step:
                log.warning(f"{s.folder}: bucket {bucket} has {count} samples, fewer than {need}; it is not used")
        histogram = s.manifest.training_histogram()
        if not any(n >= samples_per_step for n in histogram.values()):
            raise UserError(f"no bucket of {s.folder} holds {need} "
                            f"({', '.join(f'{b}: {n}' for b, n in histogram.items())}); lower --batch-size or "
                            "--gradient-accumulation-steps, or train on fewer processes.")
        if cfg.caption_dropout_p > 0 and not s.manifest.empty_caption:
            raise UserError(f"--caption-dropout-p needs the empty caption's conditioning, which {s.folder} does not "
                            "hold (it was written by an older ft). Rerun `ft precompute` with the same --out: it "
                            "adds it without re-encoding anything else.")
    return sets


def run_conditioning(cfg: TrainConfig, spec: ModelSpec, sets: list[ShardSet], transformer_config: dict
                     ) -> ImageConditioning | None:
    """How the run conditions on an image (None: text-to-video), from --mode, the checkpoint and what every shard
    set holds (pipelines/image.py), before any weight loads."""
    model_index = read_model_index(cfg.pretrained, cfg.revision, cfg.cache_dir)
    where = f"--pretrained {cfg.pretrained}" + (f" with --transformer-id {cfg.transformer_id}"
                                                 if cfg.transformer_id else "")
    found = [check_image_shards(spec, cfg.mode, s.manifest, transformer_config, model_index, where) for s in sets]
    if len(set(found)) > 1:
        kinds = ", ".join(f"{s.folder}: {describe_conditioning(c)}" for s, c in zip(sets, found, strict=True))
        raise UserError(f"--shards mixes sets of different conditioning ({kinds}); train one kind per run.")
    return found[0]


def training_device(requested: str, world: dist.World) -> str:
    """--device for this process: under several processes each takes cuda:LOCAL_RANK (or the CPU). A rank past
    the node's GPU count is the only one to meet that error, so it prints it itself; the others are alike."""
    device = dist.same_on_every_rank(lambda: pick_device(requested))
    if world.size == 1 or not device.startswith("cuda"):
        return device
    if ":" in requested:
        raise dist.raised_everywhere(UserError(f"--device {requested}: under {world.launcher}, each process trains "
                                               "on cuda:LOCAL_RANK; pass --device cuda (or auto)."))
    import torch

    if world.local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {world.local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                        "start at most that many processes per node.")
    torch.cuda.set_device(world.local_rank)
    return f"cuda:{world.local_rank}"

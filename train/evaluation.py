"""The held-out loss (`--eval-shards SET --eval-steps N`): the training objective over a shard set of clips the
model does not train on, at fixed timesteps and with fixed noise, logged as `eval_loss`.

Fixed means independent of the run: every sample is scored at each of `EVAL_SIGMAS` (spread over the schedule),
with its latent draw and noise from a generator keyed on `EVAL_SEED` and its key alone, not on `--seed`, the
step or the rank. So the same weights give the same value twice, after a resume, and in another run of the same
model and objective, which is what makes two runs' curves comparable. The loss is the objective's own (the
family's prediction, target and weights, as in training), with no caption dropout and no first-frame
conditioning; the mean over samples and timesteps is `eval_loss`.

`--eval-batches` is another thing: a fixed-noise loss over batches of the TRAINING set, measured before and after
training (trainer.py). The eval set must come from the same model and encoders as the training shards; it is
checked before the first step, and read into memory once, at the first evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError
from ft.common.shards import iter_shard, require_complete
from ft.pipelines.base import StepInputs, randn_per_sample

from .loader import Batch, ShardSet, collate
from .objectives import sample_generator

if TYPE_CHECKING:
    from ft.pipelines.base import ModelSpec

    from .config import TrainConfig

EVAL_SEED = 0
EVAL_DRAW = -2  # the "global batch" of the held-out draws (the training eval of --eval-batches uses -1)
EVAL_SIGMAS = (0.125, 0.375, 0.625, 0.875)


def open_eval_set(cfg: TrainConfig, spec: ModelSpec, train_set: ShardSet, transformer_config: dict) -> ShardSet:
    """The --eval-shards set, checked against the model and the training shards."""
    held_out = ShardSet(cfg.eval_shards)
    folder = held_out.folder
    require_complete(held_out.manifest, folder, False)
    spec.check_shards(held_out.manifest, transformer_config)
    if held_out.folder.resolve() in {train_set.folder.resolve()}:
        raise UserError(f"--eval-shards {folder} is a training shard set: a held-out loss needs clips the model "
                        "does not train on. Precompute them into their own --out.")
    mine, theirs = held_out.manifest, train_set.manifest
    if mine.encoder_fingerprint != theirs.encoder_fingerprint:
        raise UserError(f"--eval-shards {folder} was encoded with other encoders than {train_set.folder} "
                        f"(fingerprint {mine.encoder_fingerprint[:12]} against {theirs.encoder_fingerprint[:12]}): its "
                        "loss would not measure this model. Precompute it with the same --pretrained and dtypes.")
    if mine.shapes != theirs.shapes:
        raise UserError(f"--eval-shards {folder} holds samples of shapes {mine.shapes}, the training shards "
                        f"{theirs.shapes}; precompute it with the same --max-sequence-length and model.")
    return held_out


class HeldOutLoss:
    """The held-out loss of the trainer's current weights (call it; every rank must, under FSDP)."""

    def __init__(self, cfg: TrainConfig, spec: ModelSpec, train_set: ShardSet, transformer_config: dict):
        self.cfg, self.spec = cfg, spec
        self.set = open_eval_set(cfg, spec, train_set, transformer_config)
        self.vae_config = self.set.manifest.encoders.get("vae", {}).get("config", {})
        self._batches: list[Batch] | None = None

    def batches(self) -> list[Batch]:
        """Every active sample of the set, verified, in batches of --batch-size of one bucket, ordered by key."""
        if self._batches is None:
            by_bucket: dict[tuple, list] = defaultdict(list)
            for info in self.set.manifest.shards:
                for sample in iter_shard(self.set.folder / info.name, verify=info, wanted=(
                        None if self.set.active is None else self.set.active.__contains__)):
                    by_bucket[tuple(sample.meta["bucket"])].append(sample)
            size = self.cfg.batch_size
            self._batches = [collate(samples[i : i + size])
                             for _, group in sorted(by_bucket.items())
                             for samples in [sorted(group, key=lambda s: s.key)]
                             for i in range(0, len(samples), size)]
        return self._batches

    def losses(self, trainer: Any, batch: Batch) -> list[float]:
        """Per-sample losses of one batch, each the mean over EVAL_SIGMAS."""
        import torch

        spec, objective = self.spec, trainer.objective
        batch = batch.to(trainer.device)
        generators = [sample_generator(EVAL_SEED, EVAL_DRAW, key) for key in batch.keys]
        latents = spec.prepare_latents(batch.latents, self.vae_config, generators)
        noise = randn_per_sample(tuple(latents.shape[1:]), generators, latents.device)
        options = {**spec.options, "first_frame_conditioning_p": 0.0}
        total = torch.zeros(latents.shape[0], device=latents.device)
        for sigma in EVAL_SIGMAS:
            sigmas = torch.full((latents.shape[0],), sigma, device=latents.device)
            noisy, timesteps = objective.noised(latents, noise, sigmas)
            inputs = StepInputs(latents, noise, noisy, sigmas, timesteps, batch.cond, batch.meta, generators, options)
            context = (torch.autocast(trainer.device.split(":")[0], dtype=trainer.dtype) if trainer.autocast
                       else nullcontext())
            with context:
                output, element_weights = spec.predict(trainer.transformer, inputs, trainer.model_dtype)
            error = (objective.prediction(output, noisy, timesteps).float()
                     - objective.target(latents, noise).float()) ** 2
            if element_weights is not None:
                error = error * element_weights
            weights = objective.weights(sigmas, timesteps).float().reshape(-1, *([1] * (error.ndim - 1)))
            total += (weights * error).flatten(1).mean(1)
        return (total / len(EVAL_SIGMAS)).tolist()

    def __call__(self, trainer: Any) -> float:
        import torch

        was_training = trainer.transformer.training
        trainer.transformer.eval()
        try:
            with torch.no_grad():
                losses = [loss for batch in self.batches() for loss in self.losses(trainer, batch)]
        finally:
            trainer.transformer.train(was_training)
        return sum(losses) / len(losses)

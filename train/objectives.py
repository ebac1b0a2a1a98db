"""The training objectives, shared by every family: where on the noise schedule each sample is, how it is noised,
what the transformer's output is compared with, and how each sample's loss is weighted.

- `SigmaSampler` draws sigma in [0, 1] per sample from its own generator: sigma = 1 - u with u from a density
  (`uniform` for `--flow-weighting-scheme none|sigma_sqrt|cosmap`, `logit_normal` with `--flow-logit-mean/std`,
  `mode` with `--flow-mode-scale`; 1 - u because the reference scripts index a descending sigma table with u, so
  finetrainers' settings mean the same here), then a shift towards noise: `--flow-shift`
  (s' = shift*s / (1 + (shift-1)*s)), or with `--flow-resolution-shifting` one set by the latent sequence length
  before patching, as finetrainers and LTXPipeline count it (mu interpolated between `--flow-base-seq-len`/
  `--flow-base-shift` and `--flow-max-seq-len`/`--flow-max-shift`, which default to the scheduler config's, as
  the pipeline's calculate_shift reads them; s' = e^mu / (e^mu + 1/s - 1)). These are the formulas of
  diffusers' training utilities and finetrainers; here every knob acts.
- `FlowMatching` (LTX-Video, HunyuanVideo): x_s = (1 - s) x0 + s noise, timestep = 1000 s, target noise - x0,
  weights from `--flow-weighting-scheme` (sigma_sqrt: s^-2; cosmap: 2 / (pi (1 - 2s + 2s^2)); else 1).
- `DDPMVPrediction` (CogVideoX): timestep = floor(1000 s) on the DDPM schedule, noised with the scheduler's
  `add_noise`, the output turned into a clean-latent estimate with `get_velocity`, target x0, weight
  1 / (1 - alphas_cumprod[t]) (diffusers' examples/cogvideo and finetrainers). The sigma density and shift apply
  to its timesteps too; uniform by default, as finetrainers samples them.
A family names its objective (`ModelSpec.objective`); `build_objective` makes it from the run's config.

A run that trains one part of the schedule (a Wan 2.2 A14B expert: `ModelSpec.timestep_filter`) draws each sample's
sigma by rejection: its own generator draws from the run's density until the timestep the sigma makes passes the
filter (at most MAX_DRAWS times). The expert then trains on the run's density conditioned on its range, and the
draws stay a function of the sample's generator alone (exact resume, any batch split).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MIN_SIGMA = 1e-3  # the flow schedulers' smallest sigma; keeps sigma_sqrt's s^-2 finite
MAX_DRAWS = 10_000  # draws of one sample's sigma before a timestep filter's range counts as out of the density's reach


def sample_generator(seed: int, batch: int, key: str) -> torch.Generator:
    """The generator of one sample's randomness in one global batch: keyed on (seed, global batch number, sample
    key), so the latent draw, noise and sigma of a sample do not depend on how the global batch is split across
    ranks, a sample that comes twice within one optimizer step (accumulation across an epoch's end) gets two
    draws, and a resumed run draws exactly what a straight run draws."""
    import torch

    digest = hashlib.sha256(f"{seed}:{batch}:{key}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def uniform_per_sample(generators: list[torch.Generator]) -> torch.Tensor:
    import torch

    return torch.cat([torch.rand(1, generator=g) for g in generators])


def normal_per_sample(generators: list[torch.Generator], mean: float, std: float) -> torch.Tensor:
    import torch

    return torch.cat([torch.randn(1, generator=g) for g in generators]) * std + mean


# SigmaSampler's resolution knobs: (field, TrainConfig flag, the scheduler config key the pipelines read)
RESOLUTION_KNOBS = (("base_seq_len", "flow_base_seq_len", "base_image_seq_len"),
                    ("max_seq_len", "flow_max_seq_len", "max_image_seq_len"),
                    ("base_shift", "flow_base_shift", "base_shift"), ("max_shift", "flow_max_shift", "max_shift"))


@dataclass
class SigmaSampler:
    """Draws each sample's sigma in [MIN_SIGMA, 1] (see the module docstring for the formulas)."""

    scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    resolution_shifting: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_config(cls, cfg: Any, scheduler_config: Any = None, family: str = "this model") -> SigmaSampler:
        """The run's sigma knobs. The resolution shift's four (`--flow-base-seq-len` ...) default to the loaded
        scheduler config's base_image_seq_len, max_image_seq_len, base_shift and max_shift, read as the family's
        pipeline reads them for calculate_shift (with its fallbacks, this class's defaults, where a key is
        missing): training then shifts as that pipeline samples."""
        from ft.common.errors import UserError

        scheduler_config = scheduler_config or {}
        if cfg.flow_resolution_shifting and not scheduler_config.get("use_dynamic_shifting"):
            # the pre-patch sequence length of a CogVideoX or HunyuanVideo clip is far past the max length: the
            # extrapolated shift would put every sigma at ~1. Only families sampled with dynamic shifting.
            raise UserError(f"--flow-resolution-shifting: {family} is not sampled with resolution-dependent "
                            "shifting (its scheduler has no use_dynamic_shifting); use a fixed --flow-shift "
                            "instead.")
        resolved = {}
        for knob, flag, key in RESOLUTION_KNOBS:
            value = getattr(cfg, flag)
            resolved[knob] = value if value is not None else scheduler_config.get(key, getattr(cls, knob))
        if resolved["max_seq_len"] <= resolved["base_seq_len"]:
            raise UserError(f"--flow-max-seq-len ({resolved['max_seq_len']}) must be greater than --flow-base-seq-len "
                            f"({resolved['base_seq_len']}; defaults from the scheduler config).")
        return cls(cfg.flow_weighting_scheme, cfg.flow_logit_mean, cfg.flow_logit_std, cfg.flow_mode_scale,
                   cfg.flow_shift, cfg.flow_resolution_shifting, **resolved)

    def density(self, generators: list[torch.Generator]) -> torch.Tensor:
        """u in [0, 1] per sample, before any shift."""
        import torch

        if self.scheme == "logit_normal":
            return torch.sigmoid(normal_per_sample(generators, self.logit_mean, self.logit_std))
        u = uniform_per_sample(generators)
        if self.scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def resolution_mu(self, seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (seq_len - self.base_seq_len)

    def shifted(self, sigmas: torch.Tensor, seq_len: int) -> torch.Tensor:
        import torch

        if self.resolution_shifting:
            mu = self.resolution_mu(seq_len)
            safe = sigmas.clamp(min=1e-12)
            return math.exp(mu) / (math.exp(mu) + (1 / safe - 1))
        if self.shift == 1.0:
            return sigmas
        return torch.as_tensor(self.shift * sigmas / (1 + (self.shift - 1) * sigmas))

    def sample(self, generators: list[torch.Generator], seq_len: int, min_sigma: float = MIN_SIGMA) -> torch.Tensor:
        # sigma = 1 - u: diffusers' and finetrainers' scripts index a descending sigma table with u, so a
        # --flow-logit-mean above 0 means less noise there, and here too
        return self.shifted(1.0 - self.density(generators), seq_len).clamp(min_sigma, 1.0)


def flow_loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of flow matching (diffusers' compute_loss_weighting_for_sd3)."""
    import torch

    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


class Objective(ABC):
    """How a batch is noised and scored. `sigmas` are per sample, in [0, 1]."""

    min_sigma: float = MIN_SIGMA

    def __init__(self, scheduler: Any, sampler: SigmaSampler,
                 accept: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.scheduler, self.sampler, self.accept = scheduler, sampler, accept

    def sample_sigmas(self, generators: list[torch.Generator], seq_len: int) -> torch.Tensor:
        """Each sample's sigma from its own generator; with a timestep filter (`accept`), drawn again until its
        timestep passes (see the module docstring)."""
        if self.accept is None:
            return self.sampler.sample(generators, seq_len, self.min_sigma)
        import torch

        return torch.cat([self._accepted(g, seq_len) for g in generators])

    def _accepted(self, generator: torch.Generator, seq_len: int) -> torch.Tensor:
        for _ in range(MAX_DRAWS):
            sigma = self.sampler.sample([generator], seq_len, self.min_sigma)
            if bool(self.accept(self.timesteps_of(sigma))[0]):  # type: ignore[misc]
                return sigma
        from ft.common.errors import UserError

        raise UserError(f"no sigma in {MAX_DRAWS} draws fell in the part of the schedule this run trains (--expert): "
                        f"the sigma density (--flow-weighting-scheme {self.sampler.scheme}, --flow-shift "
                        f"{self.sampler.shift}, --flow-logit-mean {self.sampler.logit_mean}) puts almost none of its "
                        "mass there; use --flow-weighting-scheme none, or move the density towards that range.")

    @abstractmethod
    def timesteps_of(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The timesteps as the transformer takes them for these sigmas (what `noised` returns with them)."""

    @abstractmethod
    def noised(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps as the transformer takes them)."""

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def prediction(self, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The transformer's output in the target's terms."""

    @abstractmethod
    def weights(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights [B]."""

    def sample_losses(self, output: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                      sigmas: torch.Tensor, timesteps: torch.Tensor, element_weights: torch.Tensor | None
                      ) -> torch.Tensor:
        """Per-sample losses [B]: the weighted squared error of the prediction, averaged over each sample's
        elements. With a family's per-element weights (`ModelSpec.predict`; 0 on a conditioning frame) it is
        their weighted mean, sum(w * e) / sum(w): an element of weight 0 is out of the denominator too, so a
        conditioned sample's loss is the mean over its target frames."""
        error = (self.prediction(output, noisy, timesteps).float() - self.target(latents, noise).float()) ** 2
        weights = self.weights(sigmas, timesteps).float().reshape(-1, *([1] * (error.ndim - 1)))
        if element_weights is None:
            return (weights * error).flatten(1).mean(1)
        element_weights = element_weights.float().expand_as(error)
        return (weights * error * element_weights).flatten(1).sum(1) / element_weights.flatten(1).sum(1)


def _expand(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


class FlowMatching(Objective):
    def timesteps_of(self, sigmas):
        return sigmas * 1000.0

    def noised(self, latents, noise, sigmas):
        s = _expand(sigmas, latents)
        return (1 - s) * latents + s * noise, self.timesteps_of(sigmas).to(latents.device)

    def target(self, latents, noise):
        return noise - latents

    def prediction(self, output, noisy, timesteps):
        return output

    def weights(self, sigmas, timesteps):
        return flow_loss_weights(self.sampler.scheme, sigmas)


class DDPMVPrediction(Objective):
    min_sigma = 0.0  # uniform sigmas give every timestep 0..999 equally often, as torch.randint did

    def timesteps_of(self, sigmas):
        n = self.scheduler.config.num_train_timesteps
        return (sigmas * n).long().clamp(0, n - 1)

    def noised(self, latents, noise, sigmas):
        timesteps = self.timesteps_of(sigmas).to(latents.device)
        return self.scheduler.add_noise(latents, noise, timesteps), timesteps

    def target(self, latents, noise):
        return latents

    def prediction(self, output, noisy, timesteps):
        return self.scheduler.get_velocity(output.float(), noisy, timesteps)

    def weights(self, sigmas, timesteps):
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        return 1.0 / (1.0 - alphas)


OBJECTIVES: dict[str, type[Objective]] = {"flow_matching": FlowMatching, "ddpm_v_prediction": DDPMVPrediction}


def build_objective(name: str, scheduler: Any, cfg: Any, family: str = "this model",
                    accept: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Objective:
    """The objective a family names, with the run's sigma knobs (defaults from the scheduler's config) and the
    family's timestep filter (`ModelSpec.timestep_filter`; None: the whole schedule)."""
    return OBJECTIVES[name](scheduler, SigmaSampler.from_config(cfg, scheduler.config, family), accept)

"""Wan 2.2 A14B's two experts: `transformer` denoises the high-noise part of the schedule, `transformer_2` the
low-noise part, switched at the model's `boundary_ratio` (model_index.json: 0.875 for text-to-video, 0.9 for
image-to-video). The rule is WanPipeline.__call__'s, in its units: `boundary_timestep = boundary_ratio *
scheduler.config.num_train_timesteps`, and at each denoising step `t >= boundary_timestep` calls `transformer`
(high), anything lower `transformer_2` (low); `t` is the integer timestep the transformer is handed.

ft trains each expert as its own `ft train` job on one shard set (the VAE and UMT5 are shared, so one precompute
serves both), with `--expert high` or `--expert low`:
- only that expert's transformer loads: `transformer/` for high, `transformer_2/` for low (`--transformer-id` still
  names a finetune of the expert being trained);
- each sample's timestep is drawn only from the expert's part of the schedule, by rejection: the sample's own
  generator draws sigma from the run's density (`--flow-weighting-scheme`, `--flow-shift`, ...) until the timestep
  the transformer would be handed (WanSpec.predict's integer) falls to the expert by the pipeline's rule. So the
  expert trains on the run's density conditioned on its range (its shape kept, as musubi-tuner's
  --preserve_distribution_shape does; rescaling u into the range would keep it only for the uniform density), every
  draw still comes from the sample's generator keyed on (seed, step, key), and a resumed run draws what a straight
  run draws;
- validation samples through WanPipeline with the trained expert and the other expert's base weights (loaded from
  --pretrained in --transformer-dtype, on the training device), switched at the same boundary.
`ft generate --lora HIGH --lora-2 LOW` loads the two LoRAs as diffusers does (`load_lora_weights`, with
`load_into_transformer_2=True` for the low-noise one); either may be absent (that expert's base weights).

The expert's spellings: ft's `high` / `low`; musubi-tuner's and Wan-AI's `high_noise` / `low_noise` (its
`--dit_high_noise`, the `high_noise_model` / `low_noise_model` folders of the original checkpoints); diffusers'
component names `transformer` / `transformer_2`. finetrainers does not train Wan 2.2 A14B, so it has none to map.

`WanExperts` is a mixin of the Wan spec, whatever the task (text- or image-to-video): it reads the split from
--pretrained's model_index.json and holds which expert a run trains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError
from ft.common.logs import log

from .fingerprint import hub_hint
from .real_configs import Checkpoint

if TYPE_CHECKING:
    import torch

EXPERT_COMPONENTS = {"high": "transformer", "low": "transformer_2"}  # WanPipeline's component of each expert
SPELLINGS = {"high": "high", "high_noise": "high", "high-noise": "high", "transformer": "high",
             "low": "low", "low_noise": "low", "low-noise": "low", "transformer_2": "low", "transformer-2": "low"}
BOTH = ("both", "all", "high+low", "low+high", "high,low", "low,high")


def parse_expert(value: str | None) -> str | None:
    """`--expert`'s value as ft's name (high or low); None stays None. `both` is refused with the two-job recipe."""
    if value is None:
        return None
    key = str(value).strip().lower()
    if key in BOTH:
        raise UserError(f"--expert {value}: ft trains one expert per run (each holds one 14B transformer, with its "
                        "own checkpoints and exact resume). Precompute once, then run `ft train ... --expert high "
                        "--output-dir out/high` and `ft train ... --expert low --output-dir out/low` on the same "
                        "--shards (one after the other, or as two jobs at once); generate with `ft generate --lora "
                        "out/high --lora-2 out/low`.")
    if key not in SPELLINGS:
        raise UserError(f"--expert {value}: not an expert of Wan 2.2 A14B; pass high (transformer/, the high-noise "
                        "steps) or low (transformer_2/, the low-noise steps); high_noise / low_noise mean the same.")
    return SPELLINGS[key]


@dataclass(frozen=True)
class ExpertSplit:
    """Where WanPipeline hands the schedule from one expert to the other."""

    boundary_ratio: float
    num_train_timesteps: int = 1000  # the pipeline scheduler's config: the units of its timesteps

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * self.num_train_timesteps  # WanPipeline.__call__'s own expression

    def expert_at(self, timestep: float) -> str:
        """The expert WanPipeline calls at this timestep."""
        return "high" if timestep >= self.boundary_timestep else "low"

    def trains(self, expert: str, timesteps: torch.Tensor) -> torch.Tensor:
        """Per timestep (as the transformer is handed it), whether it falls to `expert`."""
        high = timesteps >= self.boundary_timestep
        return high if expert == "high" else ~high

    def describe(self, expert: str) -> str:
        side = ">=" if expert == "high" else "<"
        return f"{EXPERT_COMPONENTS[expert]}/, the timesteps {side} {self.boundary_timestep:g}"


def read_split(pretrained: str, revision: str | None = None, cache_dir: str | None = None) -> ExpertSplit | None:
    """The split of a two-expert Wan 2.2 (its model_index.json's `boundary_ratio` and `transformer_2`), or None for
    a one-transformer Wan (2.1, 2.2 TI2V-5B)."""
    from diffusers import DiffusionPipeline, UniPCMultistepScheduler

    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # OSError, EnvironmentError, hub errors
        raise UserError(f"--pretrained {pretrained}: could not read its model_index.json ({e}); pass a diffusers "
                        f"Wan folder or hub id.{hub_hint(pretrained)}") from e
    ratio = index.get("boundary_ratio")
    second = (index.get("transformer_2") or [None])[0] is not None
    if ratio is None and not second:
        return None
    if ratio is None or not second:
        has = "a boundary_ratio but no transformer_2" if ratio is not None else "a transformer_2 but no boundary_ratio"
        raise UserError(f"--pretrained {pretrained}: its model_index.json names {has}; WanPipeline needs both for "
                        "two experts (Wan 2.2 A14B: boundary_ratio 0.875 text-to-video, 0.9 image-to-video) and "
                        "neither for one transformer. Download the model's model_index.json again.")
    try:
        scheduler = UniPCMultistepScheduler.load_config(pretrained, subfolder="scheduler", revision=revision,
                                                        cache_dir=cache_dir)
    except Exception:  # a folder without a scheduler config: diffusers' default units
        scheduler = {}
    return ExpertSplit(float(ratio), int(scheduler.get("num_train_timesteps") or 1000))


class WanExperts:
    """The Wan spec's part that knows the two experts (see the module docstring). `select_expert` is called by
    `check_args` with the command's flags; a spec never given them (a bare spec) has one transformer."""

    has_experts = True  # ModelSpec.check_args refuses --expert for families without this
    expert: str | None = None  # the expert this run trains (ft train), None elsewhere
    split: ExpertSplit | None = None
    _expert_args: Any = None
    _loading_expert: str | None = None  # set while the other expert loads (`load_expert`)

    def check_args(self, args: Any) -> None:
        super().check_args(args)  # type: ignore[misc]
        self.select_expert(args.pretrained, getattr(args, "expert", None), hasattr(args, "expert"), args)

    def select_expert(self, pretrained: str, expert: str | None, trains: bool, args: Any = None,
                      revision: str | None = None, cache_dir: str | None = None) -> WanExperts:
        """Read --pretrained's split and check `expert` against it: a two-expert model trains one (`trains`: the
        command is ft train, whose --expert is required there); a one-transformer model takes no --expert."""
        if args is not None:
            revision, cache_dir = args.revision, args.cache_dir
        split = read_split(pretrained, revision, cache_dir)
        expert = parse_expert(expert)
        if expert is not None and split is None:
            raise UserError(f"--expert {expert}: --pretrained {pretrained} has one transformer (its model_index.json "
                            "has no transformer_2 and no boundary_ratio: Wan 2.1 or Wan 2.2 TI2V-5B), which trains "
                            "on the whole schedule; drop --expert. Only Wan 2.2 A14B has two experts.")
        if split is not None and trains and expert is None:
            raise UserError(f"--pretrained {pretrained} is a two-expert Wan 2.2 (boundary_ratio "
                            f"{split.boundary_ratio:g}): each run trains one expert; pass --expert high "
                            f"({split.describe('high')}) or --expert low ({split.describe('low')}). One shard set "
                            "serves both runs.")
        self.expert, self.split, self._expert_args = expert, split, args
        if expert is not None and split is not None and trains:
            log.info(f"Wan 2.2 expert {expert}: {split.describe(expert)} (boundary_ratio {split.boundary_ratio:g})")
        return self

    # ------------------------------------------------------------------------------------------------ loading

    def _source(self, component: str, args: Any) -> tuple[str, str | None, str | None]:
        """The expert's folder for "transformer": `transformer_2/` for low; --transformer-id (a finetune of the
        trained expert) wins, except while the other expert loads from --pretrained."""
        expert = self._loading_expert or self.expert
        if component != "transformer" or expert is None or (
                self._loading_expert is None and args.source_of("transformer")):
            return super()._source(component, args)  # type: ignore[misc]
        subfolder = EXPERT_COMPONENTS[expert]
        root = Path(args.pretrained)
        if root.exists() and not (root / subfolder).is_dir():
            raise UserError(f"--pretrained {args.pretrained} has no {subfolder}/ folder, which expert {expert} of a "
                            "two-expert Wan 2.2 loads; pass the whole diffusers Wan 2.2 A14B folder.")
        return args.pretrained, subfolder, args.revision

    @contextmanager
    def _as_expert(self, expert: str) -> Iterator[None]:
        self._loading_expert = expert
        try:
            yield
        finally:
            self._loading_expert = None

    def load_expert(self, expert: str, args: Any, device: Any) -> Any:
        """An expert's base transformer from --pretrained, in --transformer-dtype."""
        with self._as_expert(expert):
            return self.load_component("transformer", args, device)  # type: ignore[attr-defined]

    def load_pipeline(self, args: Any, device: Any, conditioning: Any = None) -> Any:
        """As the base (`transformer`: the high-noise expert), plus `transformer_2` and the boundary for a two-expert
        model: WanPipeline (WanImageToVideoPipeline for I2V-A14B) as diffusers' from_pretrained makes it."""
        pipe = super().load_pipeline(args, device, conditioning)  # type: ignore[misc]
        split = read_split(args.pretrained, args.revision, args.cache_dir)
        if split is not None:
            pipe.register_modules(transformer_2=self.load_expert("low", args, device))
            pipe.register_to_config(boundary_ratio=split.boundary_ratio)
        return pipe

    def build_pipeline(self, transformer: Any, vae: Any, scheduler: Any, conditioning: Any = None) -> Any:
        """As the base; in a one-expert run (validation), with the other expert's base weights beside the trained
        one (on its device), switched at the model's boundary."""
        pipe = super().build_pipeline(transformer, vae, scheduler, conditioning)  # type: ignore[misc]
        if self.split is None or self.expert is None:
            return pipe
        other_expert = "low" if self.expert == "high" else "high"
        device = next(p.device for p in transformer.parameters() if p.device.type != "meta")
        args = self._expert_args
        other = self.load_expert(other_expert, args, device)  # in --transformer-dtype
        high, low = (transformer, other) if self.expert == "high" else (other, transformer)
        pipe.register_modules(transformer=high, transformer_2=low)
        pipe.register_to_config(boundary_ratio=self.split.boundary_ratio)
        return pipe

    # ------------------------------------------------------------------------------------------------ training

    def timestep_filter(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The expert's part of the schedule: whether each objective timestep, made the integer WanSpec.predict
        hands the transformer, falls to the trained expert by WanPipeline's rule. None: every timestep."""
        if self.split is None or self.expert is None:
            return None
        split, expert = self.split, self.expert
        return lambda timesteps: split.trains(expert, timesteps.long())


# ---------------------------------------------------------------------------------------------- real-size configs
# Wan-AI/Wan2.2-T2V-A14B-Diffusers: two transformers of Wan 14B's config (40 layers, 40 heads x 128, ffn 13824,
# 16 channels in and out: the diffusers defaults), Wan 2.1's VAE, UMT5-XXL. One expert is held in training.
def a14b_checkpoints(umt5: dict[str, Any]) -> tuple[Checkpoint, ...]:
    return (Checkpoint("Wan2.2-T2V-A14B (one expert: each of its two 14B transformers trains as its own run)",
                       ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "wan2.2-t2v-a14b"),
                       {"transformer": {}, "vae": {}, "text_encoder": umt5}),
            # image-to-video: 36 input channels (latents, mask, the first frame's VAE encoding), no image encoder
            Checkpoint("Wan2.2-I2V-A14B (one expert: each of its two 14B transformers trains as its own run)",
                       ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "wan2.2-i2v-a14b"),
                       {"transformer": {"in_channels": 36}, "vae": {}, "text_encoder": umt5}, image_to_video=True))


def tiny_a14b_components(seed: int = 0, boundary_ratio: float = 0.875) -> dict[str, Any]:
    """Wan 2.2 A14B's layout at toy size: the tiny Wan with a second transformer of the same config (other random
    weights) and the boundary; `WanPipeline(**parts)` builds it (0.875: text-to-video's)."""
    import torch
    from diffusers import WanTransformer3DModel

    from .wan import WanSpec

    parts = WanSpec().tiny_components(seed)
    torch.manual_seed(seed + 2)
    parts["transformer_2"] = WanTransformer3DModel.from_config(parts["transformer"].config)
    return {**parts, "boundary_ratio": boundary_ratio}


def tiny_a14b_i2v_components(seed: int = 0) -> dict[str, Any]:
    """Wan 2.2 I2V-A14B's layout at toy size: two experts taking the mask and the first frame's VAE encoding on
    their channels (in_channels 2 x 4 + 4), no image encoder, the image-to-video boundary 0.9;
    `WanImageToVideoPipeline(**parts)` builds it."""
    import torch
    from diffusers import WanTransformer3DModel

    parts = tiny_a14b_components(seed, boundary_ratio=0.9)
    config = {**parts["transformer"].config, "in_channels": 12}
    torch.manual_seed(seed + 3)
    parts["transformer"] = WanTransformer3DModel.from_config(config)
    parts["transformer_2"] = WanTransformer3DModel.from_config(config)
    return {**parts, "image_encoder": None, "image_processor": None}

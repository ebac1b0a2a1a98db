"""Sampling from embeddings: one prompt's stored conditioning in, uint8 frames out, through the family's pipeline.

Shared by `ft generate` (which encodes its `--prompt` with the spec's `encode_prompts`, the code precompute runs)
and by validation during training (which reads the prompt table that precompute wrote), so the two cannot drift:
the same pipeline call, the same defaults, the same negative-prompt rule and the same conversion to frames.

- Defaults are the pipeline's own `__call__` defaults (steps, guidance); the frame rate is the family's
  (`ModelSpec.default_fps`), passed to the pipeline where it takes one (LTX-Video's `frame_rate`).
- The negative prompt's embeddings go with every call that can use them: classifier-free guidance (CogVideoX,
  LTX-Video) and true CFG above 1 (HunyuanVideo, whose `guidance_scale` is an embedded scale). Without them the
  pipeline would call `encode_prompt` on its text encoder, which a validation pipeline does not have.
- `before_decode` runs once the last denoising step is done, before the pipeline decodes (its step-end callback):
  validation moves the VAE onto the GPU there and nowhere earlier.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ft.pipelines.base import ModelSpec


def pipeline_defaults(pipeline: Any) -> dict[str, Any]:
    """The defaults of a pipeline's (or pipeline class's) `__call__` arguments."""
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    return {name: p.default for name, p in inspect.signature(cls.__call__).parameters.items()
            if p.default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class SamplingSettings:
    """How one video is sampled; None: the pipeline's default (the family's for the frame rate)."""

    num_frames: int
    height: int
    width: int
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    frame_rate: float | None = None
    seed: int = 0

    def resolved(self, spec: ModelSpec, pipeline: Any) -> dict[str, Any]:
        """The pipeline's argument values this call uses (plus `fps`, the mp4's rate)."""
        defaults = pipeline_defaults(pipeline)
        values: dict[str, Any] = {
            "num_inference_steps": self.num_inference_steps or defaults["num_inference_steps"],
            "guidance_scale": defaults["guidance_scale"] if self.guidance_scale is None else self.guidance_scale,
            "fps": self.frame_rate or spec.default_fps}
        if "true_cfg_scale" in defaults:
            values["true_cfg_scale"] = 1.0 if self.true_cfg_scale is None else self.true_cfg_scale
        if spec.frame_rate_argument:
            values[spec.frame_rate_argument] = values["fps"]
        return values

    def uses_negative(self, spec: ModelSpec, pipeline: Any) -> bool:
        """Whether the call needs the negative prompt's embeddings (see the module docstring)."""
        return self.resolved(spec, pipeline).get("true_cfg_scale", 2.0) > 1

    def forwards_per_step(self, spec: ModelSpec, pipeline: Any) -> int:
        """Transformer calls per denoising step: 2 under true CFG (a separate negative pass), else 1 (classifier-
        free guidance batches the two). Ranks sampling in lockstep (FSDP) must agree on it."""
        return 2 if self.resolved(spec, pipeline).get("true_cfg_scale", 1.0) > 1 else 1


def pipeline_embeddings(cond: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None,
                        device: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One prompt's conditioning (no batch dimension) as the pipeline's keyword arguments: a batch of one on
    `device`, floating tensors in `dtype`; the negative prompt's under `negative_*`."""
    def batch(t: torch.Tensor) -> torch.Tensor:
        return t[None].to(device, dtype if t.is_floating_point() else t.dtype)

    out = {k: batch(v) for k, v in cond.items()}
    out |= {f"negative_{k}": batch(v) for k, v in (negative or {}).items()}
    return out


def sample_frames(spec: ModelSpec, pipe: Any, cond: dict[str, torch.Tensor],
                  negative: dict[str, torch.Tensor] | None, settings: SamplingSettings, dtype: torch.dtype,
                  before_decode: Callable[[], None] | None = None) -> np.ndarray:
    """Sample one video; returns uint8 frames [F, H, W, 3]. `negative` is needed when `settings.uses_negative`."""
    import numpy as np
    import torch

    values = {k: v for k, v in settings.resolved(spec, pipe).items() if k != "fps"}
    use_negative = settings.uses_negative(spec, pipe)
    assert negative is not None or not use_negative, "the negative prompt's embeddings are needed"
    embeds = pipeline_embeddings(cond, negative if use_negative else None, pipe._execution_device, dtype)
    extra: dict[str, Any] = {}
    if before_decode is not None:
        def on_step_end(pipeline: Any, i: int, t: Any, kwargs: dict) -> dict:
            if i + 1 >= pipeline.num_timesteps:
                before_decode()
            return {}

        extra["callback_on_step_end"] = on_step_end
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    result = pipe(generator=generator, output_type="np", num_frames=settings.num_frames, height=settings.height,
                  width=settings.width, **values, **embeds, **spec.pipeline_call_kwargs(dict(pipe.transformer.config)),
                  **extra)
    frames = np.asarray(result.frames[0])
    return (frames.clip(0, 1) * 255).round().astype(np.uint8)

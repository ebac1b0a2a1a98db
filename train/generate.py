"""`ft generate`: a video from the base model, optionally with a trained LoRA, written as mp4; and the sampling
code it shares with validation during training (embeddings in, frames out).

The pipeline is assembled through the ModelSpec (so `--transformer-id` and the other overrides apply, and a
full-finetune output can stand in as the transformer). The LoRA is loaded with the pipeline's own
`load_lora_weights`, exactly as a user of diffusers would; one in another layout (ComfyUI's, the original
checkpoint's, kohya's: from ft or another tool) is read by lora_formats.py into diffusers' first. `--prompt` is
encoded with the spec's `encode_prompts`, the code precompute runs; validation (validation.py) reads the prompt
table precompute wrote instead. Both then go through `sample_frames`, so the two cannot drift: the same pipeline
call, the same defaults, the same negative-prompt rule and the same conversion to frames.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common.config import REQUIRED, check_positive, opt
from ft.common.errors import UserError
from ft.common.faults import check_writable, describe, environment_fault, fix
from ft.common.logs import log, quiet_libraries
from ft.common.model_args import ModelArgs
from ft.common.runtime import pick_device
from ft.pipelines.base import ModelSpec
from ft.pipelines.image import (
    ImageConditioning,
    describe_conditioning,
    i2v_examples,
    read_model_index,
    resolve_conditioning,
)
from ft.pipelines.registry import per_family, spec_for
from ft.train.video_writer import write_video

from .config import TRAIN_CONFIG_NAME
from .lora_formats import config_modules, diffusers_state, find_lora_file, read_lora

if TYPE_CHECKING:
    import numpy as np
    import torch

GEN = "Generation"


@dataclass(kw_only=True)
class GenerateConfig(ModelArgs):
    """Generate a video with the base model plus a trained LoRA (--lora) or finetuned transformer (--transformer-id)."""

    prompt: str = opt(REQUIRED, "What the video should show.", panel=GEN)
    out: str = opt("video.mp4", "Where to write the mp4.", panel=GEN)
    lora: str | None = opt(None, "A LoRA: a .safetensors file, or a folder holding one (the --output-dir of `ft "
                                 "train`, a checkpoint). Diffusers', ComfyUI's original-layout (ft's lora_comfyui, "
                                 "diffusion-pipe, ai-toolkit) and kohya's (musubi-tuner) layouts are read.", panel=GEN)
    lora_2: str | None = opt(None, "Wan 2.2 A14B: the low-noise expert's LoRA (an `ft train --expert low` run), "
                                   "loaded into transformer_2 as diffusers' load_lora_weights(..., "
                                   "load_into_transformer_2=True) does; --lora is then the high-noise expert's. "
                                   "Either may be left out (that expert samples with its base weights).", panel=GEN)
    lora_scale: float = opt(1.0, "How strongly the LoRA applies (both LoRAs with --lora-2).", panel=GEN)
    negative_prompt: str | None = opt(None, "What the video should not show.", panel=GEN)
    num_frames: int | None = opt(None, "Frames to generate. Default: the model's ("
                                       f"{per_family(lambda s: s().generation_defaults({}, {})['num_frames'])}).",
                                 panel=GEN)
    height: int | None = opt(None, "Height in pixels. Default: the model's.", panel=GEN)
    width: int | None = opt(None, "Width in pixels. Default: the model's.", panel=GEN)
    num_inference_steps: int | None = opt(None, "Denoising steps. Default: the pipeline's (50).", panel=GEN)
    guidance_scale: float | None = opt(None, "Classifier-free guidance scale. Default: the pipeline's (6 for "
                                             "CogVideoX, 3 for LTX-Video).", panel=GEN)
    true_cfg_scale: float | None = opt(None, "True classifier-free guidance with --negative-prompt, for pipelines "
                                             "whose --guidance-scale is an embedded scale (HunyuanVideo and its "
                                             "finetunes; SkyReels-V1 samples with about 6). Off (1) by default.",
                                       panel=GEN)
    max_sequence_length: int | None = opt(None, "Text tokens the prompt is encoded to. Default: the length the "
                                                f"weights were trained at (the shard set named in the "
                                                f"{TRAIN_CONFIG_NAME} beside --lora or --transformer-id), else the "
                                                f"model's ({per_family(lambda s: s.default_text_tokens)}).",
                                          panel=GEN)
    image: str | None = opt(None, "The image to start from (image-to-video checkpoints; with one that serves both, "
                                  "such as LTX-Video or Wan 2.2 TI2V-5B, it makes the run image-to-video).",
                            panel=GEN)
    last_image: str | None = opt(None, "The image to end on (first-last-frame models: Wan2.1-FLF2V).", panel=GEN)
    seed: int = opt(0, "Seed of the initial noise.", panel=GEN)
    fps: float | None = opt(None, "Frames per second: the mp4's, and the frame rate the pipeline conditions on "
                                  "where it takes one (LTX-Video). Default: the model's "
                                  f"({per_family(lambda s: f'{s.default_fps:g}')}).", panel=GEN)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.", panel=GEN)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_inference_steps", "fps", "max_sequence_length"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name)


# ---------------------------------------------------------------------------------------------- sampling


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
        """The pipeline's argument values this call uses (plus `fps`, the mp4's rate). A pipeline whose guidance
        lives in its `guider` (`guided_by_guider`) has the guider's scale as its default."""
        defaults = pipeline_defaults(pipeline)
        default_guidance = (getattr(getattr(pipeline, "guider", None), "guidance_scale", None)
                            if guided_by_guider(pipeline) else defaults["guidance_scale"])
        values: dict[str, Any] = {
            "num_inference_steps": self.num_inference_steps or defaults["num_inference_steps"],
            "guidance_scale": default_guidance if self.guidance_scale is None else self.guidance_scale,
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
        values = self.resolved(spec, pipeline)
        if guided_by_guider(pipeline):  # ClassifierFreeGuidance runs the transformer once per condition
            return 2 if (values["guidance_scale"] or 1.0) > 1 else 1
        return 2 if values.get("true_cfg_scale", 1.0) > 1 else 1


def guided_by_guider(pipeline: Any) -> bool:
    """Whether the pipeline's classifier-free guidance is its `guider` component (HunyuanVideo15Pipeline): its
    __call__ takes no guidance scale; `--guidance-scale` replaces the guider's (`set_guidance`)."""
    return "guidance_scale" not in pipeline_defaults(pipeline)


def set_guidance(pipe: Any, values: dict[str, Any]) -> None:
    """Move the guidance scale of `values` into the pipeline's guider, for a pipeline guided by one."""
    if not guided_by_guider(pipe):
        return
    scale = values.pop("guidance_scale")
    if scale is not None and scale != pipe.guider.guidance_scale:
        pipe.register_modules(guider=pipe.guider.new(guidance_scale=scale))


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
                  before_decode: Callable[[], None] | None = None, images: dict[str, Any] | None = None
                  ) -> np.ndarray:
    """Sample one video; returns uint8 frames [F, H, W, 3]. `negative` is needed when `settings.uses_negative`;
    `images` are an image-to-video pipeline's image arguments (`image`, `last_image`, ...)."""
    import numpy as np
    import torch

    values = {k: v for k, v in settings.resolved(spec, pipe).items() if k != "fps"}
    set_guidance(pipe, values)
    use_negative = settings.uses_negative(spec, pipe)
    assert negative is not None or not use_negative, "the negative prompt's embeddings are needed"
    embeds = pipeline_embeddings(cond, negative if use_negative else None, pipe._execution_device, dtype)
    extra: dict[str, Any] = {}
    if before_decode is not None and "callback_on_step_end" not in pipeline_defaults(pipe):
        before_decode()  # a pipeline without step callbacks (HunyuanVideo15Pipeline): the VAE moves before sampling
    elif before_decode is not None:
        def on_step_end(pipeline: Any, i: int, t: Any, kwargs: dict) -> dict:
            if i + 1 >= pipeline.num_timesteps:
                before_decode()
            return {}

        extra["callback_on_step_end"] = on_step_end
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    # a pipeline that sizes its video from its image takes no height or width (`ModelSpec.image_generation_size`)
    size = {"height": settings.height, "width": settings.width} if "height" in pipeline_defaults(pipe) else {}
    result = pipe(generator=generator, output_type="np", num_frames=settings.num_frames, **size, **values, **embeds,
                  **spec.pipeline_call_kwargs(dict(pipe.transformer.config)), **extra, **(images or {}))
    frames = np.asarray(result.frames[0])
    return (frames.clip(0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- ft generate


def resolve_size(spec: ModelSpec, cfg: GenerateConfig) -> dict[str, int]:
    """num_frames, height and width: the flags, else the model's defaults; checked before anything is loaded."""
    transformer_config, vae_config = spec.load_config("transformer", cfg), spec.load_config("vae", cfg)
    defaults = spec.generation_defaults(transformer_config, vae_config)
    size = {"num_frames": cfg.num_frames or defaults["num_frames"], "height": cfg.height or defaults["height"],
            "width": cfg.width or defaults["width"]}
    problem = spec.check_generation_size((size["num_frames"], size["height"], size["width"]), vae_config,
                                         transformer_config)
    if problem:
        raise UserError(f"--num-frames {size['num_frames']} --height {size['height']} --width {size['width']}: "
                        f"{problem}.")
    return size


def trained_text_length(cfg: GenerateConfig) -> int | None:
    """The text length the trained weights saw: `max_sequence_length` of the first shard set in the
    train_config.json of the run that wrote --lora (or the --transformer-id folder), looked for in that folder and
    the two above it (a checkpoint's LoRA is OUTPUT_DIR/checkpoints/checkpoint-N/); a relative shard path leads
    from the folder training ran in (`training_folder`), not the current one. None when there is no such file or
    the shard set is not readable here."""
    import json

    from ft.common.shards import load_manifest

    from .loader import parse_shard_arg

    starts = [Path(p) for p in (cfg.lora, cfg.lora_2, cfg.transformer_id) if p]
    for start in starts:
        path = train_config_beside(start)
        if path is not None:
            try:
                saved = json.loads(path.read_text())
                shards = parse_shard_arg(saved["shards"][0])[0]
                if "://" not in shards:  # a folder: relative to where training ran (a URL stays as it is)
                    shards = str(training_folder(path.parent, saved.get("output_dir")) / shards)
                manifest = load_manifest(shards)
                return int(manifest.encoding["max_sequence_length"])
            except (OSError, ValueError, KeyError, IndexError, TypeError, UserError) as e:
                log.info(f"{path}: its shard set's text length is not readable here ({e}); the model's default "
                         "applies (--max-sequence-length sets it)")
                return None
    return None


def training_folder(run_folder: Path, output_dir: str | None) -> Path:
    """The folder `ft train` ran in, where the relative paths of its train_config.json lead from: `run_folder`
    (the one holding the file) less the `--output-dir` it was typed as, when that was relative; else the current
    folder. (An absolute path joined to it stays as it is.)"""
    out = Path(output_dir) if output_dir else None
    if out is None or out.is_absolute():
        return Path.cwd()
    parts = [part for part in out.parts if part != "."]
    here = run_folder.resolve().parts
    if parts and ".." not in parts and tuple(here[-len(parts):]) == tuple(parts):
        return Path(*here[:-len(parts)])
    return Path.cwd()


def text_length(spec: ModelSpec, cfg: GenerateConfig, transformer_config: dict) -> int:
    """--max-sequence-length, else the trained length, else the family's default; checked against the model."""
    length = cfg.max_sequence_length or trained_text_length(cfg) or spec.default_sequence_length(transformer_config)
    problem = spec.check_sequence_length(length, transformer_config)
    if problem:
        raise UserError(f"--max-sequence-length {length}: {problem}.")
    return length


def train_config_beside(path: Path) -> Path | None:
    """The train_config.json of the run that wrote `path` (a --lora or --transformer-id): in its folder or the two
    above it (a checkpoint's LoRA is OUTPUT_DIR/checkpoints/checkpoint-N/)."""
    folder = path.parent if path.is_file() else path
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / TRAIN_CONFIG_NAME).is_file():
            return candidate / TRAIN_CONFIG_NAME
    return None


def check_lora_family(spec: ModelSpec, lora: Path, flag: str = "--lora") -> None:
    """Refuse weights that the train_config.json beside them says were trained for another family (peft would
    fail deep inside with the target modules it cannot find, or load nothing)."""
    import json

    from ft.pipelines.registry import family_name

    path = train_config_beside(lora)
    if path is None:
        return
    try:
        model = json.loads(path.read_text())["model"]
        family = family_name(str(model))
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return  # not ft's, or unreadable: the weights themselves are checked when they load
    if family != spec.name:
        raise UserError(f"{flag} {lora}: trained for --model {family} ({path}), not {spec.name}; generate with "
                        f"--model {family} and that family's --pretrained.")


def generation_conditioning(spec: ModelSpec, cfg: GenerateConfig) -> ImageConditioning | None:
    """Whether `ft generate` runs the image-to-video pipeline: --mode and the checkpoint (pipelines/image.py), with
    --image making a checkpoint that serves both image-to-video; the images are checked to be readable first."""
    transformer_config = spec.load_config("transformer", cfg)
    model_index = read_model_index(cfg.pretrained, cfg.revision, cfg.cache_dir)
    where = f"--pretrained {cfg.pretrained}"
    found = spec.image_conditioning(transformer_config, model_index)
    mode = "i2v" if cfg.mode == "auto" and cfg.image and found is not None else cfg.mode
    conditioning = resolve_conditioning(spec, mode, transformer_config, model_index, where)
    if conditioning is None:
        if cfg.image or cfg.last_image:
            why = f"{where} is a text-to-video checkpoint" if found is None else "--mode t2v"
            flag = "--image" if cfg.image else "--last-image"
            raise UserError(f"{flag}: {why}; pass an image-to-video checkpoint{i2v_examples(spec)} to start from an "
                            f"image, or drop {flag}.")
        return None
    if not cfg.image:
        raise UserError(f"{where} is {describe_conditioning(conditioning)}: pass --image PATH (the first frame)"
                        + (" and --last-image PATH (the last)" if "last" in conditioning.frames else "") + ".")
    if "last" in conditioning.frames and not cfg.last_image:
        raise UserError(f"{where} is a first-last-frame model: pass --last-image PATH too.")
    if cfg.last_image and "last" not in conditioning.frames:
        raise UserError(f"--last-image: {where} is conditioned on the first frame only; drop --last-image.")
    for flag, path in (("--image", cfg.image), ("--last-image", cfg.last_image)):
        if path:
            read_image(path, flag)
    return conditioning


def read_image(path: str, flag: str) -> Any:
    """An RGB PIL image, or a UserError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise UserError(f"{flag} {path}: no such file.") from e
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{flag} {path}: not a readable image ({e}); pass a PNG or JPEG.") from e


def pipeline_images(cfg: GenerateConfig, conditioning: ImageConditioning | None) -> dict[str, Any]:
    if conditioning is None:
        return {}
    images = {"image": read_image(str(cfg.image), "--image")}
    if cfg.last_image:
        images["last_image"] = read_image(cfg.last_image, "--last-image")
    return images


def check_lora_expert(lora: Path, flag: str, expected: str | None) -> None:
    """Refuse a LoRA whose train_config.json names another Wan 2.2 expert than the one `flag` loads into (a low-noise
    LoRA given as --lora would load into the high-noise expert, silently)."""
    import json

    path = train_config_beside(lora)
    try:
        trained = json.loads(path.read_text()).get("expert") if path is not None else None
    except (OSError, ValueError, AttributeError):
        return
    if trained == expected:
        return
    if trained is None and expected == "high":  # a Wan 2.1 or Wan 2.2 one-transformer LoRA: it fits the high expert
        log.warning(f"{flag} {lora}: trained on a one-transformer model ({path}), not as a Wan 2.2 expert; it loads "
                    "into the high-noise expert alone (the low-noise one takes --lora-2).")
        return
    if trained is None:
        raise UserError(f"{flag} {lora}: trained on a one-transformer model ({path}), not as a Wan 2.2 expert; pass "
                        "an `ft train --expert low` run as --lora-2.")
    right = "--lora" if trained == "high" else "--lora-2"
    raise UserError(f"{flag} {lora}: trained as the {trained}-noise expert ({path}); pass it as {right}.")


def read_lora_file(spec: ModelSpec, cfg: GenerateConfig, value: str, flag: str, expert: str | None
                   ) -> tuple[Path, str, dict]:
    """A LoRA's file, layout and weights, read (any layout) and checked against the family, the Wan 2.2 expert it
    is given for (None: a one-transformer model) and the transformer's modules as its config makes them."""
    lora = find_lora_file(value, flag)
    check_lora_family(spec, lora, flag)
    if expert is not None:
        check_lora_expert(lora, flag, expert)
    layout, pairs = read_lora(spec, lora, config_modules(spec, spec.load_config("transformer", cfg)), flag)
    return lora, layout, pairs


def load_lora(spec: ModelSpec, cfg: GenerateConfig, pipe: Any, read: tuple[Path, str, dict], flag: str,
              adapter: str, into_transformer_2: bool) -> None:
    """One read LoRA into the pipeline's transformer or (--lora-2) transformer_2, through the pipeline's own
    `load_lora_weights`; a pipeline without one (HunyuanVideo15Pipeline in diffusers 0.42) through its
    transformer's `load_lora_adapter`, diffusers' loader of the model itself."""
    lora, layout, pairs = read
    if hasattr(pipe, "load_lora_weights"):
        loader, extra = pipe.load_lora_weights, {"load_into_transformer_2": True} if into_transformer_2 else {}
    else:
        loader, extra = pipe.transformer.load_lora_adapter, {"prefix": "transformer"}
    try:
        if layout == "diffusers":  # diffusers reads its own layout (and its adapter config) itself
            loader(str(lora.parent), weight_name=lora.name, adapter_name=adapter, **extra)
        else:
            loader(diffusers_state(pairs), adapter_name=adapter, **extra)
    except (ValueError, KeyError, RuntimeError, OSError) as e:  # peft's NoMatchingPeftModuleError is a ValueError
        raise UserError(f"{flag} {lora}: these LoRA weights do not fit this {spec.display_name} transformer "
                        f"({type(e).__name__}: {e}); pass a LoRA trained on --pretrained {cfg.pretrained}.") from e


def load_pipeline_with_lora(spec: ModelSpec, cfg: GenerateConfig, device: str,
                            conditioning: ImageConditioning | None = None) -> Any:
    """The pipeline with --lora loaded as adapter "ft" (and, for a two-expert Wan 2.2, --lora-2 into transformer_2
    as "ft_2"). The LoRAs are read (any layout) before any model loads."""
    two_experts = getattr(spec, "split", None) is not None  # a two-expert Wan 2.2 (wan_experts.py)
    if cfg.lora_2 and not two_experts:
        raise UserError(f"--lora-2: --pretrained {cfg.pretrained} has one transformer (not a two-expert Wan 2.2 "
                        "A14B); pass its LoRA as --lora.")
    high = read_lora_file(spec, cfg, cfg.lora, "--lora", "high" if two_experts else None) if cfg.lora else None
    low = read_lora_file(spec, cfg, cfg.lora_2, "--lora-2", "low") if cfg.lora_2 else None
    if two_experts and (high is None) != (low is None):
        missing = "high-noise expert (--lora)" if high is None else "low-noise expert (--lora-2)"
        log.warning(f"--pretrained {cfg.pretrained} has two experts and one LoRA was given: the {missing} samples "
                    "without a LoRA.")
    pipe = spec.load_pipeline(cfg, device, conditioning)
    loaded = []
    if high is not None:
        load_lora(spec, cfg, pipe, high, "--lora", "ft", into_transformer_2=False)
        loaded.append((pipe.transformer, "ft"))
    if low is not None:
        load_lora(spec, cfg, pipe, low, "--lora-2", "ft_2", into_transformer_2=True)
        loaded.append((pipe.transformer_2, "ft_2"))
    for model, adapter in loaded:  # each transformer its own adapter (the pipeline's set_adapters wants both in each)
        model.set_adapters([adapter], [cfg.lora_scale])
    return pipe


def sampling_settings(spec: ModelSpec, cfg: GenerateConfig, size: dict[str, int]) -> SamplingSettings:
    """The flags as the shared sampling settings (None: the pipeline's default, the model's fps)."""
    return SamplingSettings(num_frames=size["num_frames"], height=size["height"], width=size["width"],
                            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                            true_cfg_scale=cfg.true_cfg_scale, frame_rate=cfg.fps, seed=cfg.seed)


def true_cfg_settings(cfg: GenerateConfig, pipe: Any) -> dict[str, float]:
    """`true_cfg_scale` for pipelines that take one (their guidance scale is embedded): a negative prompt acts only
    with it above 1, so a negative prompt without it is refused rather than silently ignored."""
    import inspect

    pipeline_cls = pipe if isinstance(pipe, type) else type(pipe)
    takes_it = "true_cfg_scale" in inspect.signature(pipeline_cls.__call__).parameters
    name = pipeline_cls.__name__
    if not takes_it:
        if cfg.true_cfg_scale is not None:
            raise UserError(f"--true-cfg-scale: {name} has no true CFG; its --guidance-scale is classifier-free "
                            "guidance already.")
        return {}
    scale = 1.0 if cfg.true_cfg_scale is None else cfg.true_cfg_scale
    if cfg.negative_prompt and scale <= 1:
        raise UserError(f"--negative-prompt: {name} uses a negative prompt only with --true-cfg-scale above 1 (its "
                        "--guidance-scale is embedded guidance); add --true-cfg-scale 6, say, or drop the negative "
                        "prompt.")
    return {"true_cfg_scale": scale}


def match_vae_dtype(spec: ModelSpec, vae: Any, dtype: torch.dtype) -> None:
    """Put the VAE in the transformer's dtype where the family's pipeline decodes the transformer's latents without
    casting them (CogVideoX); elsewhere the pipeline casts them to the VAE's dtype, and the VAE keeps the one it was
    loaded in (`--vae-dtype`: a float32 Wan VAE, as diffusers' Wan example decodes)."""
    if not spec.decode_casts_latents:
        vae.to(dtype=dtype)


def generate_frames(spec: ModelSpec, cfg: GenerateConfig, pipe: Any, size: dict[str, int],
                    conditioning: ImageConditioning | None = None) -> Any:
    """Run the pipeline; returns uint8 frames [F, H, W, 3].

    The captions are encoded with the spec's `encode_prompts`, the very code precompute used, so the LoRA sees
    the conditioning it was trained on; the text encoder then leaves the GPU, and the embeddings go through the
    sampling code validation uses (`sample_frames`).
    """
    import torch

    transformer_config = dict(pipe.transformer.config)
    dtype = pipe.transformer.dtype
    match_vae_dtype(spec, pipe.vae, dtype)
    encoders = {name: getattr(pipe, name) for name in spec.text_components}
    seq_len = text_length(spec, cfg, transformer_config)
    true_cfg_settings(cfg, pipe)
    settings = sampling_settings(spec, cfg, size)
    images = pipeline_images(cfg, conditioning)
    with torch.no_grad():
        prompt = spec.encode_prompts(encoders, [cfg.prompt], seq_len)
        negative = spec.encode_prompts(encoders, [cfg.negative_prompt or ""], seq_len) if settings.uses_negative(
            spec, pipe) else None
        if conditioning is not None and conditioning.caption:  # the text encoder reads the image with the prompt
            readers = {**encoders, **{name: getattr(pipe, name) for name in spec.image_component_classes}}
            prompt |= spec.image_prompt_embeds(readers, [images["image"]], [cfg.prompt], seq_len, conditioning)
            if negative is not None:
                negative |= spec.image_prompt_embeds(readers, [images["image"]], [cfg.negative_prompt or ""],
                                                     seq_len, conditioning, negative=True)
    for name in spec.text_components:
        if hasattr(encoders[name], "to"):
            encoders[name].to("cpu")
    first = {k: v[0] for k, v in prompt.items()}
    return sample_frames(spec, pipe, first, {k: v[0] for k, v in negative.items()} if negative else None, settings,
                         dtype, images=images)


VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".m4v", ".avi")


def check_out(out: str) -> Path:
    """--out, checked before any model loads: not a folder, a container that takes H.264, and its folder takes a
    write."""
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out} is a folder; give the mp4's file name, e.g. --out {path / 'video.mp4'}.")
    if path.suffix.lower() not in VIDEO_SUFFIXES:  # PyAV picks the container by the suffix; H.264 fits these
        raise UserError(f"--out {out}: the video is written as H.264 in a {', '.join(VIDEO_SUFFIXES)} file; give "
                        f"one of those suffixes, e.g. --out {path.with_suffix('.mp4')}.")
    check_writable(path.parent, "--out", f"the folder {path.name} is written to")
    return path


def save_video(out: Path, frames: Any, fps: float) -> Path:
    """Write the mp4; if --out fails now (the disk filled while sampling), the video is written to the temporary
    folder instead and the error names it, so the sampled video is never lost."""
    try:
        return write_video(out, frames, fps)
    except BaseException as e:
        fault = environment_fault(e)
        if fault is None:
            raise
        out.unlink(missing_ok=True)
        import tempfile

        rescue = Path(tempfile.mkdtemp(prefix="ft-generate-")) / out.name
        write_video(rescue, frames, fps)
        raise UserError(f"--out {out}: {describe(fault)} while writing the video; it was saved to {rescue} "
                        f"instead ({fix(fault)}, then move it).") from e


def image_sized(spec: ModelSpec, cfg: GenerateConfig) -> dict[str, int]:
    """The height and width of a pipeline that sizes its video from --image (`ModelSpec.image_generation_size`:
    HunyuanVideo 1.5 I2V), or {} for one that takes --height/--width; --height/--width of another size refused."""
    found = spec.image_generation_size(read_image(str(cfg.image), "--image").size, spec.load_config("transformer", cfg),
                                       spec.load_config("vae", cfg))
    if found is None:
        return {}
    height, width = found
    if (cfg.height and cfg.height != height) or (cfg.width and cfg.width != width):
        raise UserError(f"--height {cfg.height} --width {cfg.width}: this image-to-video pipeline makes the video at "
                        f"the size it picks for --image {cfg.image}'s aspect, {width}x{height}; drop --height/--width "
                        "(or pass those), or crop the image to another aspect.")
    return {"height": height, "width": width}


def run_generate(cfg: GenerateConfig) -> Path:
    spec = spec_for(cfg)
    size = resolve_size(spec, cfg)
    out = check_out(cfg.out)  # before sampling: a read-only or full folder costs no generation
    from ft.pipelines.loading import import_class

    conditioning = generation_conditioning(spec, cfg)
    sized = image_sized(spec, cfg) if conditioning is not None else {}
    size |= sized
    for flag, path in (("--image", cfg.image), ("--last-image", cfg.last_image)):
        if conditioning is not None and path and not sized:
            width, height = read_image(path, flag).size
            if abs((width / height) / (size["width"] / size["height"]) - 1) > 0.02:
                log.warning(f"{flag} {path} is {width}x{height}: the pipeline stretches it to {size['width']}x"
                            f"{size['height']} (training centre-cropped its frames to the bucket); crop it to that "
                            "aspect, or pass --width/--height of its own")
    true_cfg_settings(cfg, import_class(*(conditioning.pipeline_class if conditioning else spec.pipeline_class)))
    quiet_libraries()  # a refused flag cost no model load
    device = pick_device(cfg.device)
    pipe = load_pipeline_with_lora(spec, cfg, device, conditioning)
    frames = generate_frames(spec, cfg, pipe, size, conditioning)
    path = save_video(out, frames, sampling_settings(spec, cfg, size).resolved(spec, pipe)["fps"])
    log.info(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[1]}x{frames.shape[2]})")
    return path

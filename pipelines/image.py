"""Image-to-video: which checkpoints are conditioned on an image, how, and which mode a run trains.

A checkpoint says what it is in its files: the transformer's config (Wan's `image_dim` and 36 input channels,
CogVideoX-I2V's doubled `in_channels`, HunyuanVideo-I2V's `image_condition_type`) and model_index.json (its
pipeline class, Wan 2.2's `expand_timesteps`). A family reads them in `ModelSpec.image_conditioning`, which returns
an `ImageConditioning` (how the image enters the transformer, which frames of a clip condition it, whether an image
encoder computes embeddings of it, the diffusers pipeline that samples it) or None for a text-to-video checkpoint.
Some checkpoints serve both modes (Wan 2.2 TI2V-5B; LTX-Video): `text_to_video` says so.

`--mode auto|t2v|i2v` (a model flag, so precompute, train, generate and estimate read it alike) picks what a run
does: `auto` trains what the checkpoint is (text-to-video where it serves both); `resolve_conditioning` turns the
mode and the checkpoint into the run's conditioning or a message naming the folder and the fix.

In stage 1 the conditioning is a third group of tensors per sample (`image`: the VAE encoding of the conditioning
frames, the image encoder's embeddings), computed by `ModelSpec.encode_image` from the clip's frames at the bucket's
size, keyed by its own half key (`image_key`, see precompute/planned_sample.py), and described in the manifest's
`encoding.image` (`manifest_entry`); stage 2 checks that description against the transformer before any weight
loads (`check_image_shards`) and hands the group to the family's `predict` as `StepInputs.image`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError

if TYPE_CHECKING:
    from ft.common.shards import Manifest

    from .base import ModelSpec

MODES = ("auto", "t2v", "i2v")


@dataclass(frozen=True)
class ImageConditioning:
    """How a checkpoint is conditioned on an image.

    `kind` names the way the image enters the transformer (it must match between the shards and the checkpoint):
    "channel-concat" (the VAE encoding of the image frames and a mask concatenated to the latents' channels: Wan
    2.1 I2V/FLF2V, Wan 2.2 I2V-A14B, CogVideoX-I2V, HunyuanVideo-I2V latent_concat), "first-frame" (the first
    latent frame replaced by the image's, with per-token timesteps: Wan 2.2 TI2V-5B, LTX-Video). `frames` are the
    clip's frames that condition it ("first", and "last" for first-last-frame models); `image_encoder` whether the
    pipeline also encodes the image with an image encoder; `pipeline_class` the diffusers pipeline that samples it;
    `text_to_video` whether the same checkpoint also samples without an image; `caption` whether the image's
    conditioning depends on the caption too (HunyuanVideo-I2V's Llava encodes the prompt together with the image):
    `encode_image` then receives the captions, the image half's key holds the text half's, and `ft generate` gets
    the prompt's embeddings from `ModelSpec.image_prompt_embeds`."""

    kind: str
    pipeline_class: tuple[str, str]
    frames: tuple[str, ...] = ("first",)
    image_encoder: bool = False
    text_to_video: bool = False
    caption: bool = False

    def manifest_entry(self, encoders: dict[str, Any]) -> dict[str, Any]:
        """What the shard set's manifest says of its image conditioning (`encoding.image`); `encoders` are the image
        encoder's (and processor's) fingerprints."""
        entry = asdict(self)
        entry["pipeline_class"] = list(self.pipeline_class)
        entry["frames"] = list(self.frames)
        entry["encoders"] = encoders
        return entry


def read_model_index(pretrained: str, revision: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """`pretrained`'s model_index.json ({} where there is none to read: a folder of components only)."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(pretrained, revision=revision, cache_dir=cache_dir))
    except Exception:  # OSError, EnvironmentError, hub errors: the components' own configs still decide
        return {}


def describe_conditioning(conditioning: ImageConditioning | None) -> str:
    if conditioning is None:
        return "text-to-video"
    frames = " and ".join(conditioning.frames)
    return f"image-to-video ({conditioning.pipeline_class[1]}, the clip's {frames} frame{'s' * (len(frames) > 5)})"


def resolve_conditioning(spec: ModelSpec, mode: str, transformer_config: dict, model_index: dict, where: str
                         ) -> ImageConditioning | None:
    """The run's image conditioning (None: text-to-video) for `--mode` and the checkpoint at `where`."""
    found = spec.image_conditioning(transformer_config, model_index)
    if mode == "t2v":
        if found is not None and not found.text_to_video:
            raise UserError(f"--mode t2v: {where} is an image-to-video checkpoint ({found.pipeline_class[1]}) that "
                            "does not sample without an image; pass a text-to-video checkpoint, or drop --mode t2v.")
        return None
    if mode == "i2v":
        if found is None:
            raise UserError(f"--mode i2v: {where} is a text-to-video {spec.display_name} checkpoint; pass an "
                            f"image-to-video one{i2v_examples(spec)}, or drop --mode i2v.")
        return found
    return None if found is None or found.text_to_video else found


def i2v_examples(spec: ModelSpec) -> str:
    names = [c.display_name for c in spec.checkpoints if c.image_to_video]
    return f" ({', '.join(names)})" if names else ""


def check_image_shards(spec: ModelSpec, mode: str, manifest: Manifest, transformer_config: dict, model_index: dict,
                       where: str) -> ImageConditioning | None:
    """The conditioning a run trains with, checked against what the shard set holds (`encoding.image`), before any
    weight loads: an image-to-video checkpoint given text-to-video shards, and the reverse, each one message. With
    `--mode auto` a checkpoint that serves both modes follows the shards."""
    held = manifest.encoding.get("image") or None
    folder = manifest.folder or "the shard set"
    found = spec.image_conditioning(transformer_config, model_index)
    if mode == "auto" and held and found is not None:
        mode = "i2v"
    conditioning = resolve_conditioning(spec, mode, transformer_config, model_index, where)
    if conditioning is None:
        if held and mode == "auto":
            raise UserError(f"{folder} holds image-to-video samples ({held.get('pipeline_class', ['', '?'])[1]}) but "
                            f"{where} is a text-to-video checkpoint: pass the image-to-video checkpoint they were "
                            "encoded for, or add --mode t2v to train text-to-video on their latents and captions.")
        return None
    if not held:
        raise UserError(f"{folder} holds text-to-video samples (no image conditioning) but {where} is "
                        f"{describe_conditioning(conditioning)}: precompute the clips again with this --pretrained "
                        "(and --mode i2v where the checkpoint serves both) into the same --out: only the image "
                        "conditioning is encoded, the video latents and captions are reused.")
    if held.get("kind") != conditioning.kind or list(held.get("frames", [])) != list(conditioning.frames):
        raise UserError(f"{folder} holds image conditioning of kind {held.get('kind')!r} from the clip's "
                        f"{' and '.join(held.get('frames', []))} frame(s), but {where} is "
                        f"{describe_conditioning(conditioning)} ({conditioning.kind!r}): precompute with this "
                        "--pretrained.")
    if conditioning.image_encoder and not held.get("encoders"):
        raise UserError(f"{folder} holds no image encoder embeddings, which {where} takes: precompute with this "
                        "--pretrained.")
    return conditioning

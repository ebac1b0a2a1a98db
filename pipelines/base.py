"""The ModelSpec interface: everything precompute, train and generate need to know about a model family.

precompute and train never branch on a model's name; they ask the spec. A spec says:
- loading: which classes make up the family, and how `--pretrained` plus per-component overrides and dtypes
  (`ModelArgs`) become loaded modules, with a clear error for a folder that is not of this family (the methods
  that do it are ModelSpec's base class, `ComponentLoading` in loading.py; the fingerprints are fingerprint.py's);
- stage 1: `encode_video(vae, frames)` (the VAE posterior by default) and `encode_prompts(encoders, prompts)`,
  each returning named tensors that become the `latents` and `cond` groups of a shard sample; the `cond` layout
  is the spec's `conditioning` (CondTensor: name, width, shape), which `check_shards` and `ft estimate` read;
- stage 2: the objective it trains with (by name; the objectives are shared code in ft.train), `prepare_latents`
  (stored posterior -> model latents for a transformer config, one generator per sample) and `predict` (the
  transformer call, fed exactly as the family's pipeline feeds it, with the batch's metadata, generators and the
  run's typed `TrainOptions`); `check_shards` (family, latent channels, conditioning, text length, then the
  family's `check_shard_extras`);
- facts: `aliases`, LoRA target modules (by default the attention projections) and the LoRA key layout of the
  family's original checkpoint (`original_layout`, what ComfyUI reads: lora_keys.py), valid frame counts and size
  multiples, default buckets, the text length (`default_text_tokens`), the transformer's block lists (what FSDP2
  shards block by block, and the layers `ft estimate` counts), the published checkpoints' real-size configs
  (`checkpoints`, offline), and how finetrainers trained the family where ft's defaults differ
  (`finetrainers_*`, for carried-over runs); help texts read these instead of restating them;
- generation: `build_pipeline(transformer, vae, scheduler)`, the family's pipeline with no text encoder (it samples
  from stored embeddings: validation in training, and `ft generate`), and the pipeline's defaults;
- `tiny_components(seed)`: the same family at toy size, for tests and `ft demo`.
Code two families share lives here (`sample_posterior`, `normalize_latents`, `t5_prompt_embeds`, `peft_targets`).
Adding a family is adding a file with a subclass and a line in registry.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs

from .loading import ComponentLoading, import_class
from .lora_keys import OriginalLayout
from .real_configs import Checkpoint

if TYPE_CHECKING:
    import torch

    from ft.common.shards import Manifest

    from .image import ImageConditioning


def randn_per_sample(shape: tuple[int, ...], generators: list[torch.Generator],
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """A [B, *shape] standard normal tensor whose row i comes from generators[i] (CPU generators) alone, so a
    sample's draw does not depend on which other samples share its batch, rank or micro-batch.

    On an accelerator the sample's generator only seeds a generator there and the draw happens on the device: no
    host-to-device copy, which would synchronise the stream every micro-batch."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return torch.stack([torch.randn(shape, generator=g) for g in generators])
    rows = []
    for g in generators:
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        rows.append(torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device))
    return torch.stack(rows)


def sample_posterior(latents: dict[str, torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
    """A draw from the stored diagonal Gaussian posterior (`mean`, `logvar`, batched) in fp32: mean + std * eps,
    eps per sample from its own generator (the VAE's DiagonalGaussianDistribution.sample, with its clamp)."""
    import torch

    mean, logvar = latents["mean"].float(), latents["logvar"].float()
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * randn_per_sample(tuple(mean.shape[1:]), generators, mean.device)


def normalize_latents(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float
                      ) -> torch.Tensor:
    """[B, C, F, H, W]: (z - latents_mean) * scaling_factor / latents_std per channel (LTXPipeline's and, with
    scaling_factor 1, WanPipeline's: the inverse of their decode's denormalisation)."""
    mean = mean.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    std = std.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    return (latents - mean) * scaling_factor / std


def transformer_blocks(transformer: Any, block_lists: tuple[str, ...]) -> list[Any]:
    """The transformer's blocks named by a family's block lists (`ModelSpec.block_lists`), in order: the units FSDP2
    shards, --offload-blocks moves, regional compile compiles and `ft estimate` counts."""
    blocks = []
    for name in block_lists:
        found = getattr(transformer, name, None)
        if found is None:
            raise UserError(f"{type(transformer).__name__} has no `{name}` (a block list of this family's "
                            "ModelSpec): this transformer is not of the family's architecture.")
        blocks.extend(found)
    return blocks


REGEX_CHARACTERS = set("()|*+?[]^$\\")
TOKEN_STATS_BATCH = 1024  # captions tokenized at once for their counts (a million captions' ids held about 4.7 GB)


def peft_targets(target_modules: list[str]) -> str | list[str]:
    """What PEFT takes: one value with regex characters is a regex matched against whole module names (as
    finetrainers passes `(transformer_blocks|single_transformer_blocks).*(to_q|to_k|to_v|to_out.0)`); otherwise
    module names, each matching a name or its last parts. `--target-modules` and a spec's default_lora_targets."""
    if len(target_modules) == 1 and REGEX_CHARACTERS & set(target_modules[0]):
        return target_modules[0]
    return list(target_modules)


@dataclass(frozen=True)
class TrainOptions:
    """The run's settings that a family's `predict` reads, each one `ft train` flag (a family that does not take
    one refuses a value other than the default: `ModelSpec.check_args`, and the trainer for the guidance scale)."""

    # --first-frame-conditioning-p (LTX-Video); None: the mode's default (0 text-to-video, 1 image-to-video)
    first_frame_conditioning_p: float | None = None
    guidance_scale: float = 1.0  # --guidance-scale, the embedded guidance trained with (HunyuanVideo)
    image_noise: bool = False  # --image-noise: noise on the conditioning image's latents (`takes_image_noise`)
    noised_image_dropout: float = 0.0  # --noised-image-dropout: P(image latents zeroed) (`takes_image_noise`)

    @classmethod
    def from_config(cls, cfg: Any) -> TrainOptions:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass
class StepInputs:
    """What a family's `predict` receives for one batch: the clean latents and the noise, the noised latents
    and where on the schedule each sample is (`sigmas` in [0, 1]; `timesteps` as the transformer takes them), the
    conditioning, each sample's metadata (fps, frames, caption, ...), its generator, and the run's options."""

    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    cond: dict[str, torch.Tensor]
    meta: list[dict[str, Any]]
    generators: list[torch.Generator]
    options: TrainOptions = field(default_factory=TrainOptions)
    # an image-conditioned run: the samples' stored `image` group (`ModelSpec.encode_image`) and how the checkpoint
    # takes it (pipelines/image.py); empty and None for text-to-video
    image: dict[str, torch.Tensor] = field(default_factory=dict)
    image_conditioning: ImageConditioning | None = None


@dataclass(frozen=True)
class CondTensor:
    """One conditioning tensor a sample stores (`encode_prompts`' output, the shards' `cond` group): its shape is
    [text length, width] per token, [text length] for a mask (`width` None), or [width] for a pooled embedding
    (`per_token` False), with `length` tokens in place of the text length where it is set; `width` names the
    transformer config entry it must equal. `check_shards` and `ft estimate` read the layout from here."""

    name: str
    width: str | None
    encoder: str = "text encoder"
    per_token: bool = True
    dtype: str = "bfloat16"
    length: int | None = None  # a token count of its own (HunyuanVideo 1.5's glyph encoder: 256), not the text length

    def shape(self, transformer_config: dict, text_length: int) -> tuple[int, ...]:
        width = () if self.width is None else (int(transformer_config[self.width]),)
        return ((self.length or text_length,) if self.per_token else ()) + width


def t5_prompt_embeds(encoders: dict[str, Any], prompts: list[str], max_sequence_length: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, bool attention mask) of T5 as CogVideoXPipeline and LTXPipeline make them
    (`_get_t5_prompt_embeds`): padded to `max_sequence_length`, the encoder run without the mask."""
    tokenizer, text_encoder = encoders["tokenizer"], encoders["text_encoder"]
    tokens = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    embeds = text_encoder(tokens.input_ids.to(text_encoder.device))[0]
    return embeds, tokens.attention_mask.bool().to(embeds.device)


class ModelSpec(ComponentLoading, ABC):
    """One model family. Subclasses fill in the class attributes and the stage-1 / stage-2 methods."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  # other spellings of `--model` (case-insensitive)
    # the training objective in ft.train.objectives: "ddpm_v_prediction" (CogVideoX) or "flow_matching"
    objective: ClassVar[str]
    channel_dim: ClassVar[int] = 1  # where the channels are in prepare_latents' output
    pipeline_class: ClassVar[tuple[str, str]]
    # component name -> (module, class); tokenizers and text encoders are listed in the order the pipeline takes them
    component_classes: ClassVar[dict[str, tuple[str, str]]]
    text_components: ClassVar[tuple[str, ...]]
    # image-to-video: the image encoder and its processor of the checkpoints that have one (stage 1 and generation
    # only; pipelines/image.py), by component name
    image_component_classes: ClassVar[dict[str, tuple[str, str]]] = {}
    scheduler_class: ClassVar[tuple[str, str]]
    # module names, or one regex matched against whole names (see `peft_targets`); by default the attention
    # projections of diffusers' attention blocks, which a family overrides where it trains other modules
    default_lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    # the LoRA's module names in the family's original checkpoint, as ComfyUI reads them (lora_keys.py)
    original_layout: ClassVar[OriginalLayout]
    default_buckets: ClassVar[list[str]]
    # the conditioning tensors of a sample, in the order encode_prompts returns them
    conditioning: ClassVar[tuple[CondTensor, ...]]
    # the published checkpoints' real-size configs, by the names `--pretrained` may give (`ft estimate`, bench/)
    checkpoints: ClassVar[tuple[Checkpoint, ...]] = ()
    # the text length the family's pipeline encodes prompts to (its max_sequence_length): the default of
    # --max-sequence-length where the transformer config does not fix one (`default_sequence_length`)
    default_text_tokens: ClassVar[int]
    # the transformer's lists of blocks, each block a unit for FSDP2 sharding (and `ft estimate`'s gathered block)
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    # whether the transformer takes an embedded guidance scale (guidance-distilled), set by `--guidance-scale`
    embedded_guidance: ClassVar[bool] = False
    # generation: the frames per second of its videos, and the pipeline's __call__ argument that takes the frame
    # rate (None: the pipeline has none, the rate only sets the mp4's)
    default_fps: ClassVar[float] = 8.0
    frame_rate_argument: ClassVar[str | None] = None
    # whether stage 2 can condition on a clean-ish first frame (`--first-frame-conditioning-p`)
    first_frame_conditioning: ClassVar[bool] = False
    # whether `prepare_image` can noise or drop the conditioning image's latents (`--image-noise`,
    # `--noised-image-dropout`, image-to-video runs)
    takes_image_noise: ClassVar[bool] = False
    # whether the pipeline casts its latents to the VAE's dtype before decoding (WanPipeline, HunyuanVideoPipeline,
    # LTXPipeline do): the VAE then decodes in its own --vae-dtype; one that does not (CogVideoXPipeline) gets its
    # VAE in the transformer's dtype (`match_vae_dtype`)
    decode_casts_latents: ClassVar[bool] = True
    # how finetrainers trains the family where ft's default differs, so that a carried-over finetrainers run
    # (cli/finetrainers.py) trains as it did there: the first-frame conditioning probability it hard-codes, and
    # whether it samples timesteps uniformly whatever --flow_weighting_scheme says
    finetrainers_first_frame_conditioning_p: ClassVar[float] = 0.0
    finetrainers_uniform_timesteps: ClassVar[bool] = False
    # whether the family's pipeline hands parts of the schedule to different transformers (Wan 2.2 A14B's
    # experts), each trained as its own run (`ft train --expert`)
    has_experts: ClassVar[bool] = False
    # context parallelism (`ft train --cp-degree`): what the split cuts and where, in words (the help and errors
    # show it); None: the family has no plan yet and --cp-degree above 1 is refused. `cp_plan` gives the plan.
    context_parallel: ClassVar[str | None] = None
    # the attentions the plan works with, and why a mode is missing (a text mask that ring attention would apply to
    # the wrong key chunks)
    cp_modes: ClassVar[tuple[str, ...]] = ("ring", "ulysses")
    cp_modes_why: ClassVar[str] = ""

    # ------------------------------------------------------------------------------------------------ loading
    # How the components load from --pretrained and the overrides (and what of them is refused): ComponentLoading,
    # in loading.py. Here: which spec of the family a checkpoint needs.

    def for_checkpoint_name(self, pretrained: str) -> ModelSpec:
        """The spec of this family whose built-in checkpoints (`checkpoints`) include `pretrained`, for `ft
        estimate` offline: itself by default (HunyuanVideo's: HunyuanVideo-I2V's spec for its checkpoints)."""
        return self

    def for_checkpoint(self, args: ModelArgs) -> ModelSpec:
        """The spec of this family that fits `--pretrained` (after `check_args`): itself, or the spec of a checkpoint
        whose components are other classes (HunyuanVideo-I2V's Llava text encoder)."""
        return self

    # ------------------------------------------------------------------------------------------------ facts

    @classmethod
    def find_checkpoint(cls, pretrained: str) -> Checkpoint | None:
        """The built-in checkpoint `pretrained` names (a hub id or its last part, any case), or None."""
        return next((c for c in cls.checkpoints if c.matches(pretrained)), None)

    @abstractmethod
    def check_bucket(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict) -> str | None:
        """Why the model cannot take this frames x height x width bucket, or None if it can."""

    def default_sequence_length(self, transformer_config: dict) -> int:
        """The text length captions are encoded to when --max-sequence-length is not given."""
        return self.default_text_tokens

    def check_sequence_length(self, length: int, transformer_config: dict) -> str | None:
        """Why captions of `length` tokens cannot train this transformer, or None."""
        return None

    def caption_token_counts(self, args: ModelArgs, captions: list[str]) -> list[int]:
        """Tokens each caption takes before it is cut to the text length (see `caption_token_stats`)."""
        return [stats[0] for stats in self.caption_token_stats(args, captions)]

    def caption_token_stats(self, args: ModelArgs, captions: list[str]) -> list[tuple[int, int, int]]:
        """(tokens, unknown tokens, characters the unknown tokens stand for) of each caption before it is cut to
        the text length, counted with the family's first tokenizer only: no text encoder is loaded. A T5
        sentencepiece tokenizer folds a run of characters it lacks (CJK, emoji) into one <unk>, hence the
        characters. A byte-level tokenizer (Llama's, CLIP's) has no unknown token: zeros. Families with a prompt
        template override this."""
        if not captions:
            return []
        tokenizer = self._stats_tokenizer(args)
        unk = getattr(tokenizer, "unk_token_id", None)
        fast = bool(getattr(tokenizer, "is_fast", False))
        out = []
        for start in range(0, len(captions), TOKEN_STATS_BATCH):  # the token ids of a batch at a time, not all
            batch = captions[start: start + TOKEN_STATS_BATCH]
            encoded = tokenizer(batch, add_special_tokens=True, truncation=False, return_offsets_mapping=fast)
            for i, ids in enumerate(encoded["input_ids"]):
                unknown = [j for j, token in enumerate(ids) if unk is not None and token == unk]
                if fast:
                    spans = {c for j in unknown for c in range(*encoded["offset_mapping"][i][j])}
                    chars = sum(1 for c in spans if not batch[i][c].isspace())
                else:
                    chars = len(unknown)
                out.append((len(ids), len(unknown), chars))
        return out

    def _stats_tokenizer(self, args: ModelArgs) -> Any:
        """The tokenizer `caption_token_stats` counts with, loaded once per source: a rerun checks its captions a
        chunk of items at a time, and loading it for each chunk cost more than the counting."""
        where = self._source(self.text_components[0], args)
        held = self.__dict__.get("_token_stats_tokenizer")
        if held is None or held[0] != where:
            held = self.__dict__["_token_stats_tokenizer"] = (where, self.load_component(self.text_components[0], args))
        return held[1]

    # ------------------------------------------------------------------------------------------------ stage 1

    def encoding_choices(self, transformer_config: dict) -> dict[str, Any]:
        """The stage-1 choices this family makes beyond the encoders' weights (prompt template, template crop,
        hidden layer, latent normalisation, ...). They go into every sample key and the manifest's encoding
        parameters (precompute.planned_sample.sample_encoding), so changing one re-encodes instead of reusing."""
        return {}

    def image_conditioning(self, transformer_config: dict, model_index: dict) -> ImageConditioning | None:
        """How this checkpoint (its transformer config and model_index.json) is conditioned on an image, or None
        for a text-to-video one (pipelines/image.py)."""
        return None

    def encode_image(self, models: dict[str, Any], frames: torch.Tensor, num_frames: int,
                     conditioning: ImageConditioning, captions: list[str] | None = None,
                     max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """The `image` group of a batch, as the family's image-to-video pipeline computes it from its image: `frames`
        [B, C, N, H, W] in [-1, 1] are the clip's conditioning frames at the bucket's size (`conditioning.frames`
        in order), `num_frames` the bucket's frame count, `models` the VAE (`vae`) and the image encoder and
        processor where the checkpoint has them. Where the conditioning reads the caption too
        (`conditioning.caption`), `models` holds the text components as well, and `captions` and the text length
        are given."""
        raise UserError(f"{self.display_name} has no image-to-video training in ft.")

    def image_prompt_embeds(self, encoders: dict[str, Any], images: list[Any], prompts: list[str],
                            max_sequence_length: int, conditioning: ImageConditioning, negative: bool = False
                            ) -> dict[str, torch.Tensor]:
        """The prompt embeddings of a checkpoint whose text encoder reads the image with the prompt
        (`conditioning.caption`: HunyuanVideo-I2V), from `images` (PIL or uint8 [H, W, 3]) as the pipeline's
        `encode_prompt` makes them (`negative`: as it makes the negative prompt's); `ft generate` adds them to
        `encode_prompts`' output. {} by default."""
        return {}

    def encode_video(self, vae: Any, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames [B, C, F, H, W] in [-1, 1] -> named latent tensors with the batch first (stored per sample): the
        VAE posterior's `mean` and `logvar`, from which stage 2 draws (`sample_posterior`)."""
        posterior = vae.encode(frames.to(vae.device, vae.dtype)).latent_dist
        return {"mean": posterior.mean, "logvar": posterior.logvar}

    @abstractmethod
    def encode_prompts(self, encoders: dict[str, Any], prompts: list[str], max_sequence_length: int
                       ) -> dict[str, torch.Tensor]:
        """Captions -> named conditioning tensors with the batch first (the `conditioning` layout)."""

    # ------------------------------------------------------------------------------------------------ stage 2
    # The objective (how noise is added, what is predicted, the loss weights) is shared code in ft.train,
    # named here; the family gives only what is its own: the latents from the stored posterior and the call of
    # its transformer, exactly as its diffusers pipeline makes it.

    def latent_channels(self, transformer_config: dict) -> int:
        """The channels of the VAE latents this transformer takes (its `in_channels`, before any patching)."""
        return int(transformer_config.get("in_channels") or 0)

    def check_shards(self, manifest: Manifest, transformer_config: dict) -> None:
        """Raise UserError when a shard set cannot train this transformer: another family, latent channels, a
        conditioning tensor missing or of another width (`conditioning`), a text length the transformer does not
        take (`check_sequence_length`), then the family's own checks (`check_shard_extras`)."""
        if manifest.model_family != self.name:
            raise UserError(f"these shards were encoded for {manifest.model_family!r}, not {self.name!r}: "
                            f"precompute them again with --model {self.name}.")
        shapes = manifest.shapes
        channels, expected = shapes.get("latent_channels"), self.latent_channels(transformer_config)
        if channels != expected:
            raise UserError(f"the shards hold latents with {channels} channels but the transformer takes "
                            f"{expected}: they were encoded with another VAE.")
        for tensor in self.conditioning:
            shape = shapes.get(tensor.name)
            if shape is None:
                raise UserError(f"the shards hold no {tensor.name}: they were not written by ft's "
                                f"{self.display_name} precompute; precompute them again with --model {self.name}.")
            if tensor.width is not None and shape[-1] != transformer_config.get(tensor.width):
                raise UserError(f"the shards hold {tensor.name} of width {shape[-1]} but the transformer takes "
                                f"{transformer_config.get(tensor.width)}: they were encoded with another "
                                f"{tensor.encoder}.")
        length = shapes[self.conditioning[0].name][0]
        problem = self.check_sequence_length(length, transformer_config)
        if problem:
            raise UserError(f"the shards hold {length} text tokens but {problem}: precompute with "
                            f"--max-sequence-length {self.default_sequence_length(transformer_config)}.")
        self.check_shard_extras(manifest, transformer_config)

    def check_shard_extras(self, manifest: Manifest, transformer_config: dict) -> None:
        """What else a family needs of a shard set (LTX-Video: the VAE's latent statistics in the manifest)."""
        return None

    @abstractmethod
    def prepare_latents(self, latents: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                        generators: list[torch.Generator]) -> torch.Tensor:
        """Stored posterior tensors (batched) -> the clean latents the objective noises, in the layout the
        transformer (of `transformer_config`) takes. Sample i's posterior draw comes from `generators[i]` (see
        `randn_per_sample`)."""

    def prepare_image(self, image: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                      generators: list[torch.Generator], conditioning: ImageConditioning,
                      options: TrainOptions | None = None) -> dict[str, torch.Tensor]:
        """The stored `image` group (batched) -> what `predict` feeds the transformer with, as the family's
        image-to-video pipeline makes it from its image (normalised latents, the mask; sample i's draws from
        `generators[i]`, after the latent, noise and sigma draws; `options` the run's, e.g. `--image-noise`). As
        stored by default."""
        return image

    def timestep_filter(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Which of the objective's timesteps this run trains (a bool per sample), or None: all of them. A family
        whose pipeline hands parts of the schedule to different transformers trains one part per run (Wan 2.2
        A14B: wan_experts.py); the objective draws each sample's sigma until its timestep passes."""
        return None

    def cp_plan(self, transformer: Any) -> dict[str, Any]:
        """The context-parallel plan for `transformer` (diffusers' ContextParallelModelPlan): by default the one its
        diffusers class ships (`_cp_plan`); a family whose class has none overrides this, and may install the
        attention processors its plan needs."""
        plan = type(transformer)._cp_plan
        assert plan is not None, f"{type(transformer).__name__} has no _cp_plan: {self.name} must give one"
        return plan

    def cp_sequences(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict,
                     text_length: int) -> dict[str, int]:
        """The sequences a context-parallel split cuts for one sample of `bucket`, by name, with their token counts
        (each must divide by --cp-degree): the video tokens after patching; a family whose plan splits the text
        (`text_length` tokens, as the shards store it) adds it."""
        temporal, spatial = self.compression(vae_config)
        frames, height, width = bucket
        patch = transformer_config.get("patch_size") or 1
        if isinstance(patch, (list, tuple)):
            pt, ph, pw = (int(x) for x in patch)
        else:
            pt, ph, pw = int(transformer_config.get("patch_size_t") or 1), int(patch), int(patch)
        latent_frames = (frames - 1) // temporal + 1
        tokens = -(-latent_frames // pt) * (height // spatial // ph) * (width // spatial // pw)
        return {"video tokens": tokens}

    def latent_sequence_length(self, latents: torch.Tensor) -> int:
        """Tokens of one sample's latents before patching (frames x height x width), for resolution-dependent
        sigma shifting. `latents` is what `prepare_latents` returned."""
        return int(latents[0].numel() // latents.shape[self.channel_dim])

    @abstractmethod
    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Call the transformer on `step.noisy` as the family's pipeline does. Returns its raw output and optional
        per-element loss weights (broadcastable to the output; None for all ones)."""

    # ------------------------------------------------------------------------------------------------ generation

    def generation_defaults(self, transformer_config: dict, vae_config: dict) -> dict[str, Any]:
        """Frames, height and width the base model was trained at: keys num_frames, height, width."""
        return {}

    def check_generation_size(self, size: tuple[int, int, int], vae_config: dict, transformer_config: dict
                              ) -> str | None:
        """Why the pipeline cannot generate frames x height x width, or None. Training's rule by default."""
        return self.check_bucket(size, vae_config, transformer_config)

    def compression(self, vae_config: dict) -> tuple[int, int]:
        """(temporal, spatial) compression of the family's VAE, from its config."""
        temporal = vae_config.get("temporal_compression_ratio") or vae_config.get("scale_factor_temporal") or 4
        spatial = vae_config.get("spatial_compression_ratio") or vae_config.get("scale_factor_spatial") or \
            2 ** (len(vae_config.get("block_out_channels") or (0, 0, 0, 0)) - 1)
        return int(temporal), int(spatial)

    def check_generation_memory(self, size: tuple[int, int, int], vae_config: dict, transformer_config: dict,
                                memory: tuple[float, str]) -> str | None:
        """Why generating frames x height x width does not fit `memory` (bytes, and what they are), or None:
        pipelines/memory.py's estimate, the arithmetic of `ft estimate`."""
        from .memory import check_generation_memory

        return check_generation_memory(size, self.compression(vae_config), vae_config, transformer_config,
                                       self.default_sequence_length(transformer_config), memory)

    def build_pipeline(self, transformer: Any, vae: Any, scheduler: Any,
                       conditioning: ImageConditioning | None = None) -> Any:
        """The family's diffusers pipeline around these modules with no tokenizer or text encoder: it samples from
        stored embeddings (`prompt_embeds`, `negative_*`), which is all `encode_prompt` needs when they are given.
        Validation builds it around the live (training) transformer; `ft generate` around a loaded one. An
        image-conditioned run gets the image-to-video pipeline (with no image encoder: stored embeddings too)."""
        parts = dict.fromkeys(self.text_components)
        cls = conditioning.pipeline_class if conditioning else self.pipeline_class
        return import_class(*cls)(transformer=transformer, vae=vae, scheduler=scheduler, **parts)

    def image_generation_size(self, image_size: tuple[int, int], transformer_config: dict, vae_config: dict
                              ) -> tuple[int, int] | None:
        """(height, width) of the video an image-to-video pipeline that sizes it from its image makes of an image of
        `image_size` (width, height), or None: the pipeline takes --height/--width (all but HunyuanVideo 1.5's)."""
        return None

    def image_pipeline_arguments(self, pipe: Any, stored: dict[str, torch.Tensor], conditioning: ImageConditioning
                                 ) -> dict[str, Any]:
        """An image-to-video pipeline's image arguments for a validation row stored in stage 1 (its `pixels`
        [N, C, H, W] uint8 and its `encode_image` tensors): the images as the pipeline takes them (`image`, and
        `last_image` for first-last-frame models). A family whose pipeline also runs an image encoder hands it the
        stored embeddings instead (the validation pipeline has none)."""
        from PIL import Image

        images = [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in stored["pixels"]]
        out = {"image": images[0]}
        if "last" in conditioning.frames:
            out["last_image"] = images[1]
        return out

    def takes_true_cfg(self) -> bool:
        """Whether the pipeline has true classifier-free guidance (`true_cfg_scale`): its guidance scale is then an
        embedded one, and a negative prompt acts only through true CFG (HunyuanVideo)."""
        import inspect

        return "true_cfg_scale" in inspect.signature(import_class(*self.pipeline_class).__call__).parameters

    def pipeline_call_kwargs(self, transformer_config: dict) -> dict[str, Any]:
        """Family-specific arguments of the pipeline's __call__ (e.g. the text length the transformer takes)."""
        return {}

    # ------------------------------------------------------------------------------------------------ tests

    @abstractmethod
    def tiny_components(self, seed: int = 0) -> dict[str, Any]:
        """The family at toy size with random weights: pipeline components by name (scheduler included)."""

    # other checkpoints of the family at toy size (`--model family:variant` in `ft demo`), name -> what it is
    tiny_variants: ClassVar[dict[str, str]] = {}

    def tiny_variant(self, variant: str, seed: int = 0) -> tuple[tuple[str, str], dict[str, Any]]:
        """(pipeline class, components) of the toy-size `variant` (one of `tiny_variants`)."""
        choices = ", ".join(f"{self.name}:{v}" for v in self.tiny_variants) or "none"
        raise UserError(f"{self.display_name} has no tiny variant {variant!r} (variants: {choices}).")

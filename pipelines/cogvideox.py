"""CogVideoX (2b, 5b, 1.5) and its finetunes: T5 text conditioning, a 3D causal VAE, v-prediction on DDPM.

Training follows the objective CogVideoX was trained with (see diffusers' examples/cogvideo and the pipeline):
noise is added with the scheduler's `add_noise`, the transformer's output is turned into a clean-latent estimate
with `get_velocity`, the target is the clean latents, and each sample is weighted by 1 / (1 - alphas_cumprod[t]).
The transformer is fed exactly as `CogVideoXPipeline` feeds it: latents [B, F, C, H, W] scaled by the VAE's
scaling factor, the T5 embeddings padded to `max_text_seq_length`, and 3D rotary embeddings when the config uses
them (the 1.0 "crop" grid, or the 1.5 "slice" grid when the config has `patch_size_t`).

Image-to-video (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V), as `CogVideoXImageToVideoPipeline` makes it: the checkpoint
is told by its transformer config (in_channels = 2 x out_channels). Stage 1 encodes the clip's first frame alone, a
1-frame video, through the VAE and stores its posterior (`image_mean`, `image_logvar`): the pipeline SAMPLES from it
with its generator, so stage 2 draws from it with the sample's generator (`prepare_image`), scales the draw by the
VAE's scaling_factor (divides by it where the VAE config says `invert_scale_latents`, as the 1.5 pipeline does),
and `predict` pads it with zero latent frames to the video's latent length (with the pipeline's first-frame repeat
for the temporal patch), concatenates it after the noised latents on the channels, and passes the `ofs` embedding
(2.0) of a 1.5 transformer (`ofs_embed_dim`). `--image-noise` adds the noise diffusers' CogVideoX I2V LoRA example
adds to the conditioning image, in latent space (the image was encoded in stage 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import CondTensor, ModelSpec, StepInputs, TrainOptions, randn_per_sample, sample_posterior, t5_prompt_embeds
from .image import ImageConditioning
from .lora_keys import OriginalLayout, Rename
from .real_configs import T5_XXL, Checkpoint

if TYPE_CHECKING:
    import torch

TEMPORAL_COMPRESSION = 4
I2V_PIPELINE = ("diffusers", "CogVideoXImageToVideoPipeline")
# --image-noise: log sigma ~ N(-3, 0.5), diffusers' examples/cogvideo I2V LoRA script and finetrainers
IMAGE_NOISE_LOG_MEAN, IMAGE_NOISE_LOG_STD = -3.0, 0.5
# the `ofs` value CogVideoXImageToVideoPipeline gives a transformer with `ofs_embed_dim` (CogVideoX1.5-5B-I2V)
OFS = 2.0
# CogVideoX-5b-I2V and CogVideoX1.5-5B-I2V: their published transformer configs (config.json), beside the T2V 5b's
I2V_5B = {"num_attention_heads": 48, "num_layers": 42, "in_channels": 32, "out_channels": 16,
          "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True}
I2V_15_5B = {"num_attention_heads": 48, "num_layers": 42, "in_channels": 32, "out_channels": 16,
             "ofs_embed_dim": 512, "patch_bias": False, "patch_size_t": 2, "sample_frames": 81,
             "sample_height": 300, "sample_width": 300, "use_rotary_positional_embeddings": True,
             "use_learned_positional_embeddings": False}
# ComfyUI has no CogVideoX model of its own; the node pack users run it with (kijai/ComfyUI-CogVideoXWrapper) loads
# a LoRA through diffusers' CogVideoXPipeline.load_lora_weights, so its layout is diffusers' module names
ORIGINAL_LAYOUT = OriginalLayout("CogVideoX's diffusers checkpoint (what ComfyUI-CogVideoXWrapper loads)",
                                 prefix="transformer.", renames=(Rename(r"(.+)", r"\1"),),
                                 read_prefixes=("transformer.",))


def pad_latent_frames(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """CogVideoX 1.5 patches latent frames in pairs: latents [B, F, C, H, W] whose frame count is not a multiple
    of `patch_size_t` (81 frames -> 21) get their last frame repeated, as finetrainers pads them, and train padded
    (noise is drawn for the padded frames too, and they are in the target). A count that is already a multiple is
    left alone (finetrainers adds a whole extra patch then; the pipeline does not)."""
    import torch

    extra = (-latents.shape[1]) % patch_size_t if patch_size_t else 0
    if not extra:
        return latents
    return torch.cat([latents, latents[:, -1:].expand(-1, extra, -1, -1, -1)], dim=1)


def image_condition_frames(image_latents: torch.Tensor, latent_frames: int, patch_size_t: int | None
                           ) -> torch.Tensor:
    """`CogVideoXImageToVideoPipeline.prepare_latents`' `image_latents` for a video of `latent_frames` latent frames:
    the image's latent frame [B, 1, C, H, W] followed by zero frames, then (1.5: `patch_size_t`) its first
    `latent_frames % patch_size_t` frames repeated in front (none where the count is a multiple of the patch, as
    the 1.5 pipeline makes it by padding its frame count, and as stage 2's padded latents are)."""
    import torch

    zeros = image_latents.new_zeros(image_latents.shape[0], latent_frames - 1, *image_latents.shape[2:])
    condition = torch.cat([image_latents, zeros], dim=1)
    if patch_size_t is not None:
        condition = torch.cat([condition[:, : condition.size(1) % patch_size_t], condition], dim=1)
    return condition


class ContextParallelAttention:
    """CogVideoXAttnProcessor2_0 with its attention through diffusers' dispatcher, so that it runs ring or Ulysses
    attention under context parallelism (`ft train --cp-degree`); the same arithmetic otherwise. Each rank holds its
    share of the text tokens and of the video tokens and concatenates them as the original does: the ranks' joint
    sequences together are the whole joint sequence in another order, which attention (no mask, no causal order)
    does not see; the rotary tables are split with the video tokens, so each token keeps its own rotation."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> tuple[Any, Any]:
        import torch
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        assert attention_mask is None, "CogVideoX's transformer passes no attention mask"
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        query, key, value = (proj(hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
        hidden_states = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


class CogVideoXSpec(ModelSpec):
    name = "cogvideox"
    display_name = "CogVideoX"
    aliases = ("cogvideo", "cog")
    decode_casts_latents = False  # decode_latents hands the VAE the transformer-dtype latents as they are
    objective = "ddpm_v_prediction"
    channel_dim = 2  # latents are [B, F, C, H, W]
    pipeline_class = ("diffusers", "CogVideoXPipeline")
    component_classes = {
        "tokenizer": ("transformers", "AutoTokenizer"),
        "text_encoder": ("transformers", "T5EncoderModel"),
        "vae": ("diffusers", "AutoencoderKLCogVideoX"),
        "transformer": ("diffusers", "CogVideoXTransformer3DModel"),
    }
    text_components = ("tokenizer", "text_encoder")
    scheduler_class = ("diffusers", "CogVideoXDPMScheduler")
    original_layout = ORIGINAL_LAYOUT
    finetrainers_uniform_timesteps = True  # its CogVideoX trainer ignores --flow_weighting_scheme
    default_buckets = ["49x480x720"]
    default_text_tokens = 226  # CogVideoXPipeline's max_sequence_length; a transformer config's max_text_seq_length
    conditioning = (CondTensor("prompt_embeds", "text_embed_dim"),)  # max_text_seq_length T5 tokens
    checkpoints = (
        Checkpoint("CogVideoX-2b", ("THUDM/CogVideoX-2b", "zai-org/CogVideoX-2b", "cogvideox-2b"),
                   {"transformer": {}, "vae": {}, "text_encoder": T5_XXL}),
        Checkpoint("CogVideoX-5b", ("THUDM/CogVideoX-5b", "zai-org/CogVideoX-5b", "cogvideox-5b"),
                   {"transformer": {"num_attention_heads": 48, "num_layers": 42,
                                    "use_rotary_positional_embeddings": True},
                    "vae": {"scaling_factor": 0.7}, "text_encoder": T5_XXL}),
        Checkpoint("CogVideoX-5b-I2V", ("THUDM/CogVideoX-5b-I2V", "zai-org/CogVideoX-5b-I2V", "cogvideox-5b-i2v"),
                   {"transformer": I2V_5B, "vae": {"scaling_factor": 0.7}, "text_encoder": T5_XXL},
                   image_to_video=True),
        Checkpoint("CogVideoX1.5-5B-I2V", ("THUDM/CogVideoX1.5-5B-I2V", "zai-org/CogVideoX1.5-5B-I2V",
                                           "cogvideox1.5-5b-i2v"),
                   {"transformer": I2V_15_5B, "vae": {"scaling_factor": 0.7, "invert_scale_latents": True},
                    "text_encoder": T5_XXL}, image_to_video=True),
    )
    takes_image_noise = True  # --image-noise (prepare_image)

    # ------------------------------------------------------------------------------------------------ facts

    @staticmethod
    def _spatial_factor(vae_config: dict) -> int:
        return 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)

    def check_bucket(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict) -> str | None:
        frames, height, width = bucket
        if (frames - 1) % TEMPORAL_COMPRESSION:
            return f"CogVideoX takes 4k+1 frames (1, 5, 9, ..., 49, ...), not {frames}"
        # CogVideoX 1.5 (patch_size_t) takes any 4k+1: forward pads the latent frames to the temporal patch
        multiple = self._spatial_factor(vae_config) * transformer_config.get("patch_size", 2)
        if height % multiple or width % multiple:
            return f"height and width must be multiples of {multiple}, not {height}x{width}"
        if transformer_config.get("use_learned_positional_embeddings"):
            # CogVideoXPatchEmbed refuses any other size (CogVideoX-5b-I2V)
            size = (transformer_config["sample_height"] * self._spatial_factor(vae_config),
                    transformer_config["sample_width"] * self._spatial_factor(vae_config))
            if (height, width) != size:
                return (f"this transformer has learned positional embeddings (CogVideoX-5b-I2V) and takes only "
                        f"{size[0]}x{size[1]}, not {height}x{width}")
        return None

    def default_sequence_length(self, transformer_config: dict) -> int:
        return int(transformer_config.get("max_text_seq_length", self.default_text_tokens))

    def check_sequence_length(self, length: int, transformer_config: dict) -> str | None:
        # Generation feeds max_text_seq_length tokens; training on another length would learn another model.
        expected = self.default_sequence_length(transformer_config)
        if length != expected:
            return f"this transformer takes exactly {expected} text tokens, not {length}"
        return None

    # ------------------------------------------------------------------------------------------------ stage 1

    def encode_prompts(self, encoders: dict[str, Any], prompts: list[str], max_sequence_length: int
                       ) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": t5_prompt_embeds(encoders, prompts, max_sequence_length)[0]}

    def image_conditioning(self, transformer_config: dict, model_index: dict) -> ImageConditioning | None:
        """CogVideoX-5b-I2V and CogVideoX1.5-5B-I2V: a transformer taking the image's latents on its channels beside
        the noised latents (in_channels = 2 x out_channels)."""
        out_channels = int(transformer_config.get("out_channels") or 16)
        if int(transformer_config.get("in_channels") or out_channels) != 2 * out_channels:
            return None
        return ImageConditioning("channel-concat", I2V_PIPELINE)

    def latent_channels(self, transformer_config: dict) -> int:
        return int(transformer_config.get("out_channels") or transformer_config.get("in_channels") or 0)

    def encode_image(self, models: dict[str, Any], frames: torch.Tensor, num_frames: int,
                     conditioning: ImageConditioning) -> dict[str, torch.Tensor]:
        """`CogVideoXImageToVideoPipeline.prepare_latents`: each sample's first frame alone, a 1-frame video, through
        the VAE (one image at a time, as the pipeline encodes them), stored as the posterior it samples from
        (`image_mean`, `image_logvar` [C, 1, h, w])."""
        import torch

        vae = models["vae"]
        posteriors = [vae.encode(frame[None].to(vae.device, vae.dtype)).latent_dist for frame in frames[:, :, :1]]
        return {"image_mean": torch.cat([p.mean for p in posteriors]),
                "image_logvar": torch.cat([p.logvar for p in posteriors])}

    # ------------------------------------------------------------------------------------------------ stage 2

    def prepare_image(self, image: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                      generators: list[torch.Generator], conditioning: ImageConditioning,
                      options: TrainOptions | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's image latents before their padding (`image_latents` [B, 1, C, h, w]): a draw from the
        stored posterior with the sample's generator (the pipeline's `latent_dist.sample(generator)`), times the
        VAE's scaling factor (divided by it where the VAE config has `invert_scale_latents`: CogVideoX 1.5, whose
        team trained it so). With `--image-noise`, plus sigma x N(0, 1) with log sigma ~ N(-3, 0.5) per sample (the
        noised image of diffusers' I2V LoRA example, added here to the latents since the image was encoded in stage
        1), drawn after the posterior's. With `--noised-image-dropout p`, a coin from the same generator (drawn
        last) zeroes the sample's image latents with probability p, as finetrainers' legacy I2V scripts do to the
        padded latents (zeros padded with zeros are the same)."""
        import torch

        draw = sample_posterior({"mean": image["image_mean"], "logvar": image["image_logvar"]}, generators)
        scale = vae_config.get("scaling_factor", 1.15258426)
        draw = draw.permute(0, 2, 1, 3, 4)  # [B, C, 1, h, w] -> [B, 1, C, h, w]
        latents = 1 / scale * draw if vae_config.get("invert_scale_latents") else scale * draw
        if options is not None and options.image_noise:
            log_sigma = torch.stack([torch.randn((), generator=g) for g in generators])
            sigma = (log_sigma * IMAGE_NOISE_LOG_STD + IMAGE_NOISE_LOG_MEAN).exp().to(latents.device)
            latents = latents + sigma.view(-1, 1, 1, 1, 1) * randn_per_sample(tuple(latents.shape[1:]), generators,
                                                                              latents.device)
        if options is not None and options.noised_image_dropout:
            keep = torch.tensor([float(torch.rand((), generator=g) >= options.noised_image_dropout)
                                 for g in generators], dtype=latents.dtype, device=latents.device)
            latents = latents * keep.view(-1, 1, 1, 1, 1)
        return {"image_latents": latents}

    def prepare_latents(self, latents: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                        generators: list[torch.Generator]) -> torch.Tensor:
        sample = sample_posterior(latents, generators)
        scale = vae_config.get("scaling_factor", 1.15258426)
        latents = (sample * scale).permute(0, 2, 1, 3, 4).contiguous()  # [B, C, F, H, W] -> [B, F, C, H, W]
        return pad_latent_frames(latents, transformer_config.get("patch_size_t"))

    def rotary_embeddings(self, transformer_config: dict, latent_frames: int, latent_height: int,
                          latent_width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 3D RoPE tables `CogVideoXPipeline._prepare_rotary_positional_embeddings` makes, from latent sizes."""
        if not transformer_config.get("use_rotary_positional_embeddings", False):
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        p = transformer_config["patch_size"]
        p_t = transformer_config.get("patch_size_t")
        grid_h, grid_w = latent_height // p, latent_width // p
        base_w, base_h = transformer_config["sample_width"] // p, transformer_config["sample_height"] // p
        head_dim = transformer_config["attention_head_dim"]
        if p_t is None:
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=crops, grid_size=(grid_h, grid_w),
                                           temporal_size=latent_frames, device=device)
        return get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                       temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice",
                                       max_size=(base_h, base_w), device=device)

    def cached_rotary_embeddings(self, transformer_config: Any, latent_frames: int, latent_height: int,
                                 latent_width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`rotary_embeddings`, made once per latent size and device: the same tables every step of a bucket (the
        transformer only reads them), without rebuilding them on the host each micro-batch."""
        names = ("use_rotary_positional_embeddings", "patch_size", "patch_size_t", "sample_width", "sample_height",
                 "attention_head_dim")
        key = (tuple(transformer_config.get(n) for n in names), latent_frames, latent_height, latent_width,
               str(device))
        cache = self.__dict__.setdefault("_rotary_cache", {})
        if key not in cache:
            if len(cache) >= 16:  # a few buckets at a time; never grows without bound
                cache.clear()
            cache[key] = self.rotary_embeddings(transformer_config, latent_frames, latent_height, latent_width,
                                                device)
        return cache[key]

    context_parallel = ("ft's plan: the text tokens (after the patch embedding) and the video tokens are both split "
                        "before the first block, and the rotary tables with the video tokens; each block's timestep "
                        "modulation is per token, so it needs no split; every rank attends over the whole joint "
                        "text+video sequence (ring or Ulysses, through ft's CogVideoX attention processor); the "
                        "video tokens are gathered after proj_out. The text length (226) and the video tokens must "
                        "both divide by --cp-degree.")

    def cp_plan(self, transformer: Any) -> dict[str, Any]:
        """The plan (class docstring of ContextParallelAttention) and the processor it needs, installed in every
        block's attention."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        for block in transformer.transformer_blocks:
            block.attn1.set_processor(ContextParallelAttention())
        rotary = ContextParallelInput(split_dim=0, expected_dims=2)
        tokens = ContextParallelInput(split_dim=1, expected_dims=3)
        return {"": {"image_rotary_emb": (rotary, rotary)},
                "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
                "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}

    def cp_sequences(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict,
                     text_length: int) -> dict[str, int]:
        return {**super().cp_sequences(bucket, vae_config, transformer_config, text_length),
                "text tokens": text_length}

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        """The transformer's v-prediction output for the noised latents, fed as CogVideoXPipeline feeds it."""
        import torch

        _, frames, _, height, width = step.noisy.shape
        rotary = self.cached_rotary_embeddings(transformer.config, frames, height, width, step.noisy.device)
        hidden, extra = step.noisy.to(dtype), {}
        if step.image_conditioning is not None:  # CogVideoXImageToVideoPipeline: the image latents on the channels
            condition = image_condition_frames(step.image["image_latents"].to(dtype), frames,
                                               transformer.config.patch_size_t)
            hidden = torch.cat([hidden, condition], dim=2)
            ofs = None if transformer.config.ofs_embed_dim is None else hidden.new_full((1,), fill_value=OFS)
            extra = {"ofs": ofs, "attention_kwargs": None}
        output = transformer(hidden_states=hidden, encoder_hidden_states=step.cond["prompt_embeds"].to(dtype),
                             timestep=step.timesteps, image_rotary_emb=rotary, return_dict=False, **extra)[0]
        return output, None

    # ------------------------------------------------------------------------------------------------ generation

    def generation_defaults(self, transformer_config: dict, vae_config: dict) -> dict[str, Any]:
        s = self._spatial_factor(vae_config)
        return {"num_frames": transformer_config.get("sample_frames", 49),
                "height": transformer_config.get("sample_height", 60) * s,
                "width": transformer_config.get("sample_width", 90) * s}

    def check_generation_size(self, size: tuple[int, int, int], vae_config: dict, transformer_config: dict
                              ) -> str | None:
        # the 1.5 pipeline pads the latent frames to its temporal patch itself
        return self.check_bucket(size, vae_config, {**transformer_config, "patch_size_t": None})

    def pipeline_call_kwargs(self, transformer_config: dict) -> dict[str, Any]:
        return {"max_sequence_length": self.default_sequence_length(transformer_config)}

    # ------------------------------------------------------------------------------------------------ tests

    tiny_variants = {"i2v": "CogVideoX-5b-I2V's layout (learned positional embeddings)",
                     "i2v-1.5": "CogVideoX1.5-5B-I2V's layout (temporal patches, ofs, invert_scale_latents)"}

    def tiny_variant(self, variant: str, seed: int = 0) -> tuple[tuple[str, str], dict[str, Any]]:
        if variant in ("i2v", "i2v-1.5"):
            return I2V_PIPELINE, tiny_i2v_components(seed, version_1_5=variant == "i2v-1.5")
        return super().tiny_variant(variant, seed)

    def tiny_components(self, seed: int = 0) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

        from .tiny import t5_tokenizer, tiny_t5_encoder

        torch.manual_seed(seed)
        tokenizer = t5_tokenizer()
        text_encoder = tiny_t5_encoder(tokenizer)
        vae = AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4)
        # Rotary embeddings on, as in CogVideoX-5b, so the tiny model exercises that path.
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
            text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True)
        scheduler = CogVideoXDDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
            timestep_spacing="trailing")
        return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
                "scheduler": scheduler}


def tiny_i2v_components(seed: int = 0, version_1_5: bool = False) -> dict[str, Any]:
    """CogVideoX-5b-I2V's layout at toy size (`CogVideoXSpec.tiny_components` with a transformer taking the image
    latents on its channels, in_channels 2 x 4, and learned positional embeddings, so only 32x32), or with
    `version_1_5` CogVideoX1.5-5B-I2V's (temporal patches of 2, the `ofs` embedding, no patch bias, a VAE with
    `invert_scale_latents`); `CogVideoXImageToVideoPipeline(**parts)` builds it."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    parts = CogVideoXSpec().tiny_components(seed)
    torch.manual_seed(seed + 2)
    # 1.5: its "slice" rotary grid holds sizes up to the sample size (the real one's 300x300 latents): 64x64 here
    layout = ({"patch_size_t": 2, "ofs_embed_dim": 4, "patch_bias": False, "sample_width": 8, "sample_height": 8}
              if version_1_5 else {"use_learned_positional_embeddings": True, "sample_width": 4, "sample_height": 4})
    parts["transformer"] = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=4,
        text_embed_dim=32, num_layers=2, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=16, sample_frames=9, use_rotary_positional_embeddings=True, **layout)
    if version_1_5:
        parts["vae"] = AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4, scaling_factor=0.7, invert_scale_latents=True)
    return parts

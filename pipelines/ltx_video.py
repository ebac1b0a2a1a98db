"""LTX-Video (LTXPipeline: T5 + AutoencoderKLLTXVideo + LTXVideoTransformer3DModel), trained with flow matching.

What is stored (stage 1), as `LTXPipeline._get_t5_prompt_embeds` and the VAE make it:
- `prompt_embeds` and `prompt_attention_mask` (bool) from T5, 128 tokens by default;
- the VAE posterior: its `mean` [C, F, H, W] and its log-variance, which the LTX VAE makes as ONE channel repeated
  over all C (the encoder's last channel): stored once, [1, F, H, W], and broadcast in stage 2.
- The VAE's `latents_mean` / `latents_std` are weight buffers, not config. They are NOT applied in stage 1: they
  travel in the manifest beside the VAE's config (`encoders.vae.config`), and stage 2 normalises with them. So the
  stored posterior is the VAE's own, and the draw z = mean + exp(logvar / 2) * eps is made before normalising.
- Each sample's JSON records its effective frame rate `fps` (source fps over the frame spacing; see
  ft.precompute.media.effective_fps); a still has none and trains at the pipeline's default, 25 fps.

What is fed (stage 2), as `LTXPipeline.__call__` feeds its transformer:
- latents drawn from the posterior, normalised as `_normalize_latents` does ((z - latents_mean) * scaling_factor /
  latents_std), noised by the shared flow-matching objective (x_s = (1 - s) x0 + s noise, timestep 1000 s, target
  noise - x0), packed into tokens as `_pack_latents` does; the output is unpacked (`_unpack_latents`) so the loss
  compares like with like;
- `encoder_attention_mask`, the latent `num_frames` / `height` / `width`, and `rope_interpolation_scale` =
  (temporal compression / fps, spatial compression, spatial compression) with each sample's own fps.
- `--first-frame-conditioning-p P`: with probability P per sample (drawn from the sample's generator), the first
  latent frame is noised only to sigma_ff = min(u * sigma, 0.25) (u uniform), as finetrainers' LTX trainer does
  for image-to-video (a light noise on the condition, as LTXConditionPipeline's `image_cond_noise_scale` adds at
  sampling); its tokens get timestep 0, as LTXImageToVideoPipeline feeds them (t * (1 - conditioning_mask)); and
  its elements leave the loss, numerator and denominator (the mean is over the frames that are targets), as
  Lightricks' LTX-Video-Trainer masks it. finetrainers feeds every token the sample's timestep and keeps the
  frame in its loss: the condition is then trained as a target at a timestep it is not noised to.

Image-to-video (`--mode i2v`; every LTX-Video checkpoint serves both modes, `ImageConditioning(kind="first-frame",
text_to_video=True)`, sampled by `LTXImageToVideoPipeline`), as that pipeline's `prepare_latents` and loop make it:
- stage 1 stores the clip's first frame encoded ALONE through the VAE (a 1-frame video, as the pipeline encodes its
  image), as its posterior (`condition_mean`, one-channel `condition_logvar`): the pipeline DRAWS from it
  (`retrieve_latents` with its generator), and so does stage 2, from the sample's generator after the latent, noise
  and sigma draws, then normalises the draw as the pipeline does (`_normalize_latents` with its default
  scaling_factor 1);
- stage 2 replaces the noised first latent frame by that condition (the pipeline keeps frame 0 at its clean
  `init_latents` through the loop and steps only frames 1:), feeds per-token timesteps t * (1 - conditioning_mask)
  and leaves the first frame out of the loss (numerator and denominator);
- `--first-frame-conditioning-p` means, in i2v mode, the probability that a sample is image-conditioned (default 1;
  the coin is the sample's generator's next draw after the condition's); an unconditioned sample trains as
  text-to-video. In t2v mode it keeps the meaning above (default 0).
A still (one latent frame) has nothing after its condition: it trains as text-to-video in either mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs

from .base import CondTensor, ModelSpec, StepInputs, TrainOptions, normalize_latents, sample_posterior, t5_prompt_embeds
from .fingerprint import read_stored_tensor
from .image import ImageConditioning
from .lora_keys import OriginalLayout, Rename
from .real_configs import T5_XXL, Checkpoint

if TYPE_CHECKING:
    import torch

    from ft.common.shards import Manifest

DEFAULT_FRAME_RATE = 25.0  # LTXPipeline.__call__'s frame_rate; what a still (no frame spacing) trains at
MIN_FIRST_FRAME_SIGMA = 0.25  # finetrainers' cap on the conditioned first frame's noise level


IMAGE_TO_VIDEO_PIPELINE = ("diffusers", "LTXImageToVideoPipeline")


def replace_first_frame(noisy: torch.Tensor, first: torch.Tensor, chosen: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """`noisy` [B, C, F, H, W] with its first frame replaced by `first` [B, C, 1, H, W] where `chosen` [B] (bool),
    and the conditioning mask [B, 1, F, H, W] (1 on those samples' first frames)."""
    import torch

    select = chosen.to(noisy.device).view(-1, 1, 1, 1, 1)
    out = noisy.clone()
    out[:, :, :1] = torch.where(select, first, noisy[:, :, :1])
    b, _, frames, height, width = noisy.shape
    mask = torch.zeros(b, 1, frames, height, width, device=noisy.device)
    mask[:, :, :1] = select.to(mask.dtype)
    return out, mask


def compression_ratios(vae_config: dict) -> tuple[int, int]:
    """(temporal, spatial) compression of an LTX VAE, computed as AutoencoderKLLTXVideo.__init__ does."""
    scaling = vae_config.get("spatio_temporal_scaling", (True, True, True, False))
    spatial = vae_config.get("spatial_compression_ratio") or vae_config.get("patch_size", 4) * 2 ** sum(scaling)
    temporal = vae_config.get("temporal_compression_ratio") or vae_config.get("patch_size_t", 1) * 2 ** sum(scaling)
    return int(temporal), int(spatial)


def pack_latents(latents: torch.Tensor, p: int, p_t: int) -> torch.Tensor:
    """[B, C, F, H, W] -> tokens [B, F/p_t * H/p * W/p, C * p_t * p * p], frame-major (LTXPipeline's order)."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // p_t, p_t, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_latents(tokens: torch.Tensor, frames: int, height: int, width: int, p: int, p_t: int) -> torch.Tensor:
    """The inverse of `pack_latents`, given the latent frames, height and width."""
    b = tokens.size(0)
    x = tokens.reshape(b, frames // p_t, height // p, width // p, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


# Lightricks/LTX-Video's scheduler_config.json (resolution-dependent shift at sampling time): the tiny model's
# scheduler, so tests train and sample with LTX-Video's own shift settings
SCHEDULER_CONFIG = {"base_image_seq_len": 1024, "base_shift": 0.95, "max_image_seq_len": 4096, "max_shift": 2.05,
                    "shift": 1.0, "shift_terminal": 0.1, "use_dynamic_shifting": True}
PIPELINE_MULTIPLE = 32  # diffusers' LTXPipeline.check_inputs: height and width divisible by 32
# Lightricks' module names (ComfyUI's LTXV model has them): diffusers renamed only patchify_proj and adaln_single
# (its convert_ltx_transformer_checkpoint_to_diffusers; checked in tests/pipelines/test_lora_keys.py)
ORIGINAL_LAYOUT = OriginalLayout(
    "LTX-Video's original (Lightricks) checkpoint",
    renames=(Rename("proj_in", "patchify_proj"), Rename(r"time_embed\.(.+)", r"adaln_single.\1"),
             Rename(r"(caption_projection\.linear_[12]|proj_out|transformer_blocks\.\d+\."
                    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))", r"\1")),
    read_prefixes=("diffusion_model.", ""))


class ContextParallelAttention:
    """LTXVideoAttnProcessor whose cross-attention runs without context parallelism: each rank's video queries
    attend to the whole text, which every rank holds (ft's plan does not split it), as Wan's processor does.
    diffusers' own plan splits the text too, but its Ulysses backward assumes keys as long as the queries (it
    fails on the cross-attention), and ring attention would apply a rank's part of the text mask to every rank's
    text keys. Self-attention (no mask) runs ring or Ulysses attention. The same arithmetic as the original."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        parallel = self._parallel_config if encoder_hidden_states is None else None
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False, backend=self._attention_backend,
                                              parallel_config=parallel)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class LTXVideoSpec(ModelSpec):
    name = "ltx_video"
    display_name = "LTX-Video"
    aliases = ("ltx-video", "ltx", "ltxvideo")
    objective = "flow_matching"
    channel_dim = 1  # prepare_latents returns [B, C, F, H, W]; predict packs and unpacks around the transformer
    pipeline_class = ("diffusers", "LTXPipeline")
    component_classes = {
        "tokenizer": ("transformers", "AutoTokenizer"),
        "text_encoder": ("transformers", "T5EncoderModel"),
        "vae": ("diffusers", "AutoencoderKLLTXVideo"),
        "transformer": ("diffusers", "LTXVideoTransformer3DModel"),
    }
    text_components = ("tokenizer", "text_encoder")
    scheduler_class = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    original_layout = ORIGINAL_LAYOUT
    default_buckets = ["49x512x768"]
    default_text_tokens = 128  # LTXPipeline's max_sequence_length
    conditioning = (CondTensor("prompt_embeds", "caption_channels"), CondTensor("prompt_attention_mask", None,
                                                                                 dtype="bool"))
    # Lightricks/LTX-Video: one checkpoint for text- and image-to-video (LTXPipeline, LTXImageToVideoPipeline)
    checkpoints = (Checkpoint("LTX-Video 0.9", ("Lightricks/LTX-Video", "a-r-r-o-w/LTX-Video-diffusers", "ltx-video"),
                              {"transformer": {}, "vae": {}, "text_encoder": T5_XXL}, image_to_video=True),)
    default_fps = DEFAULT_FRAME_RATE
    frame_rate_argument = "frame_rate"
    first_frame_conditioning = True
    finetrainers_first_frame_conditioning_p = 0.1  # hard-coded in finetrainers' LTX-Video trainer

    context_parallel = ("ft's plan (diffusers' LTXVideoTransformer3DModel._cp_plan without the text split): the "
                        "packed video tokens (and first-frame conditioning's per-token timesteps) are split at the "
                        "transformer's input, the rotary tables as the rope module makes them; self-attention runs "
                        "ring or Ulysses attention, cross-attention attends to the whole text, which every rank "
                        "holds; the video tokens are gathered after proj_out.")

    # ------------------------------------------------------------------------------------------------ facts

    def check_bucket(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict) -> str | None:
        frames, height, width = bucket
        temporal, spatial = compression_ratios(vae_config)
        if (frames - 1) % temporal:
            return (f"LTX-Video takes {temporal}k+1 frames (1, {temporal + 1}, {2 * temporal + 1}, ...), "
                    f"not {frames}")
        p_t = transformer_config.get("patch_size_t", 1)
        if ((frames - 1) // temporal + 1) % p_t:
            return f"this transformer (patch_size_t={p_t}) needs a latent frame count divisible by {p_t}"
        multiple = spatial * transformer_config.get("patch_size", 1)
        if height % multiple or width % multiple:
            return f"height and width must be multiples of {multiple}, not {height}x{width}"
        return None

    def check_generation_size(self, size: tuple[int, int, int], vae_config: dict, transformer_config: dict
                              ) -> str | None:
        """Training's rule, and LTXPipeline's own: its check_inputs takes only heights and widths divisible by 32
        (the real VAE's compression), whatever the VAE, so a size a smaller VAE trains on may not generate."""
        problem = self.check_bucket(size, vae_config, transformer_config)
        if problem or (size[1] % PIPELINE_MULTIPLE == 0 and size[2] % PIPELINE_MULTIPLE == 0):
            return problem
        near = [max(PIPELINE_MULTIPLE, round(x / PIPELINE_MULTIPLE) * PIPELINE_MULTIPLE) for x in size[1:]]
        return (f"LTXPipeline generates only heights and widths divisible by {PIPELINE_MULTIPLE} (its check_inputs), "
                f"not {size[1]}x{size[2]}, even where training takes that size; the nearest it takes: height "
                f"{near[0]}, width {near[1]}")

    def compression(self, vae_config: dict) -> tuple[int, int]:
        return compression_ratios(vae_config)

    # ------------------------------------------------------------------------------------------------ stage 1

    def encoding_choices(self, transformer_config: dict) -> dict[str, Any]:
        return {"latents": "posterior mean, log-variance stored once (one channel)",
                "latent_normalisation": "stage 2, with the VAE's latents_mean/latents_std from the manifest"}

    def encoder_fingerprints(self, encoders: dict[str, Any], vae: Any, args: ModelArgs) -> dict[str, Any]:
        """As the base, plus the VAE's `latents_mean` / `latents_std` buffers in its config entry: stage 2 reads
        `encoders.vae.config` from the manifest and normalises with them without loading the VAE."""
        out = super().encoder_fingerprints(encoders, vae, args)
        out["vae"]["config"] = {**out["vae"]["config"],
                                "latents_mean": [float(x) for x in vae.latents_mean.float().cpu()],
                                "latents_std": [float(x) for x in vae.latents_std.float().cpu()]}
        return out

    def fingerprints_from_files(self, args: ModelArgs, components: tuple[str, ...] | None = None
                                ) -> dict[str, Any]:
        """As `encoder_fingerprints`, from the files: the buffers are read from the VAE's stored tensors."""
        out = super().fingerprints_from_files(args, components)
        if "vae" in out:
            files = self.component_files("vae", args).weights
            out["vae"]["config"] = {**out["vae"]["config"],
                                    "latents_mean": read_stored_tensor(files, "latents_mean"),
                                    "latents_std": read_stored_tensor(files, "latents_std")}
        return out

    def encode_video(self, vae: Any, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        posterior = vae.encode(frames.to(vae.device, vae.dtype)).latent_dist
        # the LTX encoder repeats one log-variance channel over all latent channels: keep one
        return {"mean": posterior.mean, "logvar": posterior.logvar[:, :1]}

    def encode_prompts(self, encoders: dict[str, Any], prompts: list[str], max_sequence_length: int
                       ) -> dict[str, torch.Tensor]:
        embeds, mask = t5_prompt_embeds(encoders, prompts, max_sequence_length)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def image_conditioning(self, transformer_config: dict, model_index: dict) -> ImageConditioning | None:
        """Every LTX-Video checkpoint also samples from an image (`LTXImageToVideoPipeline`: the first latent frame
        replaced by the image's)."""
        return ImageConditioning("first-frame", IMAGE_TO_VIDEO_PIPELINE, text_to_video=True)

    def encode_image(self, models: dict[str, Any], frames: torch.Tensor, num_frames: int,
                     conditioning: ImageConditioning) -> dict[str, torch.Tensor]:
        """`LTXImageToVideoPipeline.prepare_latents`: the first frame alone through the VAE (a 1-frame video); its
        posterior is stored (the pipeline draws from it), the log-variance once, as `encode_video` stores it."""
        latents = self.encode_video(models["vae"], frames[:, :, :1])
        return {"condition_mean": latents["mean"], "condition_logvar": latents["logvar"]}

    # ------------------------------------------------------------------------------------------------ stage 2

    def latent_channels(self, transformer_config: dict) -> int:
        """The VAE's channels: the transformer's in_channels are those times its patch (p x p x p_t)."""
        p, p_t = transformer_config.get("patch_size", 1), transformer_config.get("patch_size_t", 1)
        return int(transformer_config.get("in_channels") or 0) // (p * p * p_t)

    def check_shard_extras(self, manifest: Manifest, transformer_config: dict) -> None:
        vae = manifest.encoders.get("vae", {}).get("config", {})
        if "latents_mean" not in vae or "latents_std" not in vae:
            raise UserError("the manifest lacks the VAE's latents_mean/latents_std: precompute the shards again "
                            "with this version of ft.")

    def prepare_latents(self, latents: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                        generators: list[torch.Generator]) -> torch.Tensor:
        import torch

        sample = sample_posterior(latents, generators)  # the one-channel log-variance broadcasts over channels
        return normalize_latents(sample, torch.tensor(vae_config["latents_mean"]),
                                 torch.tensor(vae_config["latents_std"]), vae_config.get("scaling_factor", 1.0))

    def prepare_image(self, image: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                      generators: list[torch.Generator], conditioning: ImageConditioning,
                      options: TrainOptions | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's `init_latents` (a draw from the stored posterior, normalised by `_normalize_latents` with
        its default scaling_factor 1) and each sample's coin for `--first-frame-conditioning-p` (`coin`, [B]), both
        from the sample's generator, in that order."""
        import torch

        draw = sample_posterior({"mean": image["condition_mean"], "logvar": image["condition_logvar"]}, generators)
        condition = normalize_latents(draw, torch.tensor(vae_config["latents_mean"]),
                                      torch.tensor(vae_config["latents_std"]), 1.0)
        coin = torch.cat([torch.rand(1, generator=g) for g in generators]).to(condition.device)
        return {"condition": condition, "coin": coin}

    @staticmethod
    def frame_rates(meta: list[dict[str, Any]]) -> list[float]:
        """Each sample's frame rate: its recorded effective fps; a still (or a sample without one) gets 25."""
        return [float(m.get("fps") or DEFAULT_FRAME_RATE) for m in meta]

    @staticmethod
    def sample_compression(meta: dict[str, Any]) -> tuple[int, int]:
        """(temporal, spatial) compression of the VAE that encoded a sample, from its bucket and latent shape
        (frames = temporal * (latent frames - 1) + 1; a 1-frame sample's temporal ratio never enters RoPE)."""
        frames, height, _ = meta["bucket"]
        _, latent_frames, latent_height, _ = meta["latent_shape"]
        temporal = (frames - 1) // (latent_frames - 1) if latent_frames > 1 else 1
        return temporal, height // latent_height

    def rope_interpolation_scale(self, meta: list[dict[str, Any]], device: torch.device
                                 ) -> tuple[torch.Tensor, float, float]:
        """(temporal compression / fps per sample, spatial compression, spatial compression), as LTXPipeline makes
        it from its frame_rate; the temporal entry is [B, 1, 1, 1, 1] so each sample keeps its own fps."""
        import torch

        temporal, spatial = self.sample_compression(meta[0])  # one bucket per batch
        fps = self.frame_rates(meta)
        per_sample = torch.tensor([temporal / f for f in fps], dtype=torch.float32, device=device)
        return per_sample.view(-1, 1, 1, 1, 1), spatial, spatial

    def condition_first_frame(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The noised latents with the first frame re-noised to a low sigma for the samples whose draw says so,
        and the conditioning mask [B, 1, F, H, W] (1 on those samples' first frames; None when no sample is
        conditioned), LTXImageToVideoPipeline's `conditioning_mask` before packing."""
        import torch

        if step.image_conditioning is not None:
            return self.condition_on_image(step)
        p = step.options.first_frame_conditioning_p or 0.0
        if p <= 0 or step.noisy.shape[2] < 2:  # a still's only frame is the sample: nothing to condition on
            return step.noisy, None
        coin, u = torch.stack([torch.rand(2, generator=g) for g in step.generators]).T  # after the shared draws
        chosen = (coin < p).to(step.noisy.device)
        if not bool(chosen.any()):
            return step.noisy, None
        sigma_ff = torch.minimum(u.to(step.sigmas) * step.sigmas, torch.full_like(step.sigmas, MIN_FIRST_FRAME_SIGMA))
        s = sigma_ff.view(-1, 1, 1, 1, 1).to(step.noisy.dtype)
        first = (1 - s) * step.latents[:, :, :1] + s * step.noise[:, :, :1]
        return replace_first_frame(step.noisy, first, chosen)

    @staticmethod
    def condition_on_image(step: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image-to-video: the noised latents with the first frame replaced by the image's condition for the samples
        whose coin falls under --first-frame-conditioning-p (default 1 in i2v mode), and the conditioning mask."""
        p = step.options.first_frame_conditioning_p
        chosen = step.image["coin"] < (1.0 if p is None else p)
        if step.noisy.shape[2] < 2 or not bool(chosen.any()):
            return step.noisy, None
        return replace_first_frame(step.noisy, step.image["condition"].to(step.noisy.dtype), chosen)

    @staticmethod
    def token_timesteps(timesteps: torch.Tensor, mask: torch.Tensor, p: int, p_t: int) -> torch.Tensor:
        """Per-token timesteps [B, tokens] as LTXImageToVideoPipeline makes them: t * (1 - conditioning_mask), the
        mask packed as the latents are (so the conditioned frame's tokens get 0)."""
        packed = pack_latents(mask, p, p_t).squeeze(-1)
        return timesteps.to(packed).unsqueeze(-1) * (1 - packed)

    def cp_plan(self, transformer: Any) -> dict[str, Any]:
        """The plan (`context_parallel`) and the processor it needs (ContextParallelAttention) in every attention."""
        from diffusers.models._modeling_parallel import ContextParallelInput

        for block in transformer.transformer_blocks:
            for attention in (block.attn1, block.attn2):
                attention.set_processor(ContextParallelAttention())
        plan = type(transformer)._cp_plan
        return {"": {"hidden_states": plan[""]["hidden_states"],
                     "timestep": ContextParallelInput(split_dim=1, expected_dims=2)},
                "rope": plan["rope"], "proj_out": plan["proj_out"]}

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The transformer's velocity prediction, fed as LTXPipeline feeds it, unpacked to [B, C, F, H, W].
        A batch with conditioned first frames is fed as LTXImageToVideoPipeline feeds it (per-token timesteps, 0
        on the condition), and the condition's elements get loss weight 0 (out of the mean, see
        ft.train.objectives.Objective.sample_losses)."""
        config = transformer.config
        p, p_t = config.patch_size, config.patch_size_t
        noisy, mask = self.condition_first_frame(step)
        _, _, frames, height, width = noisy.shape
        timestep = step.timesteps if mask is None else self.token_timesteps(step.timesteps, mask, p, p_t)
        scale = self.rope_interpolation_scale(step.meta, noisy.device)
        output = transformer(hidden_states=pack_latents(noisy, p, p_t).to(dtype),
                             encoder_hidden_states=step.cond["prompt_embeds"].to(dtype),
                             timestep=timestep, encoder_attention_mask=step.cond["prompt_attention_mask"],
                             num_frames=frames, height=height, width=width, rope_interpolation_scale=scale,
                             attention_kwargs=None, return_dict=False)[0]
        return unpack_latents(output, frames, height, width, p, p_t), None if mask is None else 1 - mask

    # ------------------------------------------------------------------------------------------------ generation

    def generation_defaults(self, transformer_config: dict, vae_config: dict) -> dict[str, Any]:
        return {"num_frames": 161, "height": 512, "width": 704}  # LTXPipeline.__call__'s defaults

    # ------------------------------------------------------------------------------------------------ tests

    def tiny_components(self, seed: int = 0) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

        from .tiny import t5_tokenizer, tiny_t5_encoder

        torch.manual_seed(seed)
        tokenizer = t5_tokenizer()
        text_encoder = tiny_t5_encoder(tokenizer)
        vae = AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
            timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
        with torch.no_grad():  # non-trivial statistics, so normalisation is exercised
            vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, 8))
            vae.latents_std.copy_(torch.linspace(0.5, 1.5, 8))
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
            cross_attention_dim=32, num_layers=1, caption_channels=32)
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
                "scheduler": scheduler}

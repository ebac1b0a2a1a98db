"""CogVideoX (2b, 5b, 1.5) and its finetunes: T5 text conditioning, a 3D causal VAE, v-prediction on DDPM.

Training follows the objective CogVideoX was trained with (see diffusers' examples/cogvideo and the pipeline):
noise is added with the scheduler's `add_noise`, the transformer's output is turned into a clean-latent estimate
with `get_velocity`, the target is the clean latents, and each sample is weighted by 1 / (1 - alphas_cumprod[t]).
The transformer is fed exactly as `CogVideoXPipeline` feeds it: latents [B, F, C, H, W] scaled by the VAE's
scaling factor, the T5 embeddings padded to `max_text_seq_length`, and 3D rotary embeddings when the config uses
them (the 1.0 "crop" grid, or the 1.5 "slice" grid when the config has `patch_size_t`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import CondTensor, ModelSpec, StepInputs, sample_posterior, t5_prompt_embeds
from .lora_keys import OriginalLayout, Rename
from .real_configs import T5_XXL, Checkpoint

if TYPE_CHECKING:
    import torch

TEMPORAL_COMPRESSION = 4
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
    )

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

    # ------------------------------------------------------------------------------------------------ stage 2

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

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        """The transformer's v-prediction output for the noised latents, fed as CogVideoXPipeline feeds it."""
        _, frames, _, height, width = step.noisy.shape
        rotary = self.cached_rotary_embeddings(transformer.config, frames, height, width, step.noisy.device)
        output = transformer(hidden_states=step.noisy.to(dtype),
                             encoder_hidden_states=step.cond["prompt_embeds"].to(dtype),
                             timestep=step.timesteps, image_rotary_emb=rotary, return_dict=False)[0]
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

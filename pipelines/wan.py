"""Wan 2.1 text-to-video (WanPipeline: UMT5 + AutoencoderKLWan + WanTransformer3DModel), trained with flow matching.

What is stored (stage 1), as `WanPipeline._get_t5_prompt_embeds` and the VAE make it:
- `prompt_embeds` from UMT5: the caption cleaned as the pipeline cleans it (`prompt_clean`: ftfy when installed,
  HTML entities, whitespace), tokenised to `--max-sequence-length` (512, the pipeline's), encoded with its
  attention mask, then cut to the caption's real length and zero-padded back. The zeros are what the pipeline feeds
  the transformer (it takes no text mask), so no mask is stored;
- the VAE posterior: its `mean` and `logvar` [z_dim, F, H, W], as the VAE makes them (not normalised). The VAE's
  `latents_mean` / `latents_std` are entries of its config.json, so they travel in the manifest with the rest of
  the VAE's config (`encoders.vae.config`) and stage 2 normalises with them.

What is fed (stage 2), as `WanPipeline.__call__` feeds its transformer:
- latents drawn from the stored posterior, then normalised as the pipeline's decode inverts them:
  (z - latents_mean) / latents_std per channel ([B, C, F, H, W], patched by the transformer itself). finetrainers
  normalises the mean and the log-variance with the same formula and then draws; the log-variance of a scaled
  variable is not that (it shifts by -2 log std), so ft draws first and normalises the draw, as LTX-Video does;
- the shared flow-matching objective (x_s = (1 - s) x0 + s noise, target noise - x0), with finetrainers' Wan
  defaults: `--flow-shift 1`, `--flow-weighting-scheme none` (its crush_smol example sets logit_normal);
- the timestep as an integer, floor(1000 s): the pipeline's UniPC scheduler hands the transformer int64 timesteps
  and finetrainers trains Wan with `(sigmas * 1000).long()`; `encoder_hidden_states` = the stored embeddings.
Generation samples with the pipeline's own scheduler (UniPCMultistepScheduler with the `flow_shift` of the model's
scheduler config: 3.0 for 480p, 5.0 for 720p).

Wan 2.2 TI2V-5B (text-to-video) is the same classes with a 48-channel VAE that patches 2x2 itself (16x spatial
compression) and one pipeline setting, `expand_timesteps` in model_index.json: the pipeline then gives every token
its own timestep (all equal for text-to-video, as float32), and so does `predict`. The setting is read from
`--pretrained`, and the pipelines ft builds (generation, validation) get it too. TI2V-5B also samples from an image
(`--mode i2v`, `ft generate --image`: `ImageConditioning(kind="first-frame", text_to_video=True)`), as
WanImageToVideoPipeline does with `expand_timesteps`: stage 1 stores the first frame encoded ALONE through the VAE
(its posterior; the pipeline takes the mean), stage 2 normalises it with the pipeline's own arithmetic
((x - mean) * (1 / std)), feeds (1 - first_frame_mask) * condition + first_frame_mask * noisy (the first latent frame
replaced), the per-token timesteps (first_frame_mask[0][0][:, ::2, ::2] * t).flatten() (0 on the first frame), and
leaves the first latent frame out of the loss (the pipeline never denoises it). A still (one latent frame) has
nothing after its condition and trains as text-to-video. Wan 2.2's two-expert A14B (`boundary_ratio`,
`transformer_2`) trains one expert per run: wan_experts.py (`WanExperts`, a mixin of the spec).

Everything Wan-specific lives here: the spec, the real-size configs of Wan2.1-T2V-1.3B and 14B and Wan2.2-TI2V-5B
(`WanSpec.checkpoints`, for `ft estimate`), the aliases, the default bucket, the block list and
LoRA targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError

from .base import CondTensor, ModelSpec, StepInputs, TrainOptions, normalize_latents, sample_posterior
from .fingerprint import hub_hint
from .image import ImageConditioning
from .lora_keys import OriginalLayout, Rename
from .real_configs import Checkpoint
from .wan_experts import WanExperts, a14b_checkpoints

if TYPE_CHECKING:
    import torch

    from ft.common.shards import Manifest

PIPELINE_MULTIPLE = 16  # WanPipeline.check_inputs: height and width divisible by 16
ALIASES = ("wan2.1", "wan-2.1", "wan_2.1", "wan21", "wan-t2v", "wan2.2", "wan-2.2")

# ---------------------------------------------------------------------------------------------- real-size configs
# The published config.json files (Wan-AI/Wan2.1-T2V-*-Diffusers). The diffusers defaults of WanTransformer3DModel
# ARE the 14B transformer; the 1.3B is 12 heads x 30 layers with an 8960-wide MLP; AutoencoderKLWan()'s defaults are
# the Wan 2.1 VAE; the text encoder is google/umt5-xxl's encoder.
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
            "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128}
# the image encoder of Wan 2.1 I2V and FLF2V (open-clip ViT-H/14 as transformers' CLIPVisionModel)
CLIP_VIT_H_14 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu"}
CHECKPOINTS = (
    Checkpoint("Wan2.1-T2V-1.3B", ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan2.1-t2v-1.3b"),
     {"transformer": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}, "vae": {},
      "text_encoder": UMT5_XXL}),
    Checkpoint("Wan2.1-T2V-14B", ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan2.1-t2v-14b"),
     {"transformer": {}, "vae": {}, "text_encoder": UMT5_XXL}),
    # image-to-video (WanImageToVideoPipeline): 36 input channels, CLIP ViT-H/14's image embeddings (image_dim),
    # FLF2V's two images (pos_embed_seq_len, 2 x 257 tokens); the image encoder is counted in precompute
    *(Checkpoint(name, (f"Wan-AI/{name}-Diffusers", name.lower()),
                 {"transformer": {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120, **extra},
                  "vae": {}, "text_encoder": UMT5_XXL, "image_encoder": CLIP_VIT_H_14}, image_to_video=True)
      for name, extra in (("Wan2.1-I2V-14B-480P", {}), ("Wan2.1-I2V-14B-720P", {}),
                          ("Wan2.1-FLF2V-14B-720P", {"pos_embed_seq_len": 514}))),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers: its transformer and VAE configs' structure (the VAE's 48 latents_mean/std
    # values come from the model's own config.json when it trains)
    Checkpoint("Wan2.2-TI2V-5B", ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "wan2.2-ti2v-5b"),
     {"transformer": {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48,
                      "out_channels": 48},
      "vae": {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "patch_size": 2,
              "in_channels": 12, "out_channels": 12, "scale_factor_spatial": 16},
      "text_encoder": UMT5_XXL}, image_to_video=True),  # text- and image-to-video
    *a14b_checkpoints(UMT5_XXL),
)


# Wan-AI's module names, which ComfyUI's Wan model has and musubi-tuner, diffusion-pipe and diffusers' Wan LoRA reader
# read (checked against diffusers' convert_wan_transformer_to_diffusers in tests/pipelines/test_lora_keys.py)
ORIGINAL_LAYOUT = OriginalLayout(
    "Wan's original (Wan-AI) checkpoint",
    renames=(Rename(r"blocks\.(\d+)\.attn1\.to_(q|k|v)", r"blocks.\1.self_attn.\2"),
             Rename(r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
             Rename(r"blocks\.(\d+)\.attn2\.to_(q|k|v)", r"blocks.\1.cross_attn.\2"),
             Rename(r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
             Rename(r"blocks\.(\d+)\.attn2\.add_(k|v)_proj", r"blocks.\1.cross_attn.\2_img"),
             Rename(r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
             Rename(r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
             Rename(r"condition_embedder\.(time|text)_embedder\.linear_1", r"\1_embedding.0"),
             Rename(r"condition_embedder\.(time|text)_embedder\.linear_2", r"\1_embedding.2"),
             Rename(r"condition_embedder\.time_proj", "time_projection.1"),
             Rename(r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
             Rename(r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
             Rename("proj_out", "head.head"), Rename("patch_embedding", "patch_embedding")),
    kohya=True)


def pipeline_normalised(mean: torch.Tensor, vae_config: dict) -> torch.Tensor:
    """A stored VAE mean [B, C, F, H, W] normalised as WanImageToVideoPipeline.prepare_latents normalises its
    condition, with its own arithmetic ((x - latents_mean) * (1 / latents_std), float32), so it is bitwise its."""
    import torch

    latent = mean.float()
    channels = latent.shape[1]
    latents_mean = torch.tensor(vae_config["latents_mean"]).view(1, channels, 1, 1, 1).to(latent.device)
    inverse_std = (1.0 / torch.tensor(vae_config["latents_std"]).view(1, channels, 1, 1, 1)).to(latent.device)
    return (latent - latents_mean) * inverse_std


def prompt_clean(prompts: list[str]) -> list[str]:
    """The captions as WanPipeline cleans them before tokenising (diffusers' own function)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as clean

    return [clean(p) for p in prompts]


def read_pipeline_settings(pretrained: str | None, revision: str | None = None, cache_dir: str | None = None
                           ) -> dict[str, Any]:
    """The settings of `pretrained`'s model_index.json that change the transformer call: `expand_timesteps` (Wan 2.2
    TI2V-5B). No `pretrained` (a spec built bare, as in unit tests): Wan 2.1's. A two-expert Wan 2.2's
    `boundary_ratio` is wan_experts.py's."""
    if not pretrained:
        return {"expand_timesteps": False}
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(pretrained, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # OSError, EnvironmentError, hub errors
        raise UserError(f"--pretrained {pretrained}: could not read its model_index.json ({e}); pass a diffusers "
                        f"Wan folder or hub id.{hub_hint(pretrained)}") from e
    return {"expand_timesteps": bool(config.get("expand_timesteps", False))}


class WanSpec(WanExperts, ModelSpec):
    name = "wan"
    display_name = "Wan"
    aliases = ALIASES
    objective = "flow_matching"
    channel_dim = 1  # latents are [B, C, F, H, W]
    pipeline_class = ("diffusers", "WanPipeline")
    component_classes = {
        "tokenizer": ("transformers", "AutoTokenizer"),
        "text_encoder": ("transformers", "UMT5EncoderModel"),
        "vae": ("diffusers", "AutoencoderKLWan"),
        "transformer": ("diffusers", "WanTransformer3DModel"),
    }
    text_components = ("tokenizer", "text_encoder")
    # Wan 2.1 I2V / FLF2V: CLIP ViT-H/14's penultimate hidden states of the image (WanImageToVideoPipeline)
    image_component_classes = {"image_encoder": ("transformers", "CLIPVisionModel"),
                               "image_processor": ("transformers", "CLIPImageProcessor")}
    # finetrainers trains Wan with FlowMatchEulerDiscreteScheduler(); the pipeline samples with the UniPC scheduler
    # its scheduler config names (ModelSpec.pipeline_scheduler)
    scheduler_class = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    # LoRA: the default targets are the self- and cross-attention projections of every block, as finetrainers'
    # "blocks.*(to_q|to_k|to_v|to_out.0)"; in ComfyUI's layout they are Wan-AI's names (ORIGINAL_LAYOUT)
    original_layout = ORIGINAL_LAYOUT
    default_buckets = ["49x480x832"]  # finetrainers' Wan example; the pipeline generates 81x480x832
    default_text_tokens = 512  # WanPipeline.__call__'s max_sequence_length
    block_lists = ("blocks",)
    context_parallel = ("diffusers' plan (WanTransformer3DModel._cp_plan): the video tokens are split before the "
                        "first block, with the rotary tables (and Wan 2.2 TI2V's per-token timesteps); the text "
                        "(and image) tokens of the cross-attention stay whole on every rank; the video tokens are "
                        "gathered after proj_out.")
    default_fps = 16.0  # Wan's videos (the pipeline's example writes 16 fps)
    # the stored UMT5 embeddings, zero-padded to the text length (the pipeline feeds no text mask)
    conditioning = (CondTensor("prompt_embeds", "text_dim", encoder="text encoder (UMT5)"),)
    checkpoints = CHECKPOINTS

    def check_args(self, args: Any) -> None:
        super().check_args(args)
        self.with_pretrained(args.pretrained, args.revision, args.cache_dir)

    def check_pretrained(self, pretrained: str, revision: str | None = None, cache_dir: str | None = None) -> None:
        read_pipeline_settings(pretrained, revision, cache_dir)  # an unreadable model_index.json, before any work

    def with_pretrained(self, pretrained: str | None, revision: str | None = None, cache_dir: str | None = None
                        ) -> WanSpec:
        """This spec reading its pipeline settings from `pretrained`'s model_index.json (`read_pipeline_settings`,
        when first needed); a spec never given one (a bare spec, as in unit tests) uses Wan 2.1's."""
        self._pretrained = (pretrained, revision, cache_dir)
        self.__dict__.pop("_pipeline_settings", None)
        return self

    # ------------------------------------------------------------------------------------------------ facts

    @staticmethod
    def compression(vae_config: dict) -> tuple[int, int]:
        """(temporal, spatial) compression of a Wan VAE, as WanPipeline reads them from its config."""
        return int(vae_config.get("scale_factor_temporal") or 4), int(vae_config.get("scale_factor_spatial") or 8)

    def check_bucket(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict) -> str | None:
        frames, height, width = bucket
        temporal, spatial = self.compression(vae_config)
        if (frames - 1) % temporal:
            return f"Wan takes {temporal}k+1 frames (1, {temporal + 1}, ..., 49, ..., 81), not {frames}"
        if frames == 1 and transformer_config.get("pos_embed_seq_len"):  # FLF2V: the VAE input is first, zeros, last
            return ("a first-last-frame model (FLF2V) conditions on the clip's first and last frames, so it takes "
                    "no 1-frame sample")
        p_t, p_h, p_w = transformer_config.get("patch_size", (1, 2, 2))
        if ((frames - 1) // temporal + 1) % p_t:
            return f"this transformer (temporal patch {p_t}) needs a latent frame count divisible by {p_t}"
        multiple = max(PIPELINE_MULTIPLE, spatial * max(p_h, p_w))  # the pipeline refuses sides not divisible by 16
        if height % multiple or width % multiple:
            return f"height and width must be multiples of {multiple}, not {height}x{width}"
        return None

    def caption_token_stats(self, args: Any, captions: list[str]) -> list[tuple[int, int, int]]:
        """The base's counts of the captions as they are encoded: cleaned first (`prompt_clean`: HTML entities,
        whitespace, ftfy), so a count is the tokens `encode_prompts` keeps before the zero padding."""
        return super().caption_token_stats(args, prompt_clean(captions))

    # ------------------------------------------------------------------------------------------------ stage 1

    def encoding_choices(self, transformer_config: dict) -> dict[str, Any]:
        from diffusers.utils import is_ftfy_available

        return {"prompt_clean": "ftfy, html, whitespace" if is_ftfy_available() else "html, whitespace",
                "text": "trimmed to the caption's tokens, zero-padded to the text length",
                "latent_normalisation": "stage 2, with the VAE config's latents_mean/latents_std"}

    def encode_prompts(self, encoders: dict[str, Any], prompts: list[str], max_sequence_length: int
                       ) -> dict[str, torch.Tensor]:
        """`WanPipeline._get_t5_prompt_embeds`: encoded with the mask, cut to each caption's length, zero-padded."""
        import torch

        tokenizer, text_encoder = encoders["tokenizer"], encoders["text_encoder"]
        tokens = tokenizer(prompt_clean(prompts), padding="max_length", max_length=max_sequence_length,
                           truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(text_encoder.device)
        embeds = text_encoder(tokens.input_ids.to(text_encoder.device), mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        padded = [torch.cat([e[:n], e.new_zeros(max_sequence_length - n, e.size(1))])
                  for e, n in zip(embeds, lengths, strict=True)]
        return {"prompt_embeds": torch.stack(padded)}

    def image_conditioning(self, transformer_config: dict, model_index: dict) -> ImageConditioning | None:
        """Wan 2.1 I2V and FLF2V, Wan 2.2 I2V-A14B: a transformer taking the latents, a 4-channel mask and the VAE
        encoding of the conditioning frames on its channels (in_channels = 2 x out_channels + 4); an `image_dim`
        means CLIP embeddings too (Wan 2.1), a `pos_embed_seq_len` two images (first and last frame: FLF2V). Wan 2.2
        TI2V-5B (`expand_timesteps` in model_index.json) replaces the first latent frame instead ("first-frame")."""
        out_channels = int(transformer_config.get("out_channels") or 16)
        if int(transformer_config.get("in_channels") or out_channels) != 2 * out_channels + 4:
            if model_index.get("expand_timesteps"):  # Wan 2.2 TI2V-5B: text- and image-to-video
                return ImageConditioning("first-frame", ("diffusers", "WanImageToVideoPipeline"), text_to_video=True)
            return None
        frames = ("first", "last") if transformer_config.get("pos_embed_seq_len") else ("first",)
        return ImageConditioning("channel-concat", ("diffusers", "WanImageToVideoPipeline"), frames,
                                 image_encoder=transformer_config.get("image_dim") is not None)

    def latent_channels(self, transformer_config: dict) -> int:
        return int(transformer_config.get("out_channels") or transformer_config.get("in_channels") or 0)

    def encode_image(self, models: dict[str, Any], frames: torch.Tensor, num_frames: int,
                     conditioning: ImageConditioning) -> dict[str, torch.Tensor]:
        """`WanImageToVideoPipeline.prepare_latents` and `encode_image`: the first frame followed by zeros (the last
        frame at the end for FLF2V; TI2V-5B: the first frame alone) through the VAE, stored as its posterior
        (`condition_mean`/`_logvar`; the pipeline takes the mean); where the transformer has `image_dim`, CLIP's
        penultimate hidden states of the frames (`image_embeds` [frames, tokens, width]), from the frames as uint8
        images, as the pipeline's PIL input reaches its image processor."""
        import torch

        vae = models["vae"]
        if conditioning.kind == "first-frame":  # TI2V-5B (expand_timesteps): the image alone through the VAE
            posterior = vae.encode(frames[:, :, :1].to(vae.device, vae.dtype)).latent_dist
            return {"condition_mean": posterior.mean, "condition_logvar": posterior.logvar}
        first, count = frames[:, :, :1], frames.shape[2]
        zeros = first.new_zeros(first.shape[0], first.shape[1], num_frames - count, *first.shape[3:])
        video = torch.cat([first, zeros] + ([frames[:, :, 1:]] if count > 1 else []), dim=2)
        posterior = vae.encode(video.to(vae.device, vae.dtype)).latent_dist
        out = {"condition_mean": posterior.mean, "condition_logvar": posterior.logvar}
        if conditioning.image_encoder:
            processor, encoder = models["image_processor"], models["image_encoder"]
            pixels = ((frames.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # [B, C, N, H, W]
            images = [img.permute(1, 2, 0).cpu().numpy() for sample in pixels for img in sample.unbind(1)]
            inputs = processor(images=images, return_tensors="pt").to(encoder.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(encoder.dtype)
            hidden = encoder(**inputs, output_hidden_states=True).hidden_states[-2]
            out["image_embeds"] = hidden.reshape(frames.shape[0], count, *hidden.shape[1:])
        return out

    # ------------------------------------------------------------------------------------------------ stage 2

    def prepare_image(self, image: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                      generators: list[torch.Generator], conditioning: ImageConditioning,
                      options: TrainOptions | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's `condition` (its mask, then the VAE mean normalised as it normalises latents; TI2V-5B:
        the normalised mean alone, [B, C, 1, H, W]) and the CLIP embeddings as it batches them (a sample's images
        consecutive: [B x images, tokens, width])."""
        import torch

        latent = pipeline_normalised(image["condition_mean"], vae_config)
        if conditioning.kind == "first-frame":
            return {"condition": latent}
        batch, channels, latent_frames, height, width = latent.shape
        temporal = self.compression(vae_config)[0]
        num_frames = (latent_frames - 1) * temporal + 1
        mask = latent.new_ones(batch, 1, num_frames, height, width)
        mask[:, :, 1:num_frames - 1 if "last" in conditioning.frames else num_frames] = 0
        mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(batch, -1, temporal, height, width).transpose(1, 2)
        out = {"condition": torch.cat([mask, latent], dim=1)}
        if "image_embeds" in image:
            out["image_embeds"] = image["image_embeds"].flatten(0, 1)
        return out

    def image_pipeline_arguments(self, pipe: Any, stored: dict[str, torch.Tensor], conditioning: ImageConditioning
                                 ) -> dict[str, Any]:
        """As the base; the stored CLIP embeddings stand in for the pipeline's `encode_image` (it refuses
        `image_embeds` beside `image`, and the VAE condition needs the image), so no image encoder is loaded."""
        out = super().image_pipeline_arguments(pipe, stored, conditioning)
        if "image_embeds" in stored and getattr(pipe, "image_encoder", None) is None:
            embeds = stored["image_embeds"]
            pipe.encode_image = lambda image, device=None: embeds.to(device or pipe._execution_device)
        return out

    def pipeline_settings(self) -> dict[str, Any]:
        """The transformer-call settings of the run's --pretrained (`with_pretrained`), read once."""
        if "_pipeline_settings" not in self.__dict__:
            self._pipeline_settings = read_pipeline_settings(*self.__dict__.get("_pretrained", (None,)))
        return self._pipeline_settings

    def check_shard_extras(self, manifest: Manifest, transformer_config: dict) -> None:
        self.pipeline_settings()  # an unreadable model_index.json is refused before any weight loads
        vae = manifest.encoders.get("vae", {}).get("config", {})
        if "latents_mean" not in vae or "latents_std" not in vae:
            raise UserError("the manifest lacks the VAE config's latents_mean/latents_std: these shards were not "
                            "encoded with a Wan VAE; precompute them again with --model wan.")

    def prepare_latents(self, latents: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                        generators: list[torch.Generator]) -> torch.Tensor:
        import torch

        # WanPipeline's decode: latents / (1 / latents_std) + latents_mean; this is its inverse
        return normalize_latents(sample_posterior(latents, generators), torch.tensor(vae_config["latents_mean"]),
                                 torch.tensor(vae_config["latents_std"]), 1.0)

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flow (velocity) prediction, fed as WanPipeline's (WanImageToVideoPipeline's) denoising loop feeds the
        transformer. TI2V-5B from an image: the first latent frame is the condition, and out of the loss."""
        import torch

        conditioning = step.image_conditioning
        if conditioning is not None and conditioning.kind == "first-frame" and step.noisy.shape[2] > 1:
            return self.predict_first_frame(transformer, step, dtype)
        timestep = step.timesteps.long()
        if self.pipeline_settings()["expand_timesteps"]:
            # Wan 2.2 TI2V-5B: WanPipeline's (mask[0][0][:, ::2, ::2] * t).flatten(), its mask all ones for
            # text-to-video: the sample's timestep for every token, float32
            _, _, frames, height, width = step.noisy.shape
            timestep = timestep.float()[:, None].expand(-1, frames * -(-height // 2) * -(-width // 2))
        hidden, extra = step.noisy, {}
        if conditioning is not None and conditioning.kind == "channel-concat":  # WanImageToVideoPipeline (2.1)
            hidden = torch.cat([step.noisy, step.image["condition"].to(step.noisy.dtype)], dim=1)
            # WanImageToVideoPipeline passes it always: CLIP's embeddings, or None (I2V-A14B has no image encoder)
            embeds = step.image.get("image_embeds")
            extra["encoder_hidden_states_image"] = None if embeds is None else embeds.to(dtype)
        output = transformer(hidden_states=hidden.to(dtype), timestep=timestep,
                             encoder_hidden_states=step.cond["prompt_embeds"].to(dtype), attention_kwargs=None,
                             return_dict=False, **extra)[0]
        return output, None

    def predict_first_frame(self, transformer: Any, step: StepInputs, dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """WanImageToVideoPipeline's loop with `expand_timesteps`: latent_model_input = (1 - first_frame_mask) *
        condition + first_frame_mask * latents (in float32, then the transformer's dtype), timestep =
        (first_frame_mask[0][0][:, ::2, ::2] * t).flatten() per sample; the mask is the loss weights."""
        noisy = step.noisy.float()
        _, _, frames, height, width = noisy.shape
        first_frame_mask = noisy.new_ones(1, 1, frames, height, width)
        first_frame_mask[:, :, 0] = 0
        condition = step.image["condition"].to(noisy)
        hidden = ((1 - first_frame_mask) * condition + first_frame_mask * noisy).to(dtype)
        timestep = first_frame_mask[0][0][:, ::2, ::2].flatten()[None] * step.timesteps.long()[:, None]
        output = transformer(hidden_states=hidden, timestep=timestep,
                             encoder_hidden_states=step.cond["prompt_embeds"].to(dtype),
                             encoder_hidden_states_image=None, attention_kwargs=None, return_dict=False)[0]
        return output, first_frame_mask

    # ------------------------------------------------------------------------------------------------ generation

    def generation_defaults(self, transformer_config: dict, vae_config: dict) -> dict[str, Any]:
        return {"num_frames": 81, "height": 480, "width": 832}  # WanPipeline.__call__'s defaults

    def pipeline_call_kwargs(self, transformer_config: dict) -> dict[str, Any]:
        return {"max_sequence_length": self.default_text_tokens}

    def load_pipeline(self, args: Any, device: Any, conditioning: ImageConditioning | None = None) -> Any:
        """As the base, with the model's `expand_timesteps` (the base builds the pipeline from components only)."""
        pipe = super().load_pipeline(args, device, conditioning)
        pipe.register_to_config(**read_pipeline_settings(args.pretrained, args.revision, args.cache_dir))
        return pipe

    def build_pipeline(self, transformer: Any, vae: Any, scheduler: Any,
                       conditioning: ImageConditioning | None = None) -> Any:
        pipe = super().build_pipeline(transformer, vae, scheduler, conditioning)
        pipe.register_to_config(**self.pipeline_settings())
        return pipe

    # ------------------------------------------------------------------------------------------------ tests

    tiny_variants = {"i2v": "Wan 2.1 I2V", "flf2v": "Wan 2.1 FLF2V (first and last frame)",
                     "ti2v": "Wan 2.2 TI2V-5B's layout (text- and image-to-video)",
                     "a14b": "Wan 2.2 T2V-A14B's two experts (`--expert high|low`)",
                     "a14b-i2v": "Wan 2.2 I2V-A14B's two experts, image-to-video"}

    def tiny_variant(self, variant: str, seed: int = 0) -> tuple[tuple[str, str], dict[str, Any]]:
        if variant == "i2v":
            return ("diffusers", "WanImageToVideoPipeline"), tiny_i2v_components(seed)
        if variant == "flf2v":
            return ("diffusers", "WanImageToVideoPipeline"), tiny_i2v_components(seed, last_frame=True)
        if variant == "ti2v":
            return self.pipeline_class, tiny_ti2v_components(seed)
        if variant == "a14b":
            from .wan_experts import tiny_a14b_components

            return self.pipeline_class, tiny_a14b_components(seed)
        if variant == "a14b-i2v":
            from .wan_experts import tiny_a14b_i2v_components

            return ("diffusers", "WanImageToVideoPipeline"), tiny_a14b_i2v_components(seed)
        return super().tiny_variant(variant, seed)

    def tiny_components(self, seed: int = 0) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from .tiny import t5_tokenizer

        torch.manual_seed(seed)
        tokenizer = t5_tokenizer()
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        # non-trivial latent statistics, so the normalisation is exercised
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[-0.2, -0.1, 0.1, 0.2],
                               latents_std=[0.5, 0.8, 1.2, 1.5])
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
        # Wan2.1-T2V-1.3B's own scheduler config (480p: flow_shift 3)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=3.0)
        return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
                "scheduler": scheduler}


def tiny_ti2v_components(seed: int = 0) -> dict[str, Any]:
    """Wan 2.2 TI2V-5B's layout at toy size: `WanSpec.tiny_components` with a residual VAE that patches 2x2 itself
    (16x spatial compression) and the pipeline's `expand_timesteps`; `WanPipeline(**parts)` builds it."""
    import torch
    from diffusers import AutoencoderKLWan

    parts = WanSpec().tiny_components(seed)
    torch.manual_seed(seed + 1)
    parts["vae"] = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        scale_factor_spatial=16, latents_mean=[-0.2, -0.1, 0.1, 0.2], latents_std=[0.5, 0.8, 1.2, 1.5])
    return {**parts, "expand_timesteps": True}


def tiny_i2v_components(seed: int = 0, last_frame: bool = False) -> dict[str, Any]:
    """Wan 2.1 I2V's layout at toy size (FLF2V's with `last_frame`): `WanSpec.tiny_components` with a transformer
    taking the 4-channel mask and the condition latents on its channels (in_channels 2 x 4 + 4), CLIP image
    embeddings (`image_dim`, `added_kv_proj_dim`; FLF2V: `pos_embed_seq_len` for two images), and a tiny CLIP vision
    encoder with its processor; `WanImageToVideoPipeline(**parts)` builds it."""
    import torch
    from diffusers import WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    parts = WanSpec().tiny_components(seed)
    torch.manual_seed(seed + 2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    parts["transformer"] = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=16,
        added_kv_proj_dim=24, pos_embed_seq_len=2 * tokens if last_frame else None)
    parts["image_encoder"] = CLIPVisionModel(vision)
    parts["image_processor"] = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    return parts

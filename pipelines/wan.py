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
`--pretrained`, and the pipelines ft builds (generation, validation) get it too. Wan 2.2's two-expert A14B
(`boundary_ratio`, `transformer_2`) trains one expert per run: wan_experts.py (`WanExperts`, a mixin of the spec).

Everything Wan-specific lives here: the spec, the real-size configs of Wan2.1-T2V-1.3B and 14B and Wan2.2-TI2V-5B
(`WanSpec.checkpoints`, for `ft estimate`), the aliases, the default bucket, the block list and
LoRA targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError

from .base import CondTensor, ModelSpec, StepInputs, normalize_latents, sample_posterior
from .fingerprint import hub_hint
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
CHECKPOINTS = (
    Checkpoint("Wan2.1-T2V-1.3B", ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan2.1-t2v-1.3b"),
     {"transformer": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}, "vae": {},
      "text_encoder": UMT5_XXL}),
    Checkpoint("Wan2.1-T2V-14B", ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan2.1-t2v-14b"),
     {"transformer": {}, "vae": {}, "text_encoder": UMT5_XXL}),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers: its transformer and VAE configs' structure (the VAE's 48 latents_mean/std
    # values come from the model's own config.json when it trains)
    Checkpoint("Wan2.2-TI2V-5B", ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "wan2.2-ti2v-5b"),
     {"transformer": {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48,
                      "out_channels": 48},
      "vae": {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "patch_size": 2,
              "in_channels": 12, "out_channels": 12, "scale_factor_spatial": 16},
      "text_encoder": UMT5_XXL}),
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
    # finetrainers trains Wan with FlowMatchEulerDiscreteScheduler(); the pipeline samples with the UniPC scheduler
    # its scheduler config names (ModelSpec.pipeline_scheduler)
    scheduler_class = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    # LoRA: the default targets are the self- and cross-attention projections of every block, as finetrainers'
    # "blocks.*(to_q|to_k|to_v|to_out.0)"; in ComfyUI's layout they are Wan-AI's names (ORIGINAL_LAYOUT)
    original_layout = ORIGINAL_LAYOUT
    default_buckets = ["49x480x832"]  # finetrainers' Wan example; the pipeline generates 81x480x832
    default_text_tokens = 512  # WanPipeline.__call__'s max_sequence_length
    block_lists = ("blocks",)
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

    # ------------------------------------------------------------------------------------------------ stage 2

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

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        """The flow (velocity) prediction, fed as WanPipeline's denoising loop feeds the transformer."""
        timestep = step.timesteps.long()
        if self.pipeline_settings()["expand_timesteps"]:
            # Wan 2.2 TI2V-5B: WanPipeline's (mask[0][0][:, ::2, ::2] * t).flatten(), its mask all ones for
            # text-to-video: the sample's timestep for every token, float32
            _, _, frames, height, width = step.noisy.shape
            timestep = timestep.float()[:, None].expand(-1, frames * -(-height // 2) * -(-width // 2))
        output = transformer(hidden_states=step.noisy.to(dtype), timestep=timestep,
                             encoder_hidden_states=step.cond["prompt_embeds"].to(dtype), attention_kwargs=None,
                             return_dict=False)[0]
        return output, None

    # ------------------------------------------------------------------------------------------------ generation

    def generation_defaults(self, transformer_config: dict, vae_config: dict) -> dict[str, Any]:
        return {"num_frames": 81, "height": 480, "width": 832}  # WanPipeline.__call__'s defaults

    def pipeline_call_kwargs(self, transformer_config: dict) -> dict[str, Any]:
        return {"max_sequence_length": self.default_text_tokens}

    def load_pipeline(self, args: Any, device: Any) -> Any:
        """As the base, with the model's `expand_timesteps` (the base builds the pipeline from components only)."""
        pipe = super().load_pipeline(args, device)
        pipe.register_to_config(**read_pipeline_settings(args.pretrained, args.revision, args.cache_dir))
        return pipe

    def build_pipeline(self, transformer: Any, vae: Any, scheduler: Any) -> Any:
        pipe = super().build_pipeline(transformer, vae, scheduler)
        pipe.register_to_config(**self.pipeline_settings())
        return pipe

    # ------------------------------------------------------------------------------------------------ tests

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

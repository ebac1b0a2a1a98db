"""HunyuanVideo 1.5 (HunyuanVideo15Pipeline: Qwen2.5-VL + byT5 + AutoencoderKLHunyuanVideo15 +
HunyuanVideo15Transformer3DModel), text-to-video, trained with flow matching.

What is stored (stage 1), as `HunyuanVideo15Pipeline.encode_prompt` makes it (ft calls the pipeline's own static
encoders, `_get_mllm_prompt_embeds` and `_get_byt5_prompt_embeds`, so a diffusers release that changes them changes
ft's encoding the same way):
- `prompt_embeds` / `prompt_embeds_mask`: the caption in the pipeline's chat template (its system message asking to
  describe the video) through the Qwen2.5-VL text model, `hidden_states[-3]` (the pipeline skips two layers), the
  template's first 108 tokens cropped; `--max-sequence-length` tokens after the crop (1000 by default, the
  pipeline's `tokenizer_max_length`). The transformer packs the valid tokens first and zeroes the padding, so a
  shorter text length changes nothing but the padding (and the shard size: 1000 x 3584 bf16 is 7 MB a sample);
- `prompt_embeds_2` / `prompt_embeds_mask_2`: the glyph encoder (byT5) on the caption's quoted text
  (`extract_glyph_texts`: 'a sign that says "OPEN"'), 256 tokens (the pipeline's `tokenizer_2_max_length`); a
  caption without quotes stores zeros and an all-false mask, as the pipeline feeds them;
- the VAE posterior's `mean` and `logvar` (32 channels, 4x temporal and 16x spatial compression).
The system message, the crop and the hidden layer are the family's encoding choices (`encoding_choices`, read from
the pipeline's signature): they enter every sample key and the manifest.

What is fed (stage 2), as `HunyuanVideo15Pipeline.__call__`'s denoising loop feeds its transformer:
- latents drawn from the stored posterior, times the VAE's `scaling_factor` (the pipeline's decode divides by it);
- the shared flow-matching objective (x_s = (1 - s) x0 + s noise, target noise - x0); the timestep 1000 s in the
  transformer's dtype (the pipeline casts `t` to the latents' dtype);
- `hidden_states`: the noisy latents, then the text-to-video condition channels the pipeline feeds as zeros
  (`prepare_cond_latents_and_mask`: C latent channels and 1 mask channel; in_channels = 2 C + 1);
- `image_embeds`: zeros [B, 729, image_embed_dim] (the pipeline's vision tokens for text-to-video: the transformer
  masks them out when they are all zero), and the four text tensors with their masks in the transformer's dtype.
Generation samples through the pipeline with stored embeddings; its classifier-free guidance lives in the `guider`
component (ClassifierFreeGuidance, 6.0 in the published checkpoints), whose scale `--guidance-scale` replaces.

diffusers 0.42.1 has no LoRA loader for HunyuanVideo15Pipeline (no `load_lora_weights`): the LoRA ft writes loads
through the transformer's own `load_lora_adapter(folder, prefix="transformer")` (diffusers' PeftAdapterMixin), which
`ft generate --lora` uses for a pipeline without a loader.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError

from .base import CondTensor, ModelSpec, StepInputs, import_class, sample_posterior
from .lora_keys import Fused, OriginalLayout, Rename
from .real_configs import Checkpoint

if TYPE_CHECKING:
    import torch

    from ft.common.model_args import ModelArgs

    from .image import ImageConditioning

PIPELINE = ("diffusers", "HunyuanVideo15Pipeline")
VISION_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: the zero image tokens of text-to-video
GLYPH_TOKENS = 256  # HunyuanVideo15Pipeline.tokenizer_2_max_length: byT5's text length
DEFAULT_GUIDANCE_SCALE = 6.0  # the published (non-distilled) checkpoints' guider/config.json

# Qwen2.5-VL-7B-Instruct's text model (its config.json) and google/byt5-small's encoder (Glyph-SDXL-v2's byT5):
# HunyuanVideo 1.5's two text encoders, for `ft estimate`
QWEN25_VL_7B_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                     "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
BYT5_SMALL = {"vocab_size": 384, "d_model": 1472, "d_kv": 64, "d_ff": 3584, "num_layers": 12, "num_heads": 6,
              "feed_forward_proj": "gated-gelu"}
# diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py: TRANSFORMER_CONFIGS are the class defaults but for
# task_type ("t2v") and target_size (640 at 480p, 960 at 720p); the VAE is AutoencoderKLHunyuanVideo15()'s defaults
CHECKPOINTS = tuple(
    Checkpoint(f"HunyuanVideo-1.5 {res} T2V", (f"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{res}_t2v",
                                               f"hunyuanvideo-community/HunyuanVideo-1.5-{res}_t2v",
                                               f"HunyuanVideo-1.5-{res}_t2v"),
               {"transformer": {"task_type": "t2v", "target_size": size}, "vae": {}, "text_encoder": QWEN25_VL_7B_TEXT,
                "text_encoder_2": BYT5_SMALL})
    for res, size in (("480p", 640), ("720p", 960)))

# tencent's module names (diffusers' convert_hyvideo15_transformer_to_diffusers, read backwards): the double-stream
# blocks keep q, k and v apart; the token refiner's q, k and v are one fused projection there
_BLOCK, _REFINER = r"transformer_blocks\.(\d+)\.", r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\."
_REFINER_TO = r"txt_in.individual_token_refiner.blocks.\1."
_BLOCK_RENAMES = {"attn.to_q": "img_attn_q", "attn.to_k": "img_attn_k", "attn.to_v": "img_attn_v",
                  "attn.to_out.0": "img_attn_proj", "attn.add_q_proj": "txt_attn_q", "attn.add_k_proj": "txt_attn_k",
                  "attn.add_v_proj": "txt_attn_v", "attn.to_add_out": "txt_attn_proj",
                  "norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear",
                  "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2", "ff_context.net.0.proj": "txt_mlp.fc1",
                  "ff_context.net.2": "txt_mlp.fc2"}
ORIGINAL_LAYOUT = OriginalLayout(
    "HunyuanVideo 1.5's original (tencent) checkpoint",
    renames=(*(Rename(_BLOCK + part.replace(".", r"\."), r"double_blocks.\1." + original)
               for part, original in _BLOCK_RENAMES.items()),
             Rename(r"x_embedder\.proj", "img_in.proj"),
             Rename("proj_out", "final_layer.linear"),
             Rename(r"context_embedder\.proj_in", "txt_in.input_embedder"),
             Rename(r"context_embedder_2\.linear_(\d)", r"byt5_in.fc\1"),
             Rename(_REFINER + r"attn\.to_out\.0", _REFINER_TO + "self_attn_proj"),
             Rename(_REFINER + r"ff\.net\.0\.proj", _REFINER_TO + "mlp.fc1"),
             Rename(_REFINER + r"ff\.net\.2", _REFINER_TO + "mlp.fc2"),
             Rename(_REFINER + r"norm_out\.linear", _REFINER_TO + "adaLN_modulation.1")),
    fused=(Fused(_REFINER + r"attn\.", ("to_q", "to_k", "to_v"), _REFINER_TO + "self_attn_qkv"),),
    refused={r"norm_out\.linear": "the original final_layer.adaLN_modulation.1 holds its rows in the other order "
                                  "(shift, scale)"},
    read_prefixes=("diffusion_model.", "transformer."))


def mllm_defaults() -> dict[str, Any]:
    """The pipeline's template settings, read from `_get_mllm_prompt_embeds`' signature (diffusers' own values):
    the system message, the template tokens cropped and the hidden layers skipped."""
    from diffusers import HunyuanVideo15Pipeline

    params = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    return {name: params[name].default for name in ("system_message", "crop_start", "num_hidden_layers_to_skip")}


def load_guider(pretrained: str | None, revision: str | None = None, cache_dir: str | None = None) -> Any:
    """The checkpoint's guider (its `guider/` config: ClassifierFreeGuidance and its scale); a bare spec's (unit
    tests) or a folder without one: ClassifierFreeGuidance at the published scale."""
    from diffusers import ClassifierFreeGuidance

    if pretrained:
        try:
            config = ClassifierFreeGuidance.load_config(pretrained, subfolder="guider", revision=revision,
                                                        cache_dir=cache_dir)
        except (OSError, ValueError):
            config = None
        if config is not None:
            return import_class("diffusers", config.get("_class_name", "ClassifierFreeGuidance")).from_config(config)
    return ClassifierFreeGuidance(guidance_scale=DEFAULT_GUIDANCE_SCALE)


class HunyuanVideo15Spec(ModelSpec):
    name = "hunyuan_video_1_5"
    display_name = "HunyuanVideo 1.5"
    aliases = ("hunyuanvideo-1.5", "hunyuan-video-1.5", "hv15", "hunyuanvideo15")
    objective = "flow_matching"
    channel_dim = 1  # latents are [B, C, F, H, W]
    pipeline_class = PIPELINE
    component_classes = {
        "tokenizer": ("transformers", "AutoTokenizer"),
        "text_encoder": ("transformers", "Qwen2_5_VLTextModel"),
        "tokenizer_2": ("transformers", "AutoTokenizer"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "vae": ("diffusers", "AutoencoderKLHunyuanVideo15"),
        "transformer": ("diffusers", "HunyuanVideo15Transformer3DModel"),
    }
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    scheduler_class = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    # the attention projections of the double-stream blocks, image and text streams; not the token refiner's (its
    # blocks have to_q/to_k/to_v/to_out.0 too)
    default_lora_targets = ["transformer_blocks.*(to_q|to_k|to_v|to_out.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"]
    original_layout = ORIGINAL_LAYOUT
    default_buckets = ["121x480x848"]  # the pipeline's default 480p video: 121 frames, 16:9 at target_size 640
    default_text_tokens = 1000  # the pipeline's tokenizer_max_length: Qwen tokens after the template's crop
    conditioning = (CondTensor("prompt_embeds", "text_embed_dim", "text encoder (Qwen2.5-VL)"),
                    CondTensor("prompt_embeds_mask", None, dtype="bool"),
                    CondTensor("prompt_embeds_2", "text_embed_2_dim", "second text encoder (byT5)",
                               length=GLYPH_TOKENS),
                    CondTensor("prompt_embeds_mask_2", None, dtype="bool", length=GLYPH_TOKENS))
    checkpoints = CHECKPOINTS
    block_lists = ("transformer_blocks",)
    default_fps = 24.0  # HunyuanVideo 1.5 makes 121 frames, 5 s at 24 fps

    def check_args(self, args: ModelArgs) -> None:
        super().check_args(args)
        self._pretrained = (args.pretrained, args.revision, args.cache_dir)

    # ------------------------------------------------------------------------------------------------ facts

    def latent_channels(self, transformer_config: dict) -> int:
        """The VAE's latent channels: the transformer's output (its input adds the condition channels and mask)."""
        return int(transformer_config.get("out_channels") or 0)

    def check_bucket(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict) -> str | None:
        frames, height, width = bucket
        temporal, spatial = self.compression(vae_config)
        if (frames - 1) % temporal:
            return f"HunyuanVideo 1.5 takes {temporal}k+1 frames (1, 5, ..., 121), not {frames}"
        p_t = transformer_config.get("patch_size_t", 1) or 1
        if ((frames - 1) // temporal + 1) % p_t:
            return f"this transformer (patch_size_t={p_t}) needs a latent frame count divisible by {p_t}"
        multiple = spatial * (transformer_config.get("patch_size", 1) or 1)
        if height % multiple or width % multiple:
            return f"height and width must be multiples of {multiple}, not {height}x{width}"
        return None

    # ------------------------------------------------------------------------------------------------ stage 1

    def encoding_choices(self, transformer_config: dict) -> dict[str, Any]:
        return {**mllm_defaults(), "glyph_tokens": GLYPH_TOKENS}

    def encode_prompts(self, encoders: dict[str, Any], prompts: list[str], max_sequence_length: int
                       ) -> dict[str, torch.Tensor]:
        """HunyuanVideo15Pipeline.encode_prompt's two encoders, with its template, crop and text lengths."""
        from diffusers import HunyuanVideo15Pipeline

        qwen, byt5 = encoders["text_encoder"], encoders["text_encoder_2"]
        embeds, mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(
            text_encoder=qwen, tokenizer=encoders["tokenizer"], prompt=prompts, device=qwen.device,
            tokenizer_max_length=max_sequence_length, **mllm_defaults())
        embeds_2, mask_2 = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(
            tokenizer=encoders["tokenizer_2"], text_encoder=byt5, prompt=prompts, device=byt5.device,
            tokenizer_max_length=GLYPH_TOKENS)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.bool(), "prompt_embeds_2": embeds_2,
                "prompt_embeds_mask_2": mask_2.bool()}

    def encode_video(self, vae: Any, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's posterior, one clip at a time: AutoencoderKLHunyuanVideo15's mid-block attention builds its
        causal mask for a batch of one (diffusers 0.42.1 fails on two), so encode as its slicing does."""
        import torch

        parts = [super(HunyuanVideo15Spec, self).encode_video(vae, clip) for clip in frames.split(1)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    # ------------------------------------------------------------------------------------------------ stage 2

    def prepare_latents(self, latents: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                        generators: list[torch.Generator]) -> torch.Tensor:
        return sample_posterior(latents, generators) * vae_config.get("scaling_factor", 1.03682)

    def condition_channels(self, step: StepInputs, dtype: torch.dtype) -> torch.Tensor:
        """What the pipeline concatenates after the latents: text-to-video's zero condition latents and mask."""
        import torch

        batch, channels, frames, height, width = step.noisy.shape
        return torch.zeros(batch, channels + 1, frames, height, width, dtype=dtype, device=step.noisy.device)

    def image_embeds(self, step: StepInputs, transformer_config: dict, dtype: torch.dtype) -> torch.Tensor:
        """The image encoder's tokens the transformer takes: zeros for text-to-video (the pipeline's)."""
        import torch

        return torch.zeros(step.noisy.shape[0], VISION_TOKENS, int(transformer_config["image_embed_dim"]),
                           dtype=dtype, device=step.noisy.device)

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        """The flow (velocity) prediction, fed as HunyuanVideo15Pipeline's denoising loop feeds the transformer."""
        import torch

        hidden = torch.cat([step.noisy.to(dtype), self.condition_channels(step, dtype)], dim=1)
        cond = step.cond
        output = transformer(
            hidden_states=hidden, image_embeds=self.image_embeds(step, dict(transformer.config), dtype),
            timestep=step.timesteps.to(hidden.device, dtype), attention_kwargs=None, return_dict=False,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=cond["prompt_embeds_mask"].to(dtype),
            encoder_hidden_states_2=cond["prompt_embeds_2"].to(dtype),
            encoder_attention_mask_2=cond["prompt_embeds_mask_2"].to(dtype))[0]
        return output, None

    # ------------------------------------------------------------------------------------------------ generation

    def generation_defaults(self, transformer_config: dict, vae_config: dict) -> dict[str, Any]:
        """HunyuanVideo15Pipeline.__call__'s: 121 frames, 16:9 at the transformer's target_size (480x848 at 480p).
        Without configs (a help text), the frame count alone: nothing is imported."""
        if not transformer_config and not vae_config:
            return {"num_frames": 121, "height": 480, "width": 848}
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        processor = HunyuanVideo15ImageProcessor(vae_scale_factor=self.compression(vae_config)[1])
        height, width = processor.calculate_default_height_width(9, 16, transformer_config.get("target_size", 640))
        return {"num_frames": 121, "height": int(height), "width": int(width)}

    def guider(self) -> Any:
        return load_guider(*getattr(self, "_pretrained", (None,)))

    def load_pipeline(self, args: ModelArgs, device: str | torch.device,
                      conditioning: ImageConditioning | None = None) -> Any:
        """As the base, with the checkpoint's guider (a pipeline component that is not a model)."""
        parts = {name: self.load_component(name, args, device) for name in self.component_classes}
        parts["scheduler"] = self.pipeline_scheduler(args)
        parts["guider"] = load_guider(args.pretrained, args.revision, args.cache_dir)
        return import_class(*(conditioning.pipeline_class if conditioning else self.pipeline_class))(**parts)

    def build_pipeline(self, transformer: Any, vae: Any, scheduler: Any,
                       conditioning: ImageConditioning | None = None) -> Any:
        parts = dict.fromkeys(self.text_components)
        cls = conditioning.pipeline_class if conditioning else self.pipeline_class
        if conditioning is not None:
            raise UserError("HunyuanVideo 1.5 image-to-video is not trained by ft yet; use --mode t2v.")
        return import_class(*cls)(transformer=transformer, vae=vae, scheduler=scheduler, guider=self.guider(),
                                  **parts)

    # ------------------------------------------------------------------------------------------------ tests

    def tiny_components(self, seed: int = 0) -> dict[str, Any]:
        import torch
        from diffusers import (
            AutoencoderKLHunyuanVideo15,
            ClassifierFreeGuidance,
            FlowMatchEulerDiscreteScheduler,
            HunyuanVideo15Transformer3DModel,
        )
        from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

        from .tiny import qwen_tokenizer

        torch.manual_seed(seed)
        tokenizer = qwen_tokenizer([mllm_defaults()["system_message"]])
        # positions for the template's crop plus the pipeline's 1000 caption tokens
        text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")))
        tokenizer_2 = ByT5Tokenizer()  # byte-level: no vocabulary file, as byT5's
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
                                          spatial_compression_ratio=16, temporal_compression_ratio=4)
        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
            text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=32, task_type="t2v")
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)  # the 480p checkpoints' sampling shift
        guider = ClassifierFreeGuidance(guidance_scale=DEFAULT_GUIDANCE_SCALE)
        return {"tokenizer": tokenizer, "text_encoder": text_encoder, "tokenizer_2": tokenizer_2,
                "text_encoder_2": text_encoder_2, "vae": vae, "transformer": transformer, "scheduler": scheduler,
                "guider": guider}

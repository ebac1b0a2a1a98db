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

Image-to-video (HunyuanVideo15ImageToVideoPipeline: the `_i2v` checkpoints, transformer `task_type` "i2v", and
SigLIP as `image_encoder` with its `feature_extractor`), `ImageConditioning("channel-concat", image_encoder=True)`:
- stored (stage 1), as the pipeline computes them from its image (the clip's first frame at the bucket's size):
  `image_latents`, the first frame ALONE through the VAE (`_get_image_latents`: the posterior's mode, the mean),
  one clip at a time as `encode_video`; `image_embeds`, SigLIP's last hidden state of the frame as a uint8 image
  through the feature extractor (`_get_image_embeds`);
- fed (stage 2), as its denoising loop feeds the transformer: the condition channels are the image latents times
  the VAE's scaling_factor on the first latent frame and zeros after it, then a mask of ones on the first latent
  frame (`prepare_cond_latents_and_mask`); `image_embeds` SigLIP's tokens in place of the zeros; `timestep_r` None
  (a `use_meanflow` transformer, the step-distilled checkpoints, is refused: ft trains no mean flow);
- generation: the pipeline sizes its video from the image (`calculate_default_height_width` of its aspect at the
  transformer's `target_size`) and takes no height or width (`image_generation_size`); validation hands it the
  stored SigLIP embeddings in place of an image encoder (`image_pipeline_arguments`).

diffusers 0.42.1 has no LoRA loader for HunyuanVideo15Pipeline (no `load_lora_weights`): the LoRA ft writes loads
through the transformer's own `load_lora_adapter(folder, prefix="transformer")` (diffusers' PeftAdapterMixin), which
`ft generate --lora` uses for a pipeline without a loader.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError

from .base import CondTensor, ModelSpec, StepInputs, TrainOptions, sample_posterior
from .image import ImageConditioning
from .loading import import_class
from .lora_keys import Fused, OriginalLayout, Rename
from .real_configs import Checkpoint

if TYPE_CHECKING:
    import torch

    from ft.common.model_args import ModelArgs
    from ft.common.shards import Manifest

PIPELINE = ("diffusers", "HunyuanVideo15Pipeline")
I2V_PIPELINE = ("diffusers", "HunyuanVideo15ImageToVideoPipeline")
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
# the image-to-video checkpoints' image encoder: google/siglip-so400m-patch14-384's vision tower (729 tokens of 1152,
# the transformer's image_embed_dim), as the pipeline's SiglipVisionModel
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "image_size": 384, "patch_size": 14}
CHECKPOINTS = tuple(
    Checkpoint(f"HunyuanVideo-1.5 {res} {task.upper()}",
               (f"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{res}_{task}",
                f"hunyuanvideo-community/HunyuanVideo-1.5-{res}_{task}", f"HunyuanVideo-1.5-{res}_{task}"),
               {"transformer": {"task_type": task, "target_size": size}, "vae": {}, "text_encoder": QWEN25_VL_7B_TEXT,
                "text_encoder_2": BYT5_SMALL, **({"image_encoder": SIGLIP_SO400M} if task == "i2v" else {})},
               image_to_video=task == "i2v")
    for task in ("t2v", "i2v") for res, size in (("480p", 640), ("720p", 960)))

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
    # image-to-video: SigLIP's vision tower and its processor, under the pipeline's component names
    image_component_classes = {"image_encoder": ("transformers", "SiglipVisionModel"),
                               "feature_extractor": ("transformers", "SiglipImageProcessor")}
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

    def image_conditioning(self, transformer_config: dict, model_index: dict) -> ImageConditioning | None:
        """The `_i2v` checkpoints: model_index.json names HunyuanVideo15ImageToVideoPipeline, or (a folder without
        one) the transformer's `task_type` is "i2v". They take the image's VAE latents and mask on the channels and
        SigLIP's embeddings; they do not sample without an image."""
        pipeline = model_index.get("_class_name")
        if pipeline in (PIPELINE[1], I2V_PIPELINE[1]):
            image_to_video = pipeline == I2V_PIPELINE[1]
        else:
            image_to_video = transformer_config.get("task_type") == "i2v"
        return ImageConditioning("channel-concat", I2V_PIPELINE, image_encoder=True) if image_to_video else None

    def encode_image(self, models: dict[str, Any], frames: torch.Tensor, num_frames: int,
                     conditioning: ImageConditioning, captions: list[str] | None = None,
                     max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """`HunyuanVideo15ImageToVideoPipeline._get_image_latents` and `_get_image_embeds` on the first frame: its VAE
        posterior's mode (the mean, before the pipeline's scaling; one clip at a time, as `encode_video`) and SigLIP's
        last hidden state of it as a uint8 image, as the pipeline's PIL image reaches its feature extractor."""
        import torch
        from PIL import Image

        vae, encoder = models["vae"], models["image_encoder"]
        first = frames[:, :, :1]
        means = [vae.encode(clip.to(vae.device, vae.dtype)).latent_dist.mode() for clip in first.split(1)]
        pixels = ((first[:, :, 0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # [B, C, H, W]
        images = [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
        inputs = models["feature_extractor"].preprocess(images=images, do_resize=True, return_tensors="pt",
                                                        do_convert_rgb=True)
        inputs = inputs.to(device=encoder.device, dtype=next(encoder.parameters()).dtype)
        return {"image_latents": torch.cat(means), "image_embeds": encoder(**inputs).last_hidden_state}

    # ------------------------------------------------------------------------------------------------ stage 2

    def prepare_image(self, image: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                      generators: list[torch.Generator], conditioning: ImageConditioning,
                      options: TrainOptions | None = None) -> dict[str, torch.Tensor]:
        """The image latents times the VAE's scaling_factor, as `_get_image_latents` scales them (in the stored
        dtype, the VAE's); SigLIP's embeddings as stored. `condition_channels` puts the latents on the first latent
        frame."""
        return {"image_latents": image["image_latents"] * vae_config.get("scaling_factor", 1.03682),
                "image_embeds": image["image_embeds"]}

    def check_shard_extras(self, manifest: Manifest, transformer_config: dict) -> None:
        if manifest.encoding.get("image") and transformer_config.get("use_meanflow"):
            raise UserError("this transformer has use_meanflow (a step-distilled HunyuanVideo 1.5 checkpoint, fed the "
                            "next step's timestep as timestep_r): ft trains flow matching, not mean flow; pass the "
                            "non-distilled _i2v checkpoint as --pretrained.")

    def prepare_latents(self, latents: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                        generators: list[torch.Generator]) -> torch.Tensor:
        return sample_posterior(latents, generators) * vae_config.get("scaling_factor", 1.03682)

    def condition_channels(self, step: StepInputs, dtype: torch.dtype) -> torch.Tensor:
        """What the pipeline concatenates after the latents (`prepare_cond_latents_and_mask`): the condition latents
        and the mask, zeros for text-to-video; from an image, its scaled latents on the first latent frame (zeros
        after it) and a mask of ones there."""
        import torch

        batch, channels, frames, height, width = step.noisy.shape
        out = torch.zeros(batch, channels + 1, frames, height, width, dtype=dtype, device=step.noisy.device)
        if step.image_conditioning is not None:
            out[:, :channels, :1] = step.image["image_latents"].to(out.device, dtype)
            out[:, channels, 0] = 1.0
        return out

    def image_embeds(self, step: StepInputs, transformer_config: dict, dtype: torch.dtype) -> torch.Tensor:
        """The image encoder's tokens the transformer takes: SigLIP's from an image, zeros for text-to-video (the
        pipeline's)."""
        import torch

        if step.image_conditioning is not None:
            return step.image["image_embeds"].to(step.noisy.device, dtype)
        return torch.zeros(step.noisy.shape[0], VISION_TOKENS, int(transformer_config["image_embed_dim"]),
                           dtype=dtype, device=step.noisy.device)

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        """The flow (velocity) prediction, fed as HunyuanVideo15Pipeline's denoising loop feeds the transformer."""
        import torch

        hidden = torch.cat([step.noisy.to(dtype), self.condition_channels(step, dtype)], dim=1)
        cond = step.cond
        # the image-to-video pipeline passes timestep_r (None but for a mean-flow transformer, which training refuses)
        extra = {} if step.image_conditioning is None else {"timestep_r": None}
        output = transformer(**extra,
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

    def image_generation_size(self, image_size: tuple[int, int], transformer_config: dict, vae_config: dict
                              ) -> tuple[int, int] | None:
        """HunyuanVideo15ImageToVideoPipeline takes no height or width: it crops the image to the size of its
        aspect at the transformer's target_size (`calculate_default_height_width`), and that is the video's."""
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        processor = HunyuanVideo15ImageProcessor(vae_scale_factor=self.compression(vae_config)[1])
        width, height = image_size
        height, width = processor.calculate_default_height_width(height, width,
                                                                 transformer_config.get("target_size", 640))
        return int(height), int(width)

    def image_pipeline_arguments(self, pipe: Any, stored: dict[str, torch.Tensor], conditioning: ImageConditioning
                                 ) -> dict[str, Any]:
        """As the base (the row's image); the stored SigLIP embeddings stand in for the pipeline's `encode_image`
        (the validation pipeline has no image encoder), repeated to its batch and cast as it casts them."""
        out = super().image_pipeline_arguments(pipe, stored, conditioning)
        if getattr(pipe, "image_encoder", None) is None:
            embeds = stored["image_embeds"]
            pipe.encode_image = lambda image, batch_size, device, dtype: embeds[None].repeat(batch_size, 1, 1).to(
                device=device, dtype=dtype)
        return out

    def guider(self) -> Any:
        return load_guider(*getattr(self, "_pretrained", (None,)))

    def load_pipeline(self, args: ModelArgs, device: str | torch.device,
                      conditioning: ImageConditioning | None = None) -> Any:
        """As the base, with the checkpoint's guider (a pipeline component that is not a model)."""
        parts = {name: self.load_component(name, args, device) for name in self.component_classes}
        parts |= self.load_image_encoders(args, device, conditioning)
        parts["scheduler"] = self.pipeline_scheduler(args)
        parts["guider"] = load_guider(args.pretrained, args.revision, args.cache_dir)
        return import_class(*(conditioning.pipeline_class if conditioning else self.pipeline_class))(**parts)

    def build_pipeline(self, transformer: Any, vae: Any, scheduler: Any,
                       conditioning: ImageConditioning | None = None) -> Any:
        """As the base, with the guider; image-to-video with no image encoder (`image_pipeline_arguments`)."""
        parts = dict.fromkeys(self.text_components)
        cls = conditioning.pipeline_class if conditioning else self.pipeline_class
        if conditioning is not None:
            parts |= dict.fromkeys(self.image_component_classes)
        return import_class(*cls)(transformer=transformer, vae=vae, scheduler=scheduler, guider=self.guider(),
                                  **parts)

    # ------------------------------------------------------------------------------------------------ tests

    tiny_variants = {"i2v": "HunyuanVideo 1.5 I2V (SigLIP image embeddings, the image's latents on the channels)"}

    def tiny_variant(self, variant: str, seed: int = 0) -> tuple[tuple[str, str], dict[str, Any]]:
        if variant == "i2v":
            return I2V_PIPELINE, tiny_i2v_components(seed)
        return super().tiny_variant(variant, seed)

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


def tiny_i2v_components(seed: int = 0) -> dict[str, Any]:
    """HunyuanVideo 1.5 I2V at toy size: `tiny_components` with the transformer's task_type "i2v" and a tiny SigLIP
    vision tower (its width the transformer's image_embed_dim) with its processor; HunyuanVideo15ImageToVideoPipeline
    builds it."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    parts = HunyuanVideo15Spec().tiny_components(seed)
    torch.manual_seed(seed + 1)
    config = {**parts["transformer"].config}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    parts["transformer"] = HunyuanVideo15Transformer3DModel(**{**config, "task_type": "i2v"})
    parts["image_encoder"] = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=config["image_embed_dim"], intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8))
    parts["feature_extractor"] = SiglipImageProcessor(size={"height": 32, "width": 32})
    return parts

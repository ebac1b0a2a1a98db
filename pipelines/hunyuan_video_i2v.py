"""HunyuanVideo-I2V: HunyuanVideoImageToVideoPipeline's checkpoints (hunyuanvideo-community/HunyuanVideo-I2V, whose
transformer config says image_condition_type "token_replace", and HunyuanVideo-I2V-33ch, "latent_concat").

`--model hunyuan_video` with such a `--pretrained` gets `HunyuanVideoI2VSpec` (`HunyuanVideoSpec.for_checkpoint`):
the T2V spec with a Llava text encoder (LlavaForConditionalGeneration) and its CLIPImageProcessor. Everything the
T2V spec does the same way (the VAE posterior, CLIP's pooled embeddings, the transformer call, the buckets, the LoRA
targets and layout) is inherited or shared (`clip_pooled_embeds`, `call_transformer`).

What differs is that the Llava encodes the prompt TOGETHER with the image: the template (the pipeline's
DEFAULT_PROMPT_TEMPLATE) holds an `<image>` token that becomes the vision tower's 576 image tokens, and the prompt
embeddings are the image's tokens (every `image_embed_interleave`-th: 4 for token_replace, 2 for latent_concat)
followed by the caption's (the template cropped, as the pipeline crops it). So in stage 1:
- the text half (`cond`) holds only CLIP's `pooled_prompt_embeds` (text-only);
- the image half (`image`, `encode_image`, given the captions: `ImageConditioning.caption`) holds the Llava
  `prompt_embeds` and `prompt_attention_mask` of the conditioning frame with the caption, and `image_latents`, the
  VAE posterior mean of that frame alone (the pipeline takes the mode: `retrieve_latents(..., "argmax")`);
  its key holds the text half's key.
Caption dropout is refused: the empty caption's embeddings depend on each sample's image, and the set stores one
empty caption (text-only).

In stage 2 (`prepare_image`, `predict`), as the pipeline's denoising loop feeds the transformer:
- token_replace: the first latent frame of the noisy latents replaced by the image latents (scaled by the VAE's
  scaling_factor); the transformer itself gives those tokens timestep 0 (its token_replace embedding); the loss is
  over the other frames, the ones the pipeline's scheduler steps;
- latent_concat: the noisy latents, the image latents on the first frame and zeros after, and a mask (1 on the
  first frame) concatenated on the channels (in_channels = 2 x 16 + 1); the loss is over every frame.
The embedded guidance goes in where the transformer has a guidance embedder (HunyuanVideo-I2V; not -33ch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError

from .base import CondTensor, ModelSpec, StepInputs
from .hunyuan_video import (
    CLIP_L_TEXT,
    CLIP_MAX_LENGTH,
    HIDDEN_STATES_INDEX,
    I2V_PIPELINE,
    IMAGE_CONDITION_KINDS,
    LLAVA_LLAMA3_8B_TEXT,
    HunyuanVideoSpec,
    call_transformer,
    clip_pooled_embeds,
)
from .image import ImageConditioning
from .real_configs import Checkpoint

# llava-llama-3-8b (xtuner's, the published HunyuanVideo-I2V text encoder): the Llama-3 8B text model and CLIP
# ViT-L/14-336's vision tower with its projector, as transformers' LlavaConfig takes them
LLAVA_LLAMA3_8B = {"text_config": {"model_type": "llama", **LLAVA_LLAMA3_8B_TEXT},
                   "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                                     "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                                     "patch_size": 14, "projection_dim": 768},
                   "projector_hidden_act": "gelu", "vision_feature_layer": -2}
# the published transformers (hunyuanvideo-community/HunyuanVideo-I2V and -33ch): HunyuanVideo's, with the image
# condition type (and the 33-channel input of latent_concat: latents, image latents, mask)
CHECKPOINTS = tuple(
    Checkpoint(name, (f"hunyuanvideo-community/{name}", name.lower()),
               {"transformer": {"image_condition_type": kind, **extra}, "vae": {}, "text_encoder": LLAVA_LLAMA3_8B,
                "text_encoder_2": CLIP_L_TEXT}, image_to_video=True)
    for name, kind, extra in (("HunyuanVideo-I2V", "token_replace", {}),
                              ("HunyuanVideo-I2V-33ch", "latent_concat", {"in_channels": 33})))

if TYPE_CHECKING:
    import torch

    from ft.common.model_args import ModelArgs

# the pipeline's image_embed_interleave for each image_condition_type (its encode_prompt's default, which the
# negative prompt gets, is 2)
IMAGE_EMBED_INTERLEAVE = {"latent_concat": 2, "token_replace": 4}
CONDITION_TYPES = {kind: name for name, kind in IMAGE_CONDITION_KINDS.items()}  # ImageConditioning.kind -> type
ASSISTANT_HEADER_TOKENS = 4  # the tokens the pipeline cuts before the assistant's turn


def i2v_prompt_template() -> dict[str, Any]:
    """HunyuanVideoImageToVideoPipeline's template, crop and image-token positions, read from diffusers."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    return dict(DEFAULT_PROMPT_TEMPLATE)


def llava_prompt_embeds(encoders: dict[str, Any], image: Any, prompt: str, max_sequence_length: int,
                        interleave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_get_llama_prompt_embeds` of HunyuanVideoImageToVideoPipeline for one prompt and its image: ([1, tokens,
    width] embeddings, [1, tokens] mask), the image's tokens first."""
    import torch
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
        _expand_input_ids_with_image_tokens,
    )

    template = i2v_prompt_template()
    tokenizer, llava, processor = encoders["tokenizer"], encoders["text_encoder"], encoders["image_processor"]
    device = llava.device
    crop = template["crop_start"]
    emb_len, emb_start, emb_end = template["image_emb_len"], template["image_emb_start"], template["image_emb_end"]
    length = max_sequence_length + crop
    tokens = tokenizer([template["template"].format(prompt)], max_length=length, padding="max_length",
                       truncation=True, return_tensors="pt", return_length=False, return_overflowing_tokens=False,
                       return_attention_mask=True)
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    pixels = processor(image, return_tensors="pt").pixel_values.to(device)
    expanded = _expand_input_ids_with_image_tokens(ids, mask, length, llava.config.image_token_index, emb_len,
                                                   emb_start, emb_end, llava.config.pad_token_id)
    hidden = llava(**expanded, pixel_values=pixels, output_hidden_states=True).hidden_states[HIDDEN_STATES_INDEX]
    hidden = hidden.to(dtype=llava.dtype)
    # the text after the template's crop, less the 4 tokens before the assistant's turn (its header found by the
    # last <|end_header_id|>; the end of the text where truncation cut it off)
    headers = torch.where(ids[0] == tokenizer.convert_tokens_to_ids("<|end_header_id|>"))[0]
    assistant = int(headers[-1]) + 1 if len(headers) != 2 else ids.shape[-1]
    text = torch.cat([hidden[0, crop - 1 + emb_len : assistant - 1 + emb_len - ASSISTANT_HEADER_TOKENS],
                      hidden[0, assistant - 1 + emb_len :]])
    text_mask = torch.cat([mask[0, crop : assistant - ASSISTANT_HEADER_TOKENS], mask[0, assistant:]])
    image_embeds = hidden[0, emb_start:emb_end]
    image_mask = torch.ones(image_embeds.shape[0]).to(hidden.device).to(mask.dtype)
    if 0 < interleave < 6:
        image_embeds, image_mask = image_embeds[::interleave], image_mask[::interleave]
    return torch.cat([image_embeds, text])[None], torch.cat([image_mask, text_mask])[None]


def frames_as_images(frames: torch.Tensor) -> list[Any]:
    """[B, C, H, W] in [-1, 1] -> uint8 [H, W, C] arrays: the images a PIL input of the pipeline would be."""
    import torch

    pixels = ((frames.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [img.permute(1, 2, 0).cpu().numpy() for img in pixels]


class HunyuanVideoI2VSpec(HunyuanVideoSpec):
    display_name = "HunyuanVideo-I2V"
    # the token-replace blocks treat the first frame's tokens (the first of the sequence) apart: a split sequence
    # would hand them to one rank only; no plan yet
    context_parallel = None
    pipeline_class = I2V_PIPELINE
    checkpoints = CHECKPOINTS
    component_classes = {**HunyuanVideoSpec.component_classes,
                         "text_encoder": ("transformers", "LlavaForConditionalGeneration")}
    # the Llava's image processor (its vision tower is inside the text encoder)
    image_component_classes = {"image_processor": ("transformers", "CLIPImageProcessor")}
    # the text half: CLIP's pooled embeddings; the Llava's embeddings read the image, so they are the image half's
    conditioning = (CondTensor("pooled_prompt_embeds", "pooled_projection_dim", "second text encoder (CLIP)",
                               per_token=False),)

    def check_args(self, args: ModelArgs) -> None:
        super().check_args(args)
        if getattr(args, "caption_dropout_p", 0.0):
            raise UserError("--caption-dropout-p: HunyuanVideo-I2V's text encoder (a Llava) reads the prompt together "
                            "with the image, so the empty caption's conditioning is another one for every sample "
                            "and the shard set stores none; leave it at 0.")

    def for_checkpoint(self, args: ModelArgs) -> ModelSpec:
        return self

    def latent_channels(self, transformer_config: dict) -> int:
        return int(transformer_config.get("out_channels") or transformer_config.get("in_channels") or 0)

    def check_bucket(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict) -> str | None:
        if bucket[0] == 1 and transformer_config.get("image_condition_type") == "token_replace":
            return ("HunyuanVideo-I2V replaces the first latent frame with the image's, so a 1-frame sample leaves "
                    "no frame to learn")
        return super().check_bucket(bucket, vae_config, transformer_config)

    # ------------------------------------------------------------------------------------------------ stage 1

    def encoding_choices(self, transformer_config: dict) -> dict[str, Any]:
        template = i2v_prompt_template()
        return {"prompt_template": template["template"], "crop_start": template["crop_start"],
                "image_tokens": [template["image_emb_start"], template["image_emb_end"]],
                "image_embed_interleave": self.interleave(transformer_config),
                "hidden_states_index": HIDDEN_STATES_INDEX, "clip_max_length": CLIP_MAX_LENGTH}

    @staticmethod
    def interleave(transformer_config: dict) -> int:
        return IMAGE_EMBED_INTERLEAVE.get(transformer_config.get("image_condition_type"), 1)

    def encode_prompts(self, encoders: dict[str, Any], prompts: list[str], max_sequence_length: int
                       ) -> dict[str, torch.Tensor]:
        """The text-only half: CLIP's pooled embeddings (the Llava's are `encode_image`'s)."""
        return {"pooled_prompt_embeds": clip_pooled_embeds(encoders, prompts)}

    def image_prompt_embeds(self, encoders: dict[str, Any], images: list[Any], prompts: list[str],
                            max_sequence_length: int, conditioning: ImageConditioning, negative: bool = False
                            ) -> dict[str, torch.Tensor]:
        """The Llava's `prompt_embeds` and bool `prompt_attention_mask` of each image with its prompt, one at a
        time as the pipeline encodes its one prompt (its crop assumes that), the interleave of the transformer. The
        pipeline encodes a negative prompt on a black image, with `encode_prompt`'s default interleave (2)."""
        import torch
        from PIL import Image

        interleave = self.interleave({"image_condition_type": CONDITION_TYPES[conditioning.kind]})
        if negative:
            interleave = IMAGE_EMBED_INTERLEAVE["latent_concat"]
            images = [Image.new("RGB", getattr(image, "size", (32, 32)), 0) for image in images]
        pairs = [llava_prompt_embeds(encoders, image, prompt, max_sequence_length, interleave)
                 for image, prompt in zip(images, prompts, strict=True)]
        return {"prompt_embeds": torch.cat([e for e, _ in pairs]),
                "prompt_attention_mask": torch.cat([m for _, m in pairs]).bool()}

    def encode_image(self, models: dict[str, Any], frames: torch.Tensor, num_frames: int,
                     conditioning: ImageConditioning, captions: list[str] | None = None,
                     max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """`prepare_latents` and `encode_prompt` of the pipeline on the first frame: the VAE posterior's mean of the
        frame alone (`image_latents`, unscaled), and the Llava embeddings of the frame with the caption."""
        assert captions is not None and max_sequence_length is not None, "HunyuanVideo-I2V encodes the captions too"
        vae = models["vae"]
        first = frames[:, :, :1]
        latents = vae.encode(first.to(vae.device, vae.dtype)).latent_dist.mode()
        return {"image_latents": latents,
                **self.image_prompt_embeds(models, frames_as_images(first[:, :, 0]), captions, max_sequence_length,
                                           conditioning)}

    # ------------------------------------------------------------------------------------------------ stage 2

    def prepare_image(self, image: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                      generators: list[torch.Generator], conditioning: ImageConditioning,
                      options: Any = None) -> dict[str, torch.Tensor]:
        """The image latents as the pipeline scales them (float32, times scaling_factor), and the embeddings."""
        return {**image, "image_latents": image["image_latents"].float() * vae_config.get("scaling_factor", 0.476986)}

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """The flow prediction, fed as HunyuanVideoImageToVideoPipeline's denoising loop feeds the transformer; the
        weights leave out the first frame where the image replaces it (token_replace)."""
        import torch

        image = step.image["image_latents"].to(step.noisy.dtype)
        text = {**step.cond, "prompt_embeds": step.image["prompt_embeds"],
                "prompt_attention_mask": step.image["prompt_attention_mask"]}
        batch, _, frames, height, width = step.noisy.shape
        weights = None
        if step.image_conditioning is not None and step.image_conditioning.kind == "channel-concat":
            padded = torch.cat([image, image.new_zeros(batch, image.shape[1], frames - 1, height, width)], dim=2)
            mask = image.new_zeros(batch, 1, frames, height, width)
            mask[:, :, 0] = 1
            hidden = torch.cat([step.noisy, padded, mask], dim=1)
        else:  # token_replace
            hidden = torch.cat([image, step.noisy[:, :, 1:]], dim=2)
            weights = step.noisy.new_ones(1, 1, frames, 1, 1)
            weights[:, :, 0] = 0
        guidance = bool(getattr(getattr(transformer, "config", None), "guidance_embeds", True))
        return call_transformer(transformer, hidden, step, text, dtype, guidance), weights

    # ------------------------------------------------------------------------------------------------ generation

    def build_pipeline(self, transformer: Any, vae: Any, scheduler: Any,
                       conditioning: ImageConditioning | None = None) -> Any:
        from diffusers import HunyuanVideoImageToVideoPipeline

        parts = dict.fromkeys((*self.text_components, *self.image_component_classes))
        return HunyuanVideoImageToVideoPipeline(transformer=transformer, vae=vae, scheduler=scheduler, **parts)


def llava_tokenizer() -> Any:
    """The toy Llama tokenizer (pipelines/tiny.py) that knows the I2V template and its `<image>` token, and puts
    it where the pipeline's template says it is (token 5, after a BOS, the system header and "\\n\\n", as
    Llama-3's tokenizer does); with 405 pieces the template's text before the caption is 103 tokens, the
    pipeline's crop, as with Llama-3's, so the crop keeps the caption whole."""
    from .tiny import llama_tokenizer

    return llama_tokenizer([i2v_prompt_template()["template"]], extra_special=("<image>",), bos=True,
                           words=("system",), vocab_size=405)


def tiny_i2v_components(seed: int, condition_type: str) -> dict[str, Any]:
    """HunyuanVideo-I2V at toy size (`image_condition_type` "token_replace", or "latent_concat" for -33ch): the
    T2V toy's VAE, CLIP and scheduler, a tiny Llava (a 2-layer Llama, a CLIP vision tower making the template's 576
    image tokens from a 24x24 image) with its image processor, and the transformer taking the image;
    `HunyuanVideoImageToVideoPipeline(**parts)` builds it."""
    import torch
    from diffusers import HunyuanVideoTransformer3DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    parts = HunyuanVideoSpec().tiny_components(seed)
    torch.manual_seed(seed + 2)
    tokenizer = llava_tokenizer()
    side = int(i2v_prompt_template()["image_emb_len"] ** 0.5)  # 24 x 24 patches of 1 pixel
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_attention_heads=4,
                       num_key_value_heads=4, num_hidden_layers=2, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=side, patch_size=1, projection_dim=8)
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id))
    concat = condition_type == "latent_concat"
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=2 * 4 + 1 if concat else 4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        guidance_embeds=not concat, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
        image_condition_type=condition_type)
    processor = CLIPImageProcessor(crop_size=side, size={"shortest_edge": side})
    return {**parts, "tokenizer": tokenizer, "text_encoder": llava, "transformer": transformer,
            "image_processor": processor}

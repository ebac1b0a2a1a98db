"""HunyuanVideo (and the finetunes diffusers loads as HunyuanVideo, such as SkyReels-V1-Hunyuan-T2V).

Stage 1 encodes as `HunyuanVideoPipeline.encode_prompt` does:
- the caption is put into the pipeline's prompt template (DEFAULT_PROMPT_TEMPLATE, a Llama-3 chat header asking to
  describe the video), run through the Llama encoder, and `hidden_states[-3]` is kept (the pipeline skips the last
  two layers); the template's first `crop_start` (95) tokens are cropped from the embeddings and the attention
  mask, leaving `--max-sequence-length` tokens (256 by default) as `prompt_embeds` and `prompt_attention_mask`;
- the caption alone goes through the CLIP text model (77 tokens) and its pooled output is `pooled_prompt_embeds`;
- the VAE's posterior mean and log-variance are stored; a latent is drawn from them in stage 2.
The template, crop, hidden layer and CLIP length are the family's encoding choices (`encoding_choices`): they
enter every sample key and the manifest, so a diffusers release with another template never reuses old samples.
The template is the pipeline's, not a setting: `ft generate` and validation sample through the same pipeline.

Stage 2 feeds the transformer as the pipeline's denoising loop does: latents [B, C, F, H, W] times the VAE's
scaling factor, flow-matching noise (the shared objective), the timestep 1000 * sigma as a float,
`encoder_attention_mask`, `pooled_projections`, and `guidance` = `--guidance-scale` * 1000 for the
guidance-distilled transformer (1.0 by default, as finetrainers and musubi-tuner train; the pipeline generates
with 6.0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError

from .base import CondTensor, ModelSpec, StepInputs, sample_posterior
from .image import ImageConditioning, read_model_index
from .lora_keys import Fused, OriginalLayout, Rename
from .real_configs import Checkpoint

if TYPE_CHECKING:
    import torch

    from ft.common.model_args import ModelArgs

HIDDEN_STATES_INDEX = -3  # the pipeline's num_hidden_layers_to_skip=2
CLIP_MAX_LENGTH = 77
# HunyuanVideo-I2V (pipelines/hunyuan_video_i2v.py): the transformer config's image_condition_type, and how ft
# names the way the image enters the transformer (ImageConditioning.kind)
IMAGE_CONDITION_KINDS = {"token_replace": "first-frame", "latent_concat": "channel-concat"}
I2V_PIPELINE = ("diffusers", "HunyuanVideoImageToVideoPipeline")
# the text half of llava-llama-3-8b and CLIP ViT-L/14's text tower: HunyuanVideo's two text encoders
LLAVA_LLAMA3_8B_TEXT = {"vocab_size": 128320, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "max_position_embeddings": 8192, "rope_theta": 500000.0}
CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}

# tencent's module names, which musubi-tuner and diffusion-pipe write and ComfyUI's HunyuanVideo LoRA map reads
# (under diffusion_model. or transformer.), checked against diffusers' convert_hunyuan_video_transformer_to_diffusers
# in tests/pipelines/test_lora_keys.py. q, k and v are one fused projection there (linear1 of a single-stream block
# also holds the MLP's input projection).
_DOUBLE, _SINGLE = r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
_REFINER = r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\."
_REFINER_TO = r"txt_in.individual_token_refiner.blocks.\1."
ORIGINAL_LAYOUT = OriginalLayout(
    "HunyuanVideo's original (tencent) checkpoint",
    renames=(Rename(r"x_embedder\.proj", "img_in.proj"),
             Rename(r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer"),
             Rename(r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer"),
             Rename(_DOUBLE + r"attn\.to_out\.0", r"double_blocks.\1.img_attn_proj"),
             Rename(_DOUBLE + r"attn\.to_add_out", r"double_blocks.\1.txt_attn_proj"),
             Rename(_DOUBLE + r"norm1\.linear", r"double_blocks.\1.img_mod.linear"),
             Rename(_DOUBLE + r"norm1_context\.linear", r"double_blocks.\1.txt_mod.linear"),
             Rename(_DOUBLE + r"ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.fc1"),
             Rename(_DOUBLE + r"ff\.net\.2", r"double_blocks.\1.img_mlp.fc2"),
             Rename(_DOUBLE + r"ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.fc1"),
             Rename(_DOUBLE + r"ff_context\.net\.2", r"double_blocks.\1.txt_mlp.fc2"),
             Rename(_SINGLE + r"proj_out", r"single_blocks.\1.linear2"),
             Rename(_SINGLE + r"norm\.linear", r"single_blocks.\1.modulation.linear"),
             Rename("proj_out", "final_layer.linear"),
             Rename(r"context_embedder\.proj_in", "txt_in.input_embedder"),
             Rename(_REFINER + r"attn\.to_out\.0", _REFINER_TO + "self_attn_proj"),
             Rename(_REFINER + r"ff\.net\.0\.proj", _REFINER_TO + "mlp.fc1"),
             Rename(_REFINER + r"ff\.net\.2", _REFINER_TO + "mlp.fc2"),
             Rename(_REFINER + r"norm_out\.linear", _REFINER_TO + "adaLN_modulation.1")),
    fused=(Fused(_DOUBLE + r"attn\.", ("to_q", "to_k", "to_v"), r"double_blocks.\1.img_attn_qkv"),
           Fused(_DOUBLE + r"attn\.", ("add_q_proj", "add_k_proj", "add_v_proj"), r"double_blocks.\1.txt_attn_qkv"),
           Fused(_SINGLE, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), r"single_blocks.\1.linear1"),
           Fused(_REFINER + r"attn\.", ("to_q", "to_k", "to_v"), _REFINER_TO + "self_attn_qkv")),
    refused={r"norm_out\.linear": "the original final_layer.adaLN_modulation.1 holds its rows in the other order "
                                  "(shift, scale), and diffusers' reader would split its down-projection",
             r"time_text_embed\.(timestep|guidance)_embedder\.linear_[12]|"
             r"context_embedder\.time_text_embed\.(timestep|text)_embedder\.linear_[12]":
                 "ComfyUI names these embedders in_layer/out_layer where the original checkpoint has mlp.0/mlp.2 or "
                 "linear_1/linear_2, so no one key loads in both"},
    read_prefixes=("diffusion_model.", "transformer."))


def default_prompt_template() -> dict[str, Any]:
    """The pipeline's own template and crop (diffusers' DEFAULT_PROMPT_TEMPLATE), read from diffusers so that a
    change there is a change here."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return dict(DEFAULT_PROMPT_TEMPLATE)


def clip_pooled_embeds(encoders: dict[str, Any], prompts: list[str]) -> torch.Tensor:
    """`_get_clip_prompt_embeds` of both pipelines: CLIP's pooled output of the caption alone (77 tokens)."""
    clip_tokenizer, clip = encoders["tokenizer_2"], encoders["text_encoder_2"]
    clip_ids = clip_tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                              return_tensors="pt").input_ids
    return clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output


def call_transformer(transformer: Any, hidden: torch.Tensor, step: StepInputs, text: dict[str, torch.Tensor],
                     dtype: torch.dtype, guidance: bool = True) -> torch.Tensor:
    """The transformer call of both pipelines' denoising loops on `hidden`: the timestep 1000 * sigma as a float,
    the Llama embeddings and mask and CLIP's pooled embeddings of `text`, and the embedded guidance
    (`--guidance-scale` * 1000) where the transformer takes it (`guidance`)."""
    import torch

    scale = step.options.guidance_scale
    embedded = torch.full((hidden.shape[0],), scale, dtype=dtype, device=hidden.device) * 1000.0 if guidance else None
    return transformer(hidden_states=hidden.to(dtype), timestep=step.timesteps.float(),
                       encoder_hidden_states=text["prompt_embeds"].to(dtype),
                       encoder_attention_mask=text["prompt_attention_mask"].to(dtype),
                       pooled_projections=text["pooled_prompt_embeds"].to(dtype), guidance=embedded,
                       attention_kwargs=None, return_dict=False)[0]


def context_parallel_processor() -> Any:
    """A HunyuanVideoAttnProcessor2_0 whose attention mask fits the context-parallel split (made on first use: it
    subclasses diffusers' class, imported lazily). Each rank holds its part of the video tokens and the whole text,
    so its joint sequence is [its video tokens, the text]; the ranks' sequences together would hold the text once
    per rank. The mask each rank hands the attention keeps its video tokens, and the text's own mask on the cp
    group's first rank only (False on the others): the keys every rank attends over are then every video token
    and the text once, as in one process. Ulysses gathers the ranks' masks with their keys; the other ranks' text
    stream gets no gradient (its keys are masked everywhere) and the first rank's gets all of it, so the gradients
    summed over the group are one process's."""
    global _ContextParallelProcessor
    if _ContextParallelProcessor is None:
        import torch
        import torch.distributed as dist
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        class ContextParallelProcessor(HunyuanVideoAttnProcessor2_0):
            def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                         attention_mask: Any = None, image_rotary_emb: Any = None) -> Any:
                if self._parallel_config is not None and attention_mask is not None:
                    text = encoder_hidden_states.shape[1]
                    group = self._parallel_config.context_parallel_config._flattened_mesh.get_group()
                    text_mask = attention_mask[..., -text:]
                    if dist.get_rank(group) > 0:
                        text_mask = torch.zeros_like(text_mask)
                    video = attention_mask.new_ones(*attention_mask.shape[:-1], hidden_states.shape[1])
                    attention_mask = torch.cat([video, text_mask], dim=-1)
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        _ContextParallelProcessor = ContextParallelProcessor
    return _ContextParallelProcessor()


_ContextParallelProcessor: Any = None


class HunyuanVideoSpec(ModelSpec):
    name = "hunyuan_video"
    display_name = "HunyuanVideo"
    aliases = ("hunyuan-video", "hunyuan", "hunyuanvideo")
    objective = "flow_matching"
    channel_dim = 1  # latents are [B, C, F, H, W]
    pipeline_class = ("diffusers", "HunyuanVideoPipeline")
    component_classes = {
        "tokenizer": ("transformers", "AutoTokenizer"),
        "text_encoder": ("transformers", "LlamaModel"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "text_encoder_2": ("transformers", "CLIPTextModel"),
        "vae": ("diffusers", "AutoencoderKLHunyuanVideo"),
        "transformer": ("diffusers", "HunyuanVideoTransformer3DModel"),
    }
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    scheduler_class = ("diffusers", "FlowMatchEulerDiscreteScheduler")
    # the attention projections of the double- and single-stream blocks, not the text token refiner's (its blocks
    # have to_q/to_k/to_v/to_out.0 too): finetrainers' HunyuanVideo example restricts them with this regex
    default_lora_targets = ["(transformer_blocks|single_transformer_blocks).*"
                            "(to_q|to_k|to_v|to_out.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"]
    original_layout = ORIGINAL_LAYOUT
    default_buckets = ["49x480x768"]  # finetrainers' HunyuanVideo example; the model generates 129x720x1280
    default_text_tokens = 256  # the pipeline's max_sequence_length: Llama tokens after the template's crop
    conditioning = (CondTensor("prompt_embeds", "text_embed_dim", "text encoder (Llama)"),
                    CondTensor("prompt_attention_mask", None, dtype="bool"),
                    CondTensor("pooled_prompt_embeds", "pooled_projection_dim", "second text encoder (CLIP)",
                               per_token=False))
    checkpoints = (Checkpoint("HunyuanVideo", ("hunyuanvideo-community/HunyuanVideo", "tencent/HunyuanVideo",
                                               "hunyuan-video"),
                              {"transformer": {}, "vae": {}, "text_encoder": LLAVA_LLAMA3_8B_TEXT,
                               "text_encoder_2": CLIP_L_TEXT}),)
    block_lists = ("transformer_blocks", "single_transformer_blocks")  # dual-stream, then single-stream
    default_fps = 24.0  # HunyuanVideo's sampler writes 24 fps (129 frames: about 5 s)
    embedded_guidance = True  # the transformer takes the guidance scale as an input (--guidance-scale)
    context_parallel = ("ft's plan: the video tokens are split before the first dual-stream block (the rotary "
                        "tables as the rope module makes them); the text (after the token refiner, which every rank "
                        "runs whole) stays whole on every rank, and the joint attention of the dual- and single-"
                        "stream blocks counts it once: the first rank of the group attends with the text's own mask, "
                        "the others mask their copy out (context_parallel_processor); the timestep, guidance and "
                        "pooled-text modulation is per sample, the same on every rank; the video tokens are gathered "
                        "after proj_out.")
    cp_modes = ("ulysses",)
    cp_modes_why = ("its joint attention carries a mask (the text's padding, and the other ranks' copies of the "
                    "text), which Ulysses gathers with the keys but ring attention would apply to the wrong key "
                    "chunks")

    def cp_plan(self, transformer: Any) -> dict[str, Any]:
        """The plan (`context_parallel`), with context_parallel_processor in every dual- and single-stream block."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        for name in self.block_lists:
            for block in getattr(transformer, name):
                block.attn.set_processor(context_parallel_processor())
        rotary = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
        return {"rope": {0: rotary, 1: rotary},
                "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
                "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}

    # ------------------------------------------------------------------------------------------------ checkpoints

    def image_conditioning(self, transformer_config: dict, model_index: dict) -> ImageConditioning | None:
        """HunyuanVideo-I2V: a transformer config with `image_condition_type` ("token_replace": the first latent
        frame replaced by the image's, HunyuanVideo-I2V; "latent_concat": the image's latents and a mask on the
        channels, HunyuanVideo-I2V-33ch), sampled by HunyuanVideoImageToVideoPipeline, whose Llava text encoder reads
        the image (its vision tower) with the prompt."""
        kind = transformer_config.get("image_condition_type")
        if kind is None:
            return None
        return ImageConditioning(IMAGE_CONDITION_KINDS[kind], I2V_PIPELINE, image_encoder=True, caption=True)

    def for_checkpoint_name(self, pretrained: str) -> ModelSpec:
        from .hunyuan_video_i2v import HunyuanVideoI2VSpec

        return HunyuanVideoI2VSpec() if HunyuanVideoI2VSpec.find_checkpoint(pretrained) is not None else self

    def for_checkpoint(self, args: ModelArgs) -> ModelSpec:
        """HunyuanVideoI2VSpec (pipelines/hunyuan_video_i2v.py) for an image-to-video checkpoint: its text encoder
        is a Llava, its transformer takes the image."""
        found = self.image_conditioning(self.load_config("transformer", args), {})
        pipeline = read_model_index(args.pretrained, args.revision, args.cache_dir).get("_class_name")
        if pipeline in ("HunyuanVideoPipeline", I2V_PIPELINE[1]) and (found is None) != (pipeline != I2V_PIPELINE[1]):
            raise UserError(f"--pretrained {args.pretrained} is a {pipeline} but its transformer is "
                            f"{'text' if found is None else 'image'}-to-video (a --transformer-id of the other "
                            "kind?): the text encoders differ (Llama, Llava); pass a transformer of the same kind.")
        if found is None:
            return self
        from .hunyuan_video_i2v import HunyuanVideoI2VSpec

        spec = HunyuanVideoI2VSpec()
        spec.check_args(args)
        return spec

    # ------------------------------------------------------------------------------------------------ facts

    def check_bucket(self, bucket: tuple[int, int, int], vae_config: dict, transformer_config: dict) -> str | None:
        frames, height, width = bucket
        temporal = vae_config.get("temporal_compression_ratio", 4)
        if (frames - 1) % temporal:
            return f"HunyuanVideo takes {temporal}k+1 frames (1, 5, 9, ..., 129), not {frames}"
        p_t = transformer_config.get("patch_size_t", 1) or 1
        if ((frames - 1) // temporal + 1) % p_t:
            return f"this transformer (patch_size_t={p_t}) needs a latent frame count divisible by {p_t}"
        # the pipeline refuses sides that are not multiples of 16, whatever the patch
        multiple = max(16, vae_config.get("spatial_compression_ratio", 8) * transformer_config.get("patch_size", 2))
        if height % multiple or width % multiple:
            return f"height and width must be multiples of {multiple}, not {height}x{width}"
        return None

    # ------------------------------------------------------------------------------------------------ stage 1

    def encoding_choices(self, transformer_config: dict) -> dict[str, Any]:
        template = default_prompt_template()
        return {"prompt_template": template["template"], "crop_start": template["crop_start"],
                "hidden_states_index": HIDDEN_STATES_INDEX, "clip_max_length": CLIP_MAX_LENGTH}

    def encode_prompts(self, encoders: dict[str, Any], prompts: list[str], max_sequence_length: int
                       ) -> dict[str, torch.Tensor]:
        """`_get_llama_prompt_embeds` and `_get_clip_prompt_embeds` of the pipeline, with its template."""
        template = default_prompt_template()
        crop = template["crop_start"]
        tokenizer, llama = encoders["tokenizer"], encoders["text_encoder"]
        tokens = tokenizer([template["template"].format(p) for p in prompts], max_length=max_sequence_length + crop,
                           padding="max_length", truncation=True, return_tensors="pt", return_attention_mask=True)
        mask = tokens.attention_mask.to(llama.device)
        hidden = llama(input_ids=tokens.input_ids.to(llama.device), attention_mask=mask,
                       output_hidden_states=True).hidden_states[HIDDEN_STATES_INDEX]
        return {"prompt_embeds": hidden[:, crop:], "prompt_attention_mask": mask[:, crop:].bool(),
                "pooled_prompt_embeds": clip_pooled_embeds(encoders, prompts)}

    # ------------------------------------------------------------------------------------------------ stage 2

    def prepare_latents(self, latents: dict[str, torch.Tensor], vae_config: dict, transformer_config: dict,
                        generators: list[torch.Generator]) -> torch.Tensor:
        return sample_posterior(latents, generators) * vae_config.get("scaling_factor", 0.476986)

    def predict(self, transformer: Any, step: StepInputs, dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        """The flow (velocity) prediction, fed as HunyuanVideoPipeline's denoising loop feeds the transformer."""
        return call_transformer(transformer, step.noisy, step, step.cond, dtype), None

    # ------------------------------------------------------------------------------------------------ generation

    def generation_defaults(self, transformer_config: dict, vae_config: dict) -> dict[str, Any]:
        return {"num_frames": 129, "height": 720, "width": 1280}  # HunyuanVideoPipeline.__call__'s defaults

    # ------------------------------------------------------------------------------------------------ tests

    tiny_variants = {"i2v": "HunyuanVideo-I2V (token_replace)", "i2v-33ch": "HunyuanVideo-I2V-33ch (latent_concat)"}

    def tiny_variant(self, variant: str, seed: int = 0) -> tuple[tuple[str, str], dict[str, Any]]:
        if variant in self.tiny_variants:
            from .hunyuan_video_i2v import tiny_i2v_components

            return I2V_PIPELINE, tiny_i2v_components(seed, "token_replace" if variant == "i2v" else "latent_concat")
        return super().tiny_variant(variant, seed)

    def tiny_components(self, seed: int = 0) -> dict[str, Any]:
        import torch
        from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        from .tiny import clip_tokenizer, llama_tokenizer

        torch.manual_seed(seed)
        tokenizer = llama_tokenizer([default_prompt_template()["template"]])
        # positions for the template's crop plus 256 caption tokens
        text_encoder = LlamaModel(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_attention_heads=4,
            num_key_value_heads=4, num_hidden_layers=2, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id))
        tokenizer_2 = clip_tokenizer()
        text_encoder_2 = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer_2), hidden_size=8, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, projection_dim=32, max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id))
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
            mid_block_add_attention=True)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)  # HunyuanVideo's sampling shift
        return {"tokenizer": tokenizer, "text_encoder": text_encoder, "tokenizer_2": tokenizer_2,
                "text_encoder_2": text_encoder_2, "vae": vae, "transformer": transformer, "scheduler": scheduler}

"""The real configurations of the known checkpoints, so sizes can be computed offline without any download.

`ft estimate` and bench/memory.py build these models under `accelerate.init_empty_weights` (the meta device:
no memory, no weights) to count parameters. Each family lists its components with their classes, the facts that
set its sequence length and conditioning shapes, and its checkpoints by the names users pass as `--pretrained`.
A family may be listed before it has a ModelSpec (LTX-Video, HunyuanVideo): its sizes are facts of diffusers'
classes and the published configs, not of ft's training code. Adding a checkpoint is adding a `Checkpoint`.

The configs are those of the published `config.json` files: the diffusers defaults of CogVideoXTransformer3DModel,
LTXVideoTransformer3DModel, HunyuanVideoTransformer3DModel and of the three VAEs ARE CogVideoX-2b, LTX-Video 0.9
and HunyuanVideo; CogVideoX-5b is 48 heads x 42 layers with rotary embeddings; the text encoders are T5-v1.1-XXL
(encoder only), the text half of llava-llama-3-8b, and CLIP ViT-L/14's text tower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ft.common.errors import UserError

from . import wan
from .wan import WanSpec

T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}
LLAVA_LLAMA3_8B_TEXT = {"vocab_size": 128320, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "max_position_embeddings": 8192, "rope_theta": 500000.0}
CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}


@dataclass(frozen=True)
class Family:
    """What sizes a family's training from its configs: component classes, transformer layers, conditioning."""

    name: str
    display_name: str
    # component -> (module, class) for the transformer, the VAE and the text encoders (no tokenizers)
    components: dict[str, tuple[str, str]]
    # transformer config -> the number of blocks a token passes through (each a full attention + MLP)
    transformer_layers: Callable[[dict], int]
    # transformer config -> the conditioning tensors one sample stores: name -> (shape, dtype name)
    cond_shapes: Callable[[dict], dict[str, tuple[tuple[int, ...], str]]]
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    default_buckets: list[str] = field(default_factory=list)

    @property
    def text_encoders(self) -> list[str]:
        return [c for c in self.components if c.startswith("text_encoder")]


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint: the names `--pretrained` may give and each component's config."""

    family: str
    display_name: str
    names: tuple[str, ...]
    configs: dict[str, dict[str, Any]]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("cogvideox", "CogVideoX",
           {"transformer": ("diffusers", "CogVideoXTransformer3DModel"), "vae": ("diffusers", "AutoencoderKLCogVideoX"),
            "text_encoder": ("transformers", "T5EncoderModel")},
           transformer_layers=lambda c: c["num_layers"],
           cond_shapes=lambda c: {"prompt_embeds": ((c["max_text_seq_length"], c["text_embed_dim"]), "bfloat16")},
           default_buckets=["49x480x720"]),
    Family("ltx_video", "LTX-Video",
           {"transformer": ("diffusers", "LTXVideoTransformer3DModel"), "vae": ("diffusers", "AutoencoderKLLTXVideo"),
            "text_encoder": ("transformers", "T5EncoderModel")},
           transformer_layers=lambda c: c["num_layers"],
           # LTXPipeline.encode_prompt: 128 T5 tokens and their attention mask
           cond_shapes=lambda c: {"prompt_embeds": ((128, c["caption_channels"]), "bfloat16"),
                                  "prompt_attention_mask": ((128,), "bool")},
           default_buckets=["49x512x768"]),
    Family("hunyuan_video", "HunyuanVideo",
           {"transformer": ("diffusers", "HunyuanVideoTransformer3DModel"),
            "vae": ("diffusers", "AutoencoderKLHunyuanVideo"), "text_encoder": ("transformers", "LlamaModel"),
            "text_encoder_2": ("transformers", "CLIPTextModel")},
           transformer_layers=lambda c: c["num_layers"] + c["num_single_layers"],
           # HunyuanVideoPipeline.encode_prompt: 256 Llama tokens with their mask, and CLIP's pooled embedding
           cond_shapes=lambda c: {"prompt_embeds": ((256, c["text_embed_dim"]), "bfloat16"),
                                  "prompt_attention_mask": ((256,), "bool"),
                                  "pooled_prompt_embeds": ((c["pooled_projection_dim"],), "bfloat16")},
           default_buckets=["49x544x960"],
           # the image/text stream projections of the dual-stream blocks too, as finetrainers targets them
           lora_targets=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                         "to_add_out"]),
    # Wan's facts are its spec's (pipelines/wan.py); this entry only points at them
    Family(WanSpec.name, WanSpec.display_name, {c: WanSpec.component_classes[c] for c in
                                                ("transformer", "vae", "text_encoder")},
           transformer_layers=lambda c: c["num_layers"], cond_shapes=wan.cond_shapes,
           lora_targets=WanSpec.default_lora_targets, default_buckets=WanSpec.default_buckets),
)}

CHECKPOINTS: list[Checkpoint] = [
    Checkpoint("cogvideox", "CogVideoX-2b", ("THUDM/CogVideoX-2b", "zai-org/CogVideoX-2b", "cogvideox-2b"),
               {"transformer": {}, "vae": {}, "text_encoder": T5_XXL}),
    Checkpoint("cogvideox", "CogVideoX-5b", ("THUDM/CogVideoX-5b", "zai-org/CogVideoX-5b", "cogvideox-5b"),
               {"transformer": {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True},
                "vae": {"scaling_factor": 0.7}, "text_encoder": T5_XXL}),
    Checkpoint("ltx_video", "LTX-Video 0.9", ("Lightricks/LTX-Video", "a-r-r-o-w/LTX-Video-diffusers", "ltx-video"),
               {"transformer": {}, "vae": {}, "text_encoder": T5_XXL}),
    Checkpoint("hunyuan_video", "HunyuanVideo",
               ("hunyuanvideo-community/HunyuanVideo", "tencent/HunyuanVideo", "hunyuan-video"),
               {"transformer": {}, "vae": {}, "text_encoder": LLAVA_LLAMA3_8B_TEXT, "text_encoder_2": CLIP_L_TEXT}),
    *(Checkpoint(WanSpec.name, *checkpoint) for checkpoint in wan.CHECKPOINTS),
]


def get_family(name: str) -> Family:
    """The family for `--model NAME`; an unknown name is an error listing the known ones."""
    # the registry's names (ltx_video, hunyuan_video) and its aliases
    key = {"cogvideo": "cogvideox", "ltx": "ltx_video", "ltxvideo": "ltx_video", "ltx-video": "ltx_video",
           "hunyuan": "hunyuan_video", "hunyuanvideo": "hunyuan_video", "hunyuan-video": "hunyuan_video",
           **dict.fromkeys(wan.ALIASES, WanSpec.name)}.get(name.lower(), name.lower())
    if key not in FAMILIES:
        raise UserError(f"--model {name!r}: no known configs for this family; use one of: {', '.join(FAMILIES)}.")
    return FAMILIES[key]


def find_checkpoint(family: str, pretrained: str) -> Checkpoint | None:
    """The built-in checkpoint `pretrained` names (a hub id or its last part, any case), or None."""
    wanted = pretrained.rstrip("/").lower()
    for ckpt in CHECKPOINTS:
        if ckpt.family == family and any(wanted in (n.lower(), n.lower().split("/")[-1]) for n in ckpt.names):
            return ckpt
    return None


def known_names(family: str) -> list[str]:
    return [ckpt.names[0] for ckpt in CHECKPOINTS if ckpt.family == family]

"""Where a model's components come from: `--pretrained` plus per-component overrides and dtypes.

Shared by precompute, train and generate. `--pretrained` names a diffusers folder or hub id; each component may
come from elsewhere (`--transformer-id`, `--vae-id`, `--text-encoder-id`, ...), which is how finetunes such as
SkyReels-V1-Hunyuan-T2V (a transformer on a HunyuanVideo base) are trained. Every command takes the same flags so
that command lines carry over; each uses the components it loads, and an override of a component the family does
not have is refused (ModelSpec.check_args). An override is read as:
- a local folder that holds a subfolder named after the component: that subfolder;
- any other local folder, or a `.safetensors` file: the component itself;
- a hub id `owner/name`: the repo root; `owner/name/subfolder`: that subfolder of the repo.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import REQUIRED, check_choice, opt
from .dtypes import DTYPE_NAMES
from .errors import UserError

_P = "Model"  # the --help panel of these flags

COMPONENTS = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3", "vae",
              "transformer", "image_encoder")
# what a run trains (pipelines/image.py): what the checkpoint is, or one mode of a checkpoint that serves both
MODES = ("auto", "t2v", "i2v")


def is_processor(component: str) -> bool:
    """Tokenizers and image processors (a pipeline's `feature_extractor`): files read, no weights, no dtype."""
    return component.startswith("tokenizer") or component.endswith(("processor", "feature_extractor"))


@dataclass(kw_only=True)
class ModelArgs:
    """The model family and the sources and dtypes of its components."""

    model: str = opt(REQUIRED, "Model family: cogvideox, ltx_video, ... (`ft models` lists them all).", panel=_P)
    pretrained: str = opt(REQUIRED, "A diffusers folder or hub id of the base model.", panel=_P)
    mode: str = opt("auto", "t2v (text-to-video) or i2v (image-to-video, conditioned on the clip's first frame, and "
                            "last for first-last-frame models). auto: what --pretrained is (read from its files); "
                            "text-to-video for a checkpoint that serves both (LTX-Video, Wan 2.2 TI2V-5B); `ft "
                            "train` follows the shards.", panel=_P)
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of --pretrained.", panel=_P)
    variant: str | None = opt(None, "Weights variant to load, e.g. fp16 (files named *.fp16.safetensors).", panel=_P)
    cache_dir: str | None = opt(None, "Where hub downloads are stored (default: the Hugging Face cache).", panel=_P)
    tokenizer_id: str | None = opt(None, "Load the tokenizer from here instead of --pretrained (precompute, "
                                         "generate).", panel=_P)
    tokenizer_2_id: str | None = opt(None, "Load the second tokenizer from here.", panel=_P)
    tokenizer_3_id: str | None = opt(None, "Load the third tokenizer from here.", panel=_P)
    text_encoder_id: str | None = opt(None, "Load the text encoder from here (precompute, generate).", panel=_P)
    text_encoder_2_id: str | None = opt(None, "Load the second text encoder from here.", panel=_P)
    text_encoder_3_id: str | None = opt(None, "Load the third text encoder from here.", panel=_P)
    transformer_id: str | None = opt(None, "Load the transformer from here (a finetune of the family).", panel=_P)
    vae_id: str | None = opt(None, "Load the VAE from here (precompute, generate).", panel=_P)
    image_encoder_id: str | None = opt(None, "Load the image encoder from here (image-to-video checkpoints that have "
                                             "one: precompute, generate).", panel=_P)
    text_encoder_dtype: str = opt("bf16", "dtype of the text encoder: bf16, fp16 or fp32 (precompute, generate).",
                                  panel=_P)
    text_encoder_2_dtype: str = opt("bf16", "dtype of the second text encoder.", panel=_P)
    text_encoder_3_dtype: str = opt("bf16", "dtype of the third text encoder.", panel=_P)
    transformer_dtype: str = opt("bf16", "dtype of the transformer's weights and the training precision (train, "
                                         "generate).", panel=_P)
    vae_dtype: str = opt("bf16", "dtype of the VAE (precompute, generate).", panel=_P)
    image_encoder_dtype: str = opt("bf16", "dtype of the image encoder (precompute, generate).", panel=_P)

    def __post_init__(self) -> None:
        for name in ("text_encoder_dtype", "text_encoder_2_dtype", "text_encoder_3_dtype", "transformer_dtype",
                     "vae_dtype", "image_encoder_dtype"):
            check_choice(str(getattr(self, name)).lower(), DTYPE_NAMES, name)
        check_choice(str(self.mode).lower(), MODES, "mode")
        self.mode = str(self.mode).lower()
        if not self.pretrained:
            raise UserError("--pretrained is empty: pass a diffusers folder or a hub id.")

    def source_of(self, component: str) -> str | None:
        """The override for `component` (e.g. 'text_encoder_2'), or None to use --pretrained."""
        assert component in COMPONENTS, component
        return getattr(self, f"{component}_id")

    def dtype_of(self, component: str) -> str:
        """The dtype name for `component`; tokenizers and schedulers have none."""
        return getattr(self, f"{component}_dtype")

"""Real-size configurations of published checkpoints, so sizes can be computed offline without any download.

Each family lists its checkpoints in its own spec (`ModelSpec.checkpoints`, by the names users pass as
`--pretrained`); this module holds only the record they are written in and the text-encoder configs that more
than one family uses. `ft estimate` and bench/ build the components from these configs under
`accelerate.init_empty_weights` (the meta device: no memory, no weights) to count parameters.

The configs are those of the published `config.json` files. A component given as `{}` is the diffusers class's
defaults, which ARE the published model for the three transformers and VAEs of CogVideoX-2b, LTX-Video 0.9 and
HunyuanVideo. Adding a checkpoint is adding a `Checkpoint` to its family's list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# T5-v1.1-XXL's encoder: the text encoder of CogVideoX and LTX-Video
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint: the names `--pretrained` may give and each component's config (the transformer,
    the VAE and the text encoders; no tokenizers)."""

    display_name: str
    names: tuple[str, ...]
    configs: dict[str, dict[str, Any]]
    image_to_video: bool = False  # an image-to-video checkpoint (its configs include the image encoder's, if any)

    def matches(self, pretrained: str) -> bool:
        """Whether `pretrained` names this checkpoint: one of its names or a name's last part, in any case."""
        wanted = pretrained.rstrip("/").lower()
        return any(wanted in (n.lower(), n.lower().split("/")[-1]) for n in self.names)

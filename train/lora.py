"""LoRA on the transformer with PEFT, and its export in the diffusers format.

The adapters are kept in fp32 on a base in `--transformer-dtype`. The export goes through the family's pipeline
class (`save_lora_weights`, with the adapter config as metadata), because a state dict with peft's raw keys is
loaded by `pipe.load_lora_weights` as nothing at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.pipelines.base import ModelSpec, peft_targets

from .weights_io import LORA_WEIGHTS_NAME, save_lora_file, write_aside


def lora_config(rank: int, alpha: float, target_modules: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=peft_targets(target_modules))


def lora_config_dict(rank: int, alpha: float, target_modules: list[str]) -> dict[str, Any]:
    """The adapter config as the exported LoRA's metadata (what `adapter_metadata` reads off a live model)."""
    return _plain(lora_config(rank, alpha, target_modules).to_dict())


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def add_lora(transformer: Any, rank: int, alpha: float, target_modules: list[str]) -> list[Any]:
    """Freeze the transformer, add a LoRA adapter, and return its (fp32) trainable parameters."""
    import torch

    transformer.requires_grad_(False)
    config = lora_config(rank, alpha, target_modules)
    try:
        transformer.add_adapter(config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"--target-modules {' '.join(target_modules)}: {e}") from e
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.to(torch.float32)
    return params


def lora_state_dict(transformer: Any, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter's weights in peft's naming; from `state` (gathered from several processes) when given."""
    from peft.utils import get_peft_model_state_dict

    found = get_peft_model_state_dict(transformer, state_dict=state)
    return {k: v.detach().cpu().contiguous() for k, v in found.items()}


def adapter_metadata(transformer: Any) -> dict[str, Any]:
    return _plain(transformer.peft_config["default"].to_dict())


def save_lora(spec: ModelSpec, transformer: Any, out_dir: str | Path, state: dict[str, Any] | None = None) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` atomically; `pipe.load_lora_weights(out_dir)` loads it."""
    weights, metadata = lora_state_dict(transformer, state), adapter_metadata(transformer)
    return write_aside(Path(out_dir) / LORA_WEIGHTS_NAME, lambda tmp: save_lora_file(spec, tmp, weights, metadata))

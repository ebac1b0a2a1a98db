"""LoRA on the transformer with PEFT, and the files users load (train/lora_formats.py).

The adapters are kept in fp32 on a base in `--transformer-dtype`. `plan_lora` checks, when a run starts and before
any weight loads, what the run will write (`--lora-format`: diffusers' layout, the family's original layout that
ComfyUI reads, or both) and reads `--init-lora`; `add_lora` puts the adapter on the transformer (from
--init-lora's weights when given), `save_lora` writes the files from the adapter's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.pipelines.base import ModelSpec, peft_targets

from .lora_formats import LoraPlan, init_adapters


def lora_config(rank: int, alpha: float, target_modules: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=peft_targets(target_modules))


def plan_lora(cfg: Any, spec: ModelSpec, transformer_config: dict, resuming: bool = False) -> LoraPlan:
    """The run's LoRA plan from its flags (a TrainConfig): formats checked, --init-lora read (not when resuming:
    the checkpoint holds the adapter then)."""
    return LoraPlan.make(spec, transformer_config, cfg.rank, cfg.lora_alpha, cfg.target_modules,
                         cfg.transformer_id or cfg.pretrained, cfg.lora_format, None if resuming else cfg.init_lora)


def add_lora(transformer: Any, rank: int, alpha: float, target_modules: list[str],
             plan: LoraPlan | None = None) -> list[Any]:
    """Freeze the transformer, add a LoRA adapter (set to `plan.init`, --init-lora's, when there is one), and
    return its (fp32) trainable parameters."""
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
    if plan is not None and plan.init:
        init_adapters(transformer, plan.init, rank, alpha)
    return params


def lora_state_dict(transformer: Any, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter's weights in peft's naming; from `state` (gathered from several processes) when given."""
    from peft.utils import get_peft_model_state_dict

    found = get_peft_model_state_dict(transformer, state_dict=state)
    return {k: v.detach().cpu().contiguous() for k, v in found.items()}


def save_lora(plan: LoraPlan, transformer: Any, out_dir: str | Path, steps: int,
              state: dict[str, Any] | None = None) -> Path:
    """Write the run's LoRA files into `out_dir` (each atomically); returns the first (`pipe.load_lora_weights(
    out_dir)` loads the diffusers one)."""
    return plan.write(out_dir, lora_state_dict(transformer, state), steps)

"""`ft export`: the weights users load, made from any checkpoint.

A checkpoint (checkpoints.py) is a training state: DCP tensors keyed by parameter names, and state.json. A LoRA
checkpoint also holds `pytorch_lora_weights.safetensors` (written with it, so `pipe.load_lora_weights(CKPT)` loads
any step). `ft export --checkpoint OUT/checkpoints/checkpoint-N --out DIR` writes, from the checkpoint's tensors
alone (no optimizer state is read, no base weights are loaded): the LoRA in the layouts of `--lora-format`
(diffusers' and the family's original one that ComfyUI loads: lora_formats.py), or, for a full finetune, a
diffusers `transformer` folder that `from_pretrained` takes, built on the meta device from the transformer's
config and given the checkpoint's tensors.

Every export is written aside and renamed into place (weights_io.py), so a kill never leaves half a transformer
that loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ft.common.config import REQUIRED, check_choice, opt
from ft.common.errors import UserError
from ft.common.logs import log

from .lora_formats import LORA_FORMATS, LoraPlan
from .weights_io import TRANSFORMER_DIR, save_transformer, weights_bytes, write_aside, write_guarded


@dataclass(kw_only=True)
class ExportConfig:
    """Write the weights of a checkpoint in the form users load: a LoRA for `load_lora_weights`, or a full
    finetune's transformer folder for `from_pretrained` (no optimizer state is read)."""

    checkpoint: str = opt(REQUIRED, "A checkpoint folder: OUTPUT_DIR/checkpoints/checkpoint-NNNNNN.")
    out: str = opt(REQUIRED, "Where the weights go: DIR/pytorch_lora_weights.safetensors and/or "
                             "DIR/lora_comfyui.safetensors (LoRA, as --lora-format says) or DIR/transformer (full "
                             "finetune).")
    lora_format: str = opt("both", "The LoRA files written: both (diffusers' pytorch_lora_weights.safetensors and "
                                   "lora_comfyui.safetensors, the model's original layout that ComfyUI loads), "
                                   "diffusers, comfyui, or kohya (lora_kohya.safetensors, musubi-tuner's layout: Wan).")
    pretrained: str | None = opt(None, "The base model, when it moved since training (default: the one the "
                                       "checkpoint's run used; only its transformer config is read).")
    transformer_dtype: str | None = opt(None, "dtype of the exported full transformer (default: the run's "
                                              "--transformer-dtype).")

    def __post_init__(self) -> None:
        check_choice(self.lora_format, LORA_FORMATS, "lora_format")


def read_checkpoint_tensors(path: Path, prefix: str = "model.") -> dict[str, Any]:
    """The tensors of a DCP checkpoint whose keys start with `prefix` (the trainable weights), on the CPU, in one
    process; nothing else (the optimizer state) is read."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({e}); pass a checkpoint-NNNNNN folder.") from e
    tensors = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
               for key, md in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not tensors:
        raise UserError(f"{path} holds no trained weights; it is not a checkpoint of ft train.")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(tensors, checkpoint_id=str(path))
    return {key[len(prefix):]: value for key, value in tensors.items()}


def lora_from_peft_names(state: dict[str, Any]) -> dict[str, Any]:
    """peft's module-state names (`...to_q.lora_A.default.weight`) -> the adapter names diffusers saves."""
    return {key.replace(".default", ""): value for key, value in state.items() if "lora_" in key}


def run_export(cfg: ExportConfig) -> Path:
    """Write the weights of `cfg.checkpoint` into `cfg.out`; returns the file or folder written."""
    import json

    from ft.pipelines.registry import spec_for

    from .checkpoints import STATE_NAME
    from .config import TrainConfig

    path = Path(cfg.checkpoint)
    if not (path / STATE_NAME).is_file():
        raise UserError(f"--checkpoint {path}: not a checkpoint folder (one holding {STATE_NAME}); checkpoints are "
                        "OUTPUT_DIR/checkpoints/checkpoint-NNNNNN.")
    try:
        saved = json.loads((path / STATE_NAME).read_text())["config"]
        fields = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
        run = TrainConfig(**fields)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path / STATE_NAME} does not describe an ft train run ({e}).") from e
    run = replace(run, pretrained=cfg.pretrained or run.pretrained,
                  transformer_dtype=cfg.transformer_dtype or run.transformer_dtype)
    spec = spec_for(run)
    weights = read_checkpoint_tensors(path)
    out = Path(cfg.out)
    step = json.loads((path / STATE_NAME).read_text())["step"]
    if run.training_type == "lora":
        plan = LoraPlan.make(spec, spec.load_config("transformer", run), run.rank, run.lora_alpha, run.target_modules,
                             run.transformer_id or run.pretrained, cfg.lora_format)
        # each layout is one file of about the adapters' size (a fused module's LoRA is its parts' stacked)
        needed = weights_bytes(weights) * len(plan.formats)
        result = write_guarded(out, needed, lambda: plan.write(out, lora_from_peft_names(weights), step))
    else:
        if cfg.lora_format != "both":
            raise UserError(f"--lora-format: {path} is a full finetune's checkpoint; it exports a transformer.")
        config = spec.load_config("transformer", run)
        result = write_guarded(out, weights_bytes(weights, run.transformer_dtype), lambda: write_aside(
            out / TRANSFORMER_DIR, lambda tmp: save_transformer(spec, config, weights, run.transformer_dtype, tmp)))
    log.info(f"exported {path} ({run.training_type}, step {step}) to {result}")
    return result

"""What trains and how it is saved: LoRA adapters or every transformer weight, the optimizer and LR schedule.

dtypes (the documented contract):
- LoRA: the frozen base in `--transformer-dtype`; the adapters, their gradients and the optimizer state in fp32.
- LoRA with `--layerwise-upcasting-modules transformer`: the frozen base's Linear/Conv weights stored in fp8 and
  computed in `--transformer-dtype` (train/fp8.py); the adapters as above, in fp32.
- full finetune, `--master-dtype auto`: weights, gradients and optimizer state in `--transformer-dtype` (bf16 by
  default, as finetrainers trains).
- full finetune, `--master-dtype fp32`: fp32 weights, gradients and optimizer state; the forward and backward run
  under autocast in `--transformer-dtype`. The saved transformer is cast to `--transformer-dtype`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.common.logs import log
from ft.pipelines.base import ModelSpec
from ft.train.fp8 import apply_fp8_storage

from .config import DEFAULT_WARMUP, TrainConfig
from .lora import add_lora, save_lora
from .lora_formats import LoraPlan
from .weights_io import TRANSFORMER_DIR, save_transformer, write_aside


def uses_autocast(cfg: TrainConfig) -> bool:
    """Full finetune with fp32 master weights computes in --transformer-dtype under autocast."""
    return cfg.training_type == "full-finetune" and cfg.master_dtype == "fp32" and cfg.transformer_dtype not in (
        "fp32", "float32", "float")


def load_dtype(cfg: TrainConfig) -> str:
    """The dtype the transformer is loaded in: fp32 for fp32 master weights, else --transformer-dtype."""
    if cfg.training_type == "full-finetune" and cfg.master_dtype == "fp32":
        return "fp32"
    return cfg.transformer_dtype


def make_trainable(cfg: TrainConfig, spec: ModelSpec, transformer: Any, plan: LoraPlan | None = None) -> list[Any]:
    """Add LoRA (from --init-lora's weights, read into `plan`) or unfreeze everything; return the parameters the
    optimizer updates."""
    if cfg.training_type == "lora":
        params = add_lora(transformer, cfg.rank, cfg.lora_alpha, cfg.target_modules or spec.default_lora_targets,
                          plan)
        if cfg.layerwise_upcasting_modules:  # after the adapter: it is made, and stays, in fp32 (train/fp8.py)
            from ft.common.dtypes import parse_dtype

            apply_fp8_storage(transformer, cfg.layerwise_upcasting_storage_dtype,
                              parse_dtype(cfg.transformer_dtype, "--transformer-dtype"),
                              cfg.layerwise_upcasting_skip_modules_pattern)
        return params
    transformer.requires_grad_(True)
    return [p for p in transformer.parameters() if p.requires_grad]


def build_optimizer(cfg: TrainConfig, params: list[Any]) -> tuple[Any, Any]:
    """The optimizer (`--optimizer`) and the diffusers LR schedule with warmup."""
    import torch
    from diffusers.optimization import get_scheduler

    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "weight_decay": cfg.weight_decay, "eps": cfg.epsilon}
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, **kwargs)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, **kwargs)
    else:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError("--optimizer adamw-8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA only), or "
                            "use --optimizer adamw.") from e
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.lr_warmup_steps >= cfg.train_steps and cfg.lr_warmup_steps != DEFAULT_WARMUP:
        log.warning(f"--lr-warmup-steps {cfg.lr_warmup_steps} is not shorter than --train-steps {cfg.train_steps}: "
                    "the learning rate never reaches --lr")
    elif cfg.lr_warmup_steps >= cfg.train_steps:  # the default on a short run (a test, a demo): said, not warned
        log.info(f"the learning rate warms up over the whole run (--lr-warmup-steps defaults to {DEFAULT_WARMUP}, "
                 f"this run has {cfg.train_steps} steps); pass --lr-warmup-steps N to reach --lr sooner")
    schedule = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                             num_training_steps=cfg.train_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    return optimizer, schedule


def save_result(cfg: TrainConfig, spec: ModelSpec, transformer: Any, out: Path, plan: LoraPlan | None, steps: int,
                full_state: dict[str, Any] | None = None) -> Path:
    """LoRA: the files of `--lora-format` (lora_formats.py; OUT/pytorch_lora_weights.safetensors is diffusers').
    Full finetune: OUT/transformer, a diffusers folder that `from_pretrained` loads and `ft generate
    --transformer-id OUT/transformer` uses.

    `full_state`: the weights gathered from several processes (parallel.export_state), written instead of the
    wrapped module's own (whose class and parameters are the wrappers'). Both are written aside and renamed into
    place (export.write_aside): a kill never leaves half a transformer that loads."""
    if cfg.training_type == "lora":
        assert plan is not None, "a LoRA run has its plan (Trainer.check_run)"
        return save_lora(plan, transformer, out, steps, full_state)
    if full_state is None:  # one process: the module's own weights
        full_state = {k: v.detach().cpu() for k, v in transformer.state_dict().items()}
    config = dict(transformer.config)
    return write_aside(out / TRANSFORMER_DIR, lambda tmp: save_transformer(spec, config, full_state,
                                                                          cfg.transformer_dtype, tmp))

"""`ft train` settings: the shards, the LoRA, the optimizer and schedule, and the run's bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

from ft.common.config import REQUIRED, check_choice, check_positive, opt
from ft.common.model_args import ModelArgs

TRAINING_TYPES = ("lora",)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LORA = "LoRA"
OPTIM = "Optimizer"
RUN = "Run"


@dataclass(kw_only=True)
class TrainConfig(ModelArgs):
    """Train the transformer on precomputed shards: only the transformer and scheduler are loaded."""

    shards: str = opt(REQUIRED, "Shard folder written by `ft precompute`.", panel=RUN)
    output_dir: str = opt(REQUIRED, "Where the LoRA (pytorch_lora_weights.safetensors), train_log.jsonl and the "
                                    "resolved config go.", panel=RUN)
    training_type: str = opt("lora", "What to train: lora.", panel=RUN)
    train_steps: int = opt(1000, "Optimizer steps to take.", panel=RUN)
    batch_size: int = opt(1, "Samples per micro-batch (samples of one bucket are batched together).", panel=RUN)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", panel=RUN)
    seed: int = opt(42, "Seed for LoRA init, data order, noise and timesteps.", panel=RUN)
    shuffle_buffer: int = opt(256, "Samples held for shuffling while streaming.", panel=RUN)
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: much less memory, ~30% slower.",
                                       panel=RUN)
    eval_batches: int = opt(0, "Batches for a fixed-noise loss measured before and after training (0: off).",
                            panel=RUN)
    logging_steps: int = opt(1, "Write train_log.jsonl every N optimizer steps.", panel=RUN)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.", panel=RUN)
    rank: int = opt(64, "LoRA rank.", panel=LORA)
    lora_alpha: float = opt(64.0, "LoRA alpha; the update is scaled by alpha / rank.", panel=LORA)
    target_modules: list[str] = opt([], "Module names to put LoRA on. Default: the model's attention "
                                        "projections (to_q to_k to_v to_out.0).", panel=LORA)
    lr: float = opt(1e-4, "Peak learning rate.", panel=OPTIM)
    lr_scheduler: str = opt("constant_with_warmup", f"LR schedule: {', '.join(LR_SCHEDULERS)}.", panel=OPTIM)
    lr_warmup_steps: int = opt(100, "Linear warmup steps.", panel=OPTIM)
    lr_num_cycles: int = opt(1, "Cycles for cosine_with_restarts.", panel=OPTIM)
    beta1: float = opt(0.9, "AdamW beta1.", panel=OPTIM)
    beta2: float = opt(0.95, "AdamW beta2.", panel=OPTIM)
    weight_decay: float = opt(1e-4, "AdamW weight decay.", panel=OPTIM)
    epsilon: float = opt(1e-8, "AdamW epsilon.", panel=OPTIM)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0: no clipping).", panel=OPTIM)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.training_type, TRAINING_TYPES, "training_type")
        check_choice(self.lr_scheduler, LR_SCHEDULERS, "lr_scheduler")
        for name in ("train_steps", "batch_size", "gradient_accumulation_steps", "rank", "lr", "shuffle_buffer",
                     "logging_steps", "lora_alpha"):
            check_positive(getattr(self, name), name)
        for name in ("lr_warmup_steps", "weight_decay", "max_grad_norm", "eval_batches"):
            check_positive(getattr(self, name), name, allow_zero=True)

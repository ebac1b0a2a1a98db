"""`ft train` settings: the shards, what trains (LoRA or every weight), the objective's knobs, the optimizer and
schedule, checkpoints, and how the run is watched.

Precision: `--transformer-dtype` is the one precision flag. The frozen base (LoRA) or the trained weights (full
finetune) live in it; LoRA adapters train in fp32; `--master-dtype fp32` keeps fp32 master weights for a full
finetune while the forward and backward run in `--transformer-dtype` (autocast).
"""

from __future__ import annotations

from dataclasses import dataclass

from ft.common.config import REQUIRED, check_choice, check_positive, flag_name, opt
from ft.common.errors import UserError
from ft.common.model_args import ModelArgs
from ft.pipelines.base import REGEX_CHARACTERS
from ft.pipelines.wan_experts import parse_expert
from ft.train.activation_offload import check_args as check_activation_offload_args
from ft.train.fp8 import DEFAULT_SKIP_PATTERNS as FP8_SKIP
from ft.train.fp8 import check_args as check_fp8_args
from ft.train.offload import check_args as check_offload_args

from .compile import check_args as check_compile_args
from .context_parallel import CP_MODES
from .lora_formats import LORA_FORMATS

# the resolved config a run saves in its --output-dir; `ft generate` reads it back beside a --lora
TRAIN_CONFIG_NAME = "train_config.json"
TRAINING_TYPES = ("lora", "full-finetune")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adam", "adamw-8bit")
FLOW_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
REPORT_TO = ("tensorboard", "wandb", "none")
DEFAULT_WARMUP = 100  # --lr-warmup-steps
DEFAULT_VALIDATION_STEPS = 500  # --validation-steps
MASTER_DTYPES = ("auto", "fp32")
LORA = "LoRA"
OPTIM = "Optimizer"
RUN = "Run"
CKPT = "Checkpoints"
OBJECTIVE = "Objective (noise, timesteps, loss weights)"
WATCH = "Watching the run"
PARALLEL = "Several processes (torchrun, srun)"
VALIDATE = "Validation (videos and a held-out loss)"
SPEED = "GPU memory and speed"


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "use --report-to none"), "wandb": ("wandb", "use --report-to "
                                                                                           "tensorboard")}


def check_tracker_installed(report_to: str) -> None:
    """--report-to names a package that is not installed: refused now, not after the transformer has loaded."""
    import importlib.util

    if report_to not in TRACKER_PACKAGES:
        return
    package, other = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(package) is None:
        raise UserError(f"--report-to {report_to} needs the {package} package: `pip install {package}`, or {other}.")


@dataclass(kw_only=True)
class TrainConfig(ModelArgs):
    """Train the transformer on precomputed shards: only the transformer and scheduler are loaded."""

    shards: list[str] = opt(REQUIRED, "Shard folder written by `ft precompute`. Give several to mix them: "
                                      "`--shards A B:0.3` draws batches from B with weight 0.3 against A's 1.",
                            panel=RUN)
    output_dir: str = opt(REQUIRED, "Where the result (LoRA: pytorch_lora_weights.safetensors; full finetune: "
                                    "transformer/), checkpoints/, train_log.jsonl and the resolved config go.",
                          panel=RUN)
    expert: str | None = opt(None, "Wan 2.2 A14B: the expert this run trains, high (transformer/, the high-noise "
                                   "timesteps) or low (transformer_2/, the low-noise ones), each its own run on one "
                                   "shard set; high_noise / low_noise (musubi-tuner) mean the same. Required for a "
                                   "two-expert model, refused for others.", panel=RUN)
    training_type: str = opt("lora", "What to train: lora (adapters on a frozen transformer) or full-finetune "
                                     "(every transformer weight).", panel=RUN)
    train_steps: int = opt(1000, "Optimizer steps to take (in all, counting steps before a resume).", panel=RUN)
    batch_size: int = opt(1, "Samples per micro-batch on each process (samples of one bucket are batched together)"
                             ".", panel=RUN)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", panel=RUN)
    seed: int = opt(42, "Seed for LoRA init, data order, and each sample's latent draw, noise and timestep.",
                    panel=RUN)
    shuffle_buffer: int = opt(256, "Samples held for shuffling while streaming.", panel=RUN)
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: much less memory, ~30% slower.",
                                       panel=RUN)
    master_dtype: str = opt("auto", "dtype of the weights the optimizer updates. auto: fp32 LoRA adapters; a full "
                                    "finetune trains its weights in --transformer-dtype (as finetrainers does). "
                                    "fp32: fp32 master weights, computing in --transformer-dtype.", panel=RUN)
    caption_dropout_p: float = opt(0.0, "Probability of training a sample on the empty caption (for classifier-free "
                                        "guidance); uses the empty-caption conditioning `ft precompute` stores.",
                                   panel=RUN)
    eval_batches: int = opt(0, "Batches of the TRAINING set for a fixed-noise training loss measured before and "
                               "after training (0: off), chosen by sample key. For a held-out loss, see "
                               "--eval-shards.", panel=VALIDATE)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.", panel=RUN)
    checkpointing_steps: int = opt(500, "Save a checkpoint every N optimizer steps and at the last (0: never). It "
                                        "holds what exact resume needs: trainable weights, optimizer, LR schedule, "
                                        "RNG, step and data position.", panel=CKPT)
    checkpointing_limit: int | None = opt(None, "Keep at most this many checkpoints; the oldest are deleted.",
                                          panel=CKPT)
    resume_from_checkpoint: str | None = opt(None, "Resume from OUTPUT_DIR/checkpoints: a step number, `latest`, "
                                                   "or a checkpoint folder.", panel=CKPT)
    allow_incomplete: bool = opt(False, "Train on a shard set whose precompute run did not finish (refused by "
                                        "default: part of the dataset, maybe whole buckets, would be missing).",
                                 panel=RUN)
    layerwise_upcasting_modules: list[str] = opt([], "fp8 storage of the frozen base (finetrainers' flag): "
                                                     "`transformer` stores its Linear and Conv weights in "
                                                     "--layerwise-upcasting-storage-dtype and casts each to "
                                                     "--transformer-dtype for its forward (diffusers' layerwise "
                                                     "casting). LoRA only, one process; the adapters stay fp32.",
                                                 panel=LORA)
    layerwise_upcasting_storage_dtype: str = opt("float8_e4m3fn", "fp8 storage dtype: float8_e4m3fn or "
                                                                  "float8_e5m2.", panel=LORA)
    layerwise_upcasting_skip_modules_pattern: list[str] = opt(
        list(FP8_SKIP), "Regexes (re.search on module names) of modules kept in --transformer-dtype; finetrainers' "
                        "default keeps norms, embeddings and the input/output projections. The adapters are always "
                        "kept in fp32.", panel=LORA)
    compile_modules: list[str] = opt([], "transformer: torch.compile it (finetrainers' flag). The first step of each "
                                         "bucket shape compiles (logged as compile_seconds in train_log.jsonl), the "
                                         "steps after it run the compiled code.", panel=SPEED)
    compile_scopes: list[str] = opt(["regional"], "regional: each transformer block compiled on its own (a new "
                                                  "bucket shape recompiles each block once, then its shapes are "
                                                  "dynamic); full: the whole transformer as one graph.", panel=SPEED)
    compile_backend: str = opt("inductor", "torch.compile's backend (torchtitan's compile.backend): inductor "
                                           "generates kernels; aot_eager captures the graphs with autograd but runs "
                                           "them eagerly, to tell a compiler problem from a model one.", panel=SPEED)
    offload_blocks: int = opt(0, "Keep the frozen weights of this many transformer blocks (the last ones) in CPU "
                                 "memory and copy each to the GPU on a side stream just before its forward and its "
                                 "backward (musubi-tuner's blocks to swap): for GPUs too small for the model. LoRA, "
                                 "one process, with --gradient-checkpointing; `ft estimate --offload-blocks N` says "
                                 "what fits.", panel=SPEED)
    activation_offload: bool = opt(False, "With --gradient-checkpointing: keep what each checkpointed transformer "
                                          "block saves for its backward (its input) in pinned CPU memory, copied "
                                          "back when the backward reaches the block (musubi-tuner's "
                                          "--gradient_checkpointing_cpu_offload): for long videos on one GPU. LoRA "
                                          "or full finetune, one process or many; `ft estimate "
                                          "--activation-offload` says what it saves.", panel=SPEED)
    rank: int = opt(64, "LoRA rank.", panel=LORA)
    lora_alpha: float = opt(64.0, "LoRA alpha; the update is scaled by alpha / rank.", panel=LORA)
    target_modules: list[str] = opt([], "Module names to put LoRA on, or one regex matched against whole names. "
                                        "Default: the model's attention projections (to_q to_k to_v to_out.0; "
                                        "HunyuanVideo: those and the text-stream ones of its double- and "
                                        "single-stream blocks, not the token refiner's).", panel=LORA)
    lora_format: str = opt("both", "The LoRA files written (the result, each checkpoint's): both = "
                                   "pytorch_lora_weights.safetensors (diffusers' layout: diffusers, `ft generate`) "
                                   "and lora_comfyui.safetensors (the model's original layout, which ComfyUI loads; "
                                   "alpha folded into the weights); diffusers or comfyui alone; kohya: "
                                   "lora_kohya.safetensors, musubi-tuner's lora_unet_ layout (Wan).", panel=LORA)
    init_lora: str | None = opt(None, "Start from an existing LoRA (a .safetensors file, or a folder holding one) in "
                                      "any layout ft reads: diffusers', ComfyUI's original-layout (ft's "
                                      "lora_comfyui, diffusion-pipe, ai-toolkit) or kohya's (musubi-tuner). Its "
                                      "modules must be among the run's and its rank --rank; the run's other "
                                      "modules start fresh.", panel=LORA)
    optimizer: str = opt("adamw", f"Optimizer: {', '.join(OPTIMIZERS)} (adamw-8bit needs bitsandbytes).",
                         panel=OPTIM)
    lr: float = opt(1e-4, "Peak learning rate.", panel=OPTIM)
    lr_scheduler: str = opt("constant_with_warmup", f"LR schedule: {', '.join(LR_SCHEDULERS)}.", panel=OPTIM)
    lr_warmup_steps: int = opt(DEFAULT_WARMUP, "Linear warmup steps.", panel=OPTIM)
    lr_num_cycles: int = opt(1, "Cycles for cosine_with_restarts.", panel=OPTIM)
    lr_power: float = opt(1.0, "Power of the polynomial schedule.", panel=OPTIM)
    beta1: float = opt(0.9, "Adam beta1.", panel=OPTIM)
    beta2: float = opt(0.95, "Adam beta2.", panel=OPTIM)
    weight_decay: float = opt(1e-4, "Weight decay (decoupled for adamw, L2 for adam).", panel=OPTIM)
    epsilon: float = opt(1e-8, "Adam epsilon.", panel=OPTIM)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this once per optimizer step (0: no clipping).",
                               panel=OPTIM)
    flow_weighting_scheme: str = opt("none", "How sigmas are drawn and losses weighted: none (uniform), "
                                             "logit_normal, mode (draw densities), sigma_sqrt, cosmap (loss "
                                             "weights, flow matching only).", panel=OBJECTIVE)
    flow_logit_mean: float = opt(0.0, "Mean of the logit_normal density.", panel=OBJECTIVE)
    flow_logit_std: float = opt(1.0, "Standard deviation of the logit_normal density.", panel=OBJECTIVE)
    flow_mode_scale: float = opt(1.29, "Scale of the mode density.", panel=OBJECTIVE)
    flow_shift: float = opt(1.0, "Shift sigmas towards noise: s' = shift*s / (1 + (shift-1)*s). 1: none.",
                            panel=OBJECTIVE)
    flow_resolution_shifting: bool = opt(False, "Shift by the latent sequence length instead of --flow-shift, "
                                                "interpolating between the base and max shifts below.",
                                         panel=OBJECTIVE)
    flow_base_seq_len: int | None = opt(None, "Sequence length that gets --flow-base-shift. Default: the "
                                              "scheduler config's base_image_seq_len, as the pipeline reads it.",
                                        panel=OBJECTIVE)
    flow_max_seq_len: int | None = opt(None, "Sequence length that gets --flow-max-shift. Default: the scheduler "
                                             "config's max_image_seq_len.", panel=OBJECTIVE)
    flow_base_shift: float | None = opt(None, "Shift exponent (mu) at --flow-base-seq-len. Default: the scheduler "
                                              "config's base_shift.", panel=OBJECTIVE)
    flow_max_shift: float | None = opt(None, "Shift exponent (mu) at --flow-max-seq-len. Default: the scheduler "
                                             "config's max_shift.", panel=OBJECTIVE)
    # --- HunyuanVideo (a family without an embedded guidance input refuses a value other than 1) ---
    guidance_scale: float = opt(1.0, "HunyuanVideo: the embedded guidance scale the guidance-distilled transformer is "
                                     "trained with (1.0 as finetrainers and musubi-tuner train; generation uses the "
                                     "pipeline's 6.0).", panel=OBJECTIVE)
    # --- family-specific stage-2 options (a family that does not take one refuses it: ModelSpec.check_args) ---
    first_frame_conditioning_p: float | None = opt(None, "LTX-Video: text-to-video runs: the probability that a "
                                                         "sample's first latent frame is noised only lightly (sigma "
                                                         "<= 0.25) and left out of the loss (default 0; finetrainers "
                                                         "uses 0.1). Image-to-video runs (--mode i2v shards): the "
                                                         "probability that a sample is conditioned on its image "
                                                         "(default 1).", panel=OBJECTIVE)
    image_noise: bool = opt(False, "CogVideoX image-to-video: add noise to the conditioning image, as diffusers' "
                                   "CogVideoX I2V LoRA example and finetrainers do (sigma = exp(N(-3, 0.5)) per "
                                   "sample). The image was encoded in stage 1, so the noise is added to its scaled "
                                   "VAE latents, not its pixels; drawn from the sample's own generator. Off by "
                                   "default: the transformer is then fed exactly as the pipeline feeds it.",
                            panel=OBJECTIVE)
    noised_image_dropout: float = opt(0.0, "CogVideoX image-to-video: the probability that a sample's conditioning "
                                           "image latents are zeroed (finetrainers' legacy I2V scripts' "
                                           "--noised_image_dropout, 0.05 there), a coin from the sample's own "
                                           "generator. 0 by default: the transformer is fed as the pipeline feeds "
                                           "it.", panel=OBJECTIVE)
    dp_degree: int = opt(-1, "Data-parallel replicas (DDP; HSDP with --dp-shards). Replicas x shards = the number "
                             "of processes torchrun or srun started; -1: what the world leaves (every process is a "
                             "replica when neither is given).", panel=PARALLEL)
    dp_shards: int = opt(-1, "FSDP2 shards: the transformer's weights, gradients and optimizer state are split "
                             "over this many processes, block by block; -1: what the world leaves.", panel=PARALLEL)
    cp_degree: int = opt(1, "Context parallelism: split each sample's token sequence over this many processes "
                            "(finetrainers' --cp_degree), for videos whose activations one GPU cannot hold. The "
                            "processes of one context-parallel group read the same batch; the world is --dp-degree x "
                            "--dp-shards x --cp-degree (FSDP2 shards over --dp-shards x --cp-degree).",
                         panel=PARALLEL)
    cp_mode: str | None = opt(None, "How attention crosses the split: ulysses (an all-to-all swaps the sequence split "
                                    "for a head split; the attention heads must divide by --cp-degree) or ring (keys "
                                    "and values passed around the group; any head count). Default: ulysses where the "
                                    "transformer's head count divides by --cp-degree, else ring: Ulysses for Wan "
                                    "14B (40 heads), LTX-Video (32) and HunyuanVideo (24) at 2, 4 and 8, for Wan "
                                    "1.3B (12) at 2 and 4; CogVideoX (5b: 48 heads, 2b: 30) splits only at 2 (its "
                                    "226 text tokens are split too, and 4 or 8 does not divide them), with Ulysses; "
                                    "HunyuanVideo takes Ulysses only (its joint attention has a mask). The run's log "
                                    "names the mode it took.", panel=PARALLEL)
    init_timeout: float = opt(1800.0, "Seconds the processes may wait for each other while starting (joining, "
                                      "loading and sharding the weights, resuming).", panel=PARALLEL)
    nccl_timeout: float = opt(600.0, "Seconds one collective may wait during training (nccl on GPUs, gloo on "
                                     "CPUs) before the run stops instead of hanging.", panel=PARALLEL)
    validation_dataset_file: str | None = opt(None, "Prompts to generate videos from while training (finetrainers' "
                                                    "file: csv, json, jsonl, parquet or arrow; a caption column and "
                                                    "optional height, width, num_frames, num_inference_steps, "
                                                    "guidance_scale, seed, frame_rate). Stage 1 encodes them: `ft "
                                                    "precompute --validation-dataset-file FILE`.", panel=VALIDATE)
    validation_steps: int = opt(DEFAULT_VALIDATION_STEPS,
                                "Generate the validation videos every N optimizer steps and at the last (0: at "
                                "the last only). They go to OUTPUT_DIR/validation/step-NNNNNN/ with a contact "
                                "sheet, and to the tracker.", panel=VALIDATE)
    validation_keep_vae: bool = opt(False, "Keep the VAE on the GPU between validations (faster; it is moved to the "
                                           "CPU between them by default).", panel=VALIDATE)
    eval_shards: str | None = opt(None, "A shard set of held-out clips (precomputed with the same model): its loss at "
                                        "fixed timesteps and fixed noise is logged as eval_loss every --eval-steps. "
                                        "The same weights give the same value in any run.", panel=VALIDATE)
    eval_steps: int = opt(500, "Compute the held-out eval_loss every N optimizer steps and at the last.",
                          panel=VALIDATE)
    logging_steps: int = opt(1, "Write train_log.jsonl (and the trackers) every N optimizer steps.", panel=WATCH)
    report_to: str = opt("tensorboard", "Where metrics go besides train_log.jsonl: tensorboard (event files "
                                        "under OUTPUT_DIR/logs), wandb (when installed) or none.", panel=WATCH)
    tracker_name: str | None = opt(None, "The wandb project (finetrainers' --tracker_name). Default: the "
                                         "WANDB_PROJECT environment variable, else ft.", panel=WATCH)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.expert = parse_expert(self.expert)  # ft's name; `both` refused with the two-job recipe
        check_choice(self.training_type, TRAINING_TYPES, "training_type")
        check_choice(self.lr_scheduler, LR_SCHEDULERS, "lr_scheduler")
        check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        check_choice(self.flow_weighting_scheme, FLOW_WEIGHTING_SCHEMES, "flow_weighting_scheme")
        check_choice(self.report_to, REPORT_TO, "report_to")
        check_tracker_installed(self.report_to)  # before any model loads
        check_choice(self.master_dtype, MASTER_DTYPES, "master_dtype")
        check_choice(self.lora_format, LORA_FORMATS, "lora_format")
        check_positive(self.cp_degree, "cp_degree")
        if self.cp_mode is not None:
            check_choice(self.cp_mode, CP_MODES, "cp_mode")
            if self.cp_degree == 1:
                raise UserError(f"--cp-mode {self.cp_mode} applies with --cp-degree above 1 (each sample's sequence "
                                "split over that many processes); add --cp-degree, or leave --cp-mode out.")
        for name in ("init_timeout", "nccl_timeout"):
            check_positive(getattr(self, name), name)
        for name in ("train_steps", "batch_size", "gradient_accumulation_steps", "rank", "lr", "shuffle_buffer",
                     "logging_steps", "lora_alpha", "flow_logit_std", "flow_shift", "lr_power"):
            check_positive(getattr(self, name), name)
        for name in ("lr_warmup_steps", "weight_decay", "max_grad_norm", "eval_batches", "checkpointing_steps",
                     "validation_steps"):
            check_positive(getattr(self, name), name, allow_zero=True)
        if self.checkpointing_limit is not None:
            check_positive(self.checkpointing_limit, "checkpointing_limit")
        check_positive(self.guidance_scale, "guidance_scale")
        check_positive(self.eval_steps, "eval_steps")
        if self.first_frame_conditioning_p is not None and not 0.0 <= self.first_frame_conditioning_p <= 1.0:
            raise UserError(f"--first-frame-conditioning-p must be between 0 and 1, got "
                            f"{self.first_frame_conditioning_p}.")
        if not 0.0 <= self.noised_image_dropout <= 1.0:
            raise UserError(f"--noised-image-dropout must be between 0 and 1, got {self.noised_image_dropout}.")
        if not 0.0 <= self.caption_dropout_p <= 1.0:
            raise UserError(f"--caption-dropout-p must be between 0 and 1, got {self.caption_dropout_p}.")
        knobs = [name for name in ("flow_base_seq_len", "flow_max_seq_len", "flow_base_shift", "flow_max_shift")
                 if getattr(self, name) is not None]
        if knobs and not self.flow_resolution_shifting:
            raise UserError(f"{', '.join(flag_name(k) for k in knobs)}: used only with --flow-resolution-shifting; "
                            "add it, or leave these out (--flow-shift is the fixed shift).")
        if self.flow_resolution_shifting and self.flow_shift != 1.0:
            raise UserError(f"--flow-shift {self.flow_shift} and --flow-resolution-shifting: the resolution shift "
                            "replaces the fixed one; give one of them.")
        if self.flow_base_seq_len is not None:
            check_positive(self.flow_base_seq_len, "flow_base_seq_len")
        if None not in (self.flow_base_seq_len, self.flow_max_seq_len) and (
                self.flow_max_seq_len <= self.flow_base_seq_len):
            raise UserError(f"--flow-max-seq-len ({self.flow_max_seq_len}) must be greater than --flow-base-seq-len "
                            f"({self.flow_base_seq_len}).")
        if self.lr_scheduler != "polynomial" and self.lr_power != 1.0:
            raise UserError(f"--lr-power applies to --lr-scheduler polynomial, not {self.lr_scheduler}.")
        if self.lr_scheduler != "cosine_with_restarts" and self.lr_num_cycles != 1:
            raise UserError(f"--lr-num-cycles applies to --lr-scheduler cosine_with_restarts, not "
                            f"{self.lr_scheduler}.")
        if len(self.target_modules) == 1 and REGEX_CHARACTERS & set(self.target_modules[0]):
            import re

            try:  # a regex, as PEFT takes it: checked here, before any model loads
                re.compile(self.target_modules[0])
            except re.error as e:
                raise UserError(f"--target-modules {self.target_modules[0]!r} is not a valid regex ({e}).") from e
        check_compile_args(self.compile_modules, self.compile_scopes, self.compile_backend)
        check_offload_args(self.offload_blocks, self.training_type, self.gradient_checkpointing)
        check_activation_offload_args(self.activation_offload, self.gradient_checkpointing)
        check_fp8_args(self.layerwise_upcasting_modules, self.layerwise_upcasting_storage_dtype, self.training_type,
                       self.layerwise_upcasting_skip_modules_pattern)
        if self.training_type == "full-finetune":
            for name, default in (("rank", 64), ("lora_alpha", 64.0)):
                if getattr(self, name) != default:
                    raise UserError(f"--{name.replace('_', '-')} applies to --training-type lora, not "
                                    "full-finetune.")
            if self.target_modules:
                raise UserError("--target-modules applies to --training-type lora, not full-finetune.")
            if self.init_lora or self.lora_format != "both":
                flag = "--init-lora" if self.init_lora else "--lora-format"
                raise UserError(f"{flag} applies to --training-type lora, not full-finetune.")

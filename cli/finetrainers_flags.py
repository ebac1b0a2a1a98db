"""finetrainers' flags, one row each: what ft does with every flag of finetrainers' args.py.

`FLAGS` maps a flag's name (`pretrained_model_name_or_path`) to its `Flag`: its verdict (the same in ft, another
name, not needed, not supported, not yet), the ft commands that use it, the ft setting it becomes, how many values
it takes, why (for the docs, and as the reason when a value is refused), a check of its value and a conversion of
finetrainers' value to ft's. The translator (finetrainers.py) reads this table; docs/finetrainers.md is generated
from it (docs/finetrainers_doc.py). Facts of a family (its names, how finetrainers trains it) are read from the
specs, never written here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ft.common.errors import UserError
from ft.common.shards import bucket_name
from ft.pipelines.registry import SPECS

SAME, RENAMED, NOT_NEEDED, UNSUPPORTED, NOT_YET = "same", "other name", "not needed", "not supported", "not yet"
P, T, CHECK = "precompute", "train", "check-data"
ESTIMATE = "estimate"
RESOLUTION_FLAGS = ("flow_base_seq_len", "flow_max_seq_len", "flow_base_shift", "flow_max_shift")
# flags of other training scripts (diffusers' examples) that name an ft flag far from their spelling
HINTS = {"learning_rate": "--lr", "max_train_steps": "--train-steps", "train_batch_size": "--batch-size",
         "num_train_epochs": "--train-steps", "lora_rank": "--rank", "mixed_precision": "--transformer-dtype"}
# finetrainers' --model_name values are ft's family names (pipelines/registry.py SPECS); these it has beyond them
OTHER_FAMILIES = ("cogview4", "flux")
MICRO_BATCHES = ("finetrainers counts micro-batches, ft optimizer steps: with --gradient_accumulation_steps above 1 "
                 "the value is divided by it (rounded up).")
Check = Callable[[list[str]], "str | None"]


@dataclass(frozen=True)
class Flag:
    """One finetrainers flag and what ft does with it."""

    name: str
    verdict: str
    stages: tuple[str, ...] = ()  # the ft commands that use it
    ft: str | None = None  # the ft setting it becomes
    nargs: int | str = 1  # 0: a switch; "+": several values
    why: str = ""  # for the docs, and the reason when refused
    check: Check | None = None  # why this value is refused (None: accepted)
    convert: Callable[[list[str]], list[tuple[str, list[str]]]] | None = None
    legacy: bool = False  # a flag of finetrainers before its 3D-parallel rewrite (v0.0.x)


def _only(*accepted: str, why: str) -> Check:
    return lambda v: None if " ".join(v) in accepted else why


def _switch_off(why: str) -> Check:
    return lambda v: None if v and v[0].lower() in ("false", "0") else why


def _degree(what: str) -> Check:
    return _only("1", why=f"ft does not split the model's layers across GPUs ({what}); it parallelises data and "
                          "sequences: use --dp_degree (replicas), --dp_shards (FSDP shards) and --cp_degree (each "
                          "sample's sequence split), whose product is the number of processes.")


def _model_name(v: list[str]) -> list[tuple[str, list[str]]]:
    name = v[0].lower().replace("-", "_")
    if name not in SPECS:
        kind = "a finetrainers family" if name in OTHER_FAMILIES else "not a model family"
        raise UserError(f"--model_name {v[0]}: {kind} not supported by ft; it supports "
                        f"{', '.join(SPECS)}.")
    return [("model", [name])]


def _optimizer(v: list[str]) -> list[tuple[str, list[str]]]:
    name = v[0].lower()
    mapping = {"adam": "adam", "adamw": "adamw", "adamw-bnb-8bit": "adamw-8bit", "adamw-bnb": "adamw",
               "adam-bnb": "adam"}
    if name not in mapping:
        return [("optimizer", [name])]  # ft's own names; TrainConfig checks them
    return [("optimizer", [mapping[name]])]


def _buckets(frames: bool) -> Callable[[list[str]], list[tuple[str, list[str]]]]:
    def convert(values: list[str]) -> list[tuple[str, list[str]]]:
        out = []
        for value in values:
            parts = value.lower().replace(",", "x").split("x")
            if len(parts) != (3 if frames else 2):
                flag = "--video_resolution_buckets" if frames else "--image_resolution_buckets"
                raise UserError(f"{flag} {value}: write each as {'FxHxW' if frames else 'HxW'}.")
            out.append(bucket_name(*parts) if frames else bucket_name("1", *parts))
        return [("buckets", out)]
    return convert


def _reshape(v: list[str]) -> list[tuple[str, list[str]]]:
    modes = {"center": "center-crop", "none": "stretch", "bicubic": "stretch", "resize_crop": "center-crop",
             "center_crop": "crop"}
    if v[0] not in modes:
        raise UserError(f"--video_reshape_mode {v[0]}: ft crops at the centre or stretches; use center, none, "
                        "bicubic, resize_crop or center_crop.")
    return [("resize_mode", [modes[v[0]]])]


STAGE_ONE_MODULES = ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder", "vae")


def _compile_modules(v: list[str]) -> list[tuple[str, list[str]]]:
    """finetrainers compiles its encoders too (its Wan I2V script: text_encoder image_encoder transformer vae); they
    run in ft's precompute, uncompiled, so only the transformer is compiled here."""
    kept = [m for m in v if m not in STAGE_ONE_MODULES]
    return [("compile_modules", kept)] if kept else []


def _effect(env: str) -> Callable[[list[str]], list[tuple[str, list[str]]]]:
    """A setting of the process rather than of a command: kept in the environment (see `apply_effects`)."""
    return lambda v: [(f"@{env}", v or ["1"])]


def _flags() -> list[Flag]:
    s, r, n, u = SAME, RENAMED, NOT_NEEDED, UNSUPPORTED
    legacy_validation = ("finetrainers v0.0.x's inline validation settings; write the prompts as a "
                         "--validation_dataset_file instead (a JSON {\"data\": [{\"caption\": ...}, ...]}), one video "
                         "per row, every --validation_steps.")
    flags = [
        # parallel
        Flag("parallel_backend", n, why="ptd and accelerate both mean ft's one backend, torch.distributed (DDP, "
             "FSDP2, HSDP), under whatever launcher started the processes (torchrun, srun, accelerate launch).",
             check=_only("accelerate", "ptd", why="--parallel_backend takes accelerate or ptd.")),
        Flag("pp_degree", n, why="1 only: ft does not pipeline the model.", check=_degree("pipeline parallelism")),
        Flag("dp_degree", s, (T,), "dp_degree", why="data-parallel replicas (DDP; HSDP with --dp_shards)."),
        Flag("dp_shards", s, (T,), "dp_shards", why="FSDP2 shards, block by block; -1 is what the world leaves, as "
             "there."),
        Flag("cp_degree", s, (T,), "cp_degree", why="context parallelism: each sample's sequence split over this "
             "many processes, the world being dp_degree x dp_shards x cp_degree, as there. finetrainers attends "
             "with torch's ring attention; ft takes Ulysses where the heads divide by the degree (the same "
             "attention within float rounding, one all-to-all instead of a ring of exchanges) and ring otherwise; "
             "add --cp-mode ring for finetrainers' algorithm."),
        Flag("tp_degree", n, why="1 only: ft does not split layers across GPUs.",
             check=_degree("tensor parallelism")),
        # model
        Flag("model_name", r, (P, T, "generate", "estimate"), "model", why=f"{', '.join(SPECS)}; finetrainers' other "
             "families are not supported.", convert=_model_name),
        Flag("pretrained_model_name_or_path", r, (P, T, "generate", "estimate"), "pretrained"),
        *(Flag(name, s, (P, T, "generate"), name) for name in (
            "revision", "variant", "cache_dir", "tokenizer_id", "tokenizer_2_id", "tokenizer_3_id",
            "text_encoder_id", "text_encoder_2_id", "text_encoder_3_id", "transformer_id", "vae_id",
            "text_encoder_dtype", "text_encoder_2_dtype", "text_encoder_3_dtype", "transformer_dtype", "vae_dtype")),
        Flag("layerwise_upcasting_modules", s, (T,), "layerwise_upcasting_modules", nargs="+",
             why="fp8 storage of the frozen transformer (LoRA, one process), through diffusers' layerwise casting; "
             "the adapters stay fp32."),
        Flag("layerwise_upcasting_storage_dtype", s, (T,), "layerwise_upcasting_storage_dtype",
             why="float8_e4m3fn (default) or float8_e5m2."),
        Flag("layerwise_upcasting_skip_modules_pattern", s, (T,), "layerwise_upcasting_skip_modules_pattern",
             nargs="+", why="finetrainers' default (norms, embeddings, proj_in/proj_out); the adapters are always "
             "skipped."),
        # dataset
        Flag("dataset_config", s, (P, T), why="ft precompute encodes each dataset of the file into its own shard "
             "set; ft train mixes them by each one's weight. See 'Datasets' below."),
        Flag("dataset_shuffle_buffer_size", r, (T,), "shuffle_buffer", why="samples held for shuffling while "
             "streaming shards (finetrainers' default 1 does not shuffle; ft's is 256)."),
        Flag("enable_precomputation", n, nargs=0, why="ft always precomputes, in its own stage (ft precompute)."),
        Flag("precomputation_items", n, why="ft precompute encodes the whole dataset once, in batches of "
             "--batch-size."),
        Flag("precomputation_dir", r, (P, T), why="where the precomputed data goes: ft precompute's --out and "
             "ft train's --shards (when those are not given)."),
        Flag("precomputation_once", n, nargs=0, why="ft always precomputes everything once."),
        Flag("precomputation_reuse", n, nargs=0, why="ft always reuses what is already encoded (samples are "
             "named by content)."),
        # dataloader
        Flag("dataloader_num_workers", n, why="ft train reads shards in a background thread; ft precompute "
             "decodes with --decode-workers threads."),
        Flag("pin_memory", n, nargs=0, why="ft train copies batches to the GPU itself."),
        # diffusion
        Flag("flow_resolution_shifting", s, (T,), "flow_resolution_shifting", nargs=0,
             why="finetrainers parses it and never applies it; ft applies it (e^mu shift from the latent sequence "
             "length), for families sampled with dynamic shifting (LTX-Video) only, and refuses it elsewhere."),
        *(Flag(name, s, (T,), name, why="acts with --flow_resolution_shifting (finetrainers never used it); "
               "left out, it is the scheduler config's value, as the pipeline reads it (finetrainers' default is "
               "SD3's 256/4096/0.5/1.15).")
          for name in RESOLUTION_FLAGS),
        Flag("flow_shift", s, (T,), "flow_shift", why="finetrainers parses it and never applies it; ft shifts "
             "the sampled sigmas by it (1: none, the default)."),
        *(Flag(name, s, (T,), name) for name in (
            "flow_weighting_scheme", "flow_logit_mean", "flow_logit_std", "flow_mode_scale")),
        # training
        Flag("training_type", s, (T,), "training_type", why="lora or full-finetune; the control-* types are not "
             "supported.", check=_only("lora", "full-finetune", why="--training_type: ft trains lora or "
                                       "full-finetune; control conditioning is not supported yet.")),
        Flag("seed", s, (T,), "seed"),
        Flag("batch_size", s, (T,), "batch_size", why="the training batch. In ft precompute, --batch-size (with a "
             "dash) is the encoding batch; --batch_size is left to ft train."),
        Flag("train_steps", s, (T,), "train_steps", why=MICRO_BATCHES),
        Flag("max_data_samples", s, (T,), why="stops training once this many samples were seen: ft lowers "
             "--train-steps to it."),
        Flag("checkpointing_steps", s, (T,), "checkpointing_steps", why=MICRO_BATCHES),
        *(Flag(name, s, (T,), name) for name in (
            "gradient_accumulation_steps", "checkpointing_limit", "resume_from_checkpoint")),
        Flag("gradient_checkpointing", s, (T,), "gradient_checkpointing", nargs=0),
        Flag("enable_slicing", r, (P,), "vae_tiling", nargs=0, why="ft precompute's --vae-tiling turns on VAE "
             "slicing and tiling together.", convert=lambda v: [("vae_tiling", v or ["true"])]),
        Flag("enable_tiling", r, (P,), "vae_tiling", nargs=0, why="see --enable_slicing.",
             convert=lambda v: [("vae_tiling", v or ["true"])]),
        # LoRA (finetrainers/trainer/sft_trainer/config.py)
        Flag("rank", s, (T,), "rank"),
        Flag("lora_alpha", s, (T,), "lora_alpha"),
        Flag("target_modules", s, (T,), "target_modules", nargs="+", why="a regex string (as PEFT takes it) or a "
             "list of module names."),
        # optimizer
        Flag("optimizer", s, (T,), "optimizer", why="adam, adamw; adamw-bnb-8bit is ft's adamw-8bit; adam-bnb and "
             "adamw-bnb (32-bit bitsandbytes) are torch's adam and adamw; adam-bnb-8bit is refused.",
             convert=_optimizer, check=lambda v: None if v[0].lower() != "adam-bnb-8bit" else
             "--optimizer adam-bnb-8bit: ft has no 8-bit Adam with L2 weight decay. Use --optimizer adamw-8bit "
             "(8-bit, decoupled weight decay) or adam (32-bit, L2 decay as Adam8bit has)."),
        Flag("lr_scheduler", s, (T,), "lr_scheduler", why="cosine is diffusers' half cosine, from the peak to 0 at "
             "the last step. finetrainers' cosine takes --lr_num_cycles (1 by default) as whole periods of the "
             "wave, so its rate falls to 0 at mid-run and climbs back to the peak by the last step, which its own "
             "function's docstring calls not the default (half a period); ft keeps the half cosine. For restarts "
             "use cosine_with_restarts --lr_num_cycles N (the same in both)."),
        *(Flag(name, s, (T,), name) for name in (
            "lr", "lr_warmup_steps", "lr_num_cycles", "lr_power", "beta1", "beta2", "weight_decay",
            "epsilon", "max_grad_norm")),
        Flag("beta3", u, why="ft's optimizers take two betas.",
             check=lambda v: "--beta3: ft's optimizers (adam, adamw) take two betas; leave it out."),
        # validation
        Flag("validation_dataset_file", s, (P, T), "validation_dataset_file", why="the same file (csv, json, jsonl, "
             "parquet or arrow; finetrainers' columns): ft precompute encodes its captions and the negative prompt "
             "into the shard set's prompt table, ft train generates from those embeddings with no text encoder. "
             "image_path/video_path must be null (image-to-video is not in ft yet)."),
        Flag("validation_steps", s, (T,), "validation_steps", why="validation every N steps and at the last; "
             + MICRO_BATCHES),
        Flag("enable_model_cpu_offload", n, nargs=0, why="ft's validation loads no text encoder and keeps the VAE on "
             "the CPU between validations (--validation-keep-vae keeps it on the GPU); the transformer is the one "
             "training."),
        # miscellaneous
        Flag("tracker_name", s, (T,), "tracker_name", why="the wandb project (else WANDB_PROJECT, else ft)."),
        Flag("push_to_hub", u, nargs=0, why="ft does not upload; after training run "
             "`huggingface-cli upload HUB_MODEL_ID OUTPUT_DIR`.",
             check=lambda v: "--push_to_hub: ft does not upload. After training, upload the result with "
                             "`huggingface-cli upload HUB_MODEL_ID OUTPUT_DIR` (log in first with "
                             "`huggingface-cli login`)."),
        Flag("hub_token", n, why="only used with --push_to_hub."),
        Flag("hub_model_id", n, why="only used with --push_to_hub."),
        Flag("output_dir", s, (T,), "output_dir"),
        Flag("logging_dir", n, why="ft writes its logs under OUTPUT_DIR/logs, finetrainers' default.",
             check=_only("logs", why="--logging_dir: ft writes logs to OUTPUT_DIR/logs (finetrainers' default); "
                                     "other folders are not supported.")),
        Flag("logging_steps", s, (T,), "logging_steps", why="counted like --train_steps (see there)."),
        Flag("init_timeout", s, (T,), "init_timeout", why="seconds the processes may wait for each other while "
             "starting."),
        Flag("nccl_timeout", s, (T,), "nccl_timeout", why="seconds one collective may wait during training."),
        Flag("report_to", s, (T,), "report_to", why="none or wandb (ft also has tensorboard, its default)."),
        Flag("verbose", s, (P, T), why="0-3: how much diffusers and transformers log.",
             convert=_effect("FT_LIBRARY_VERBOSITY")),
        # torch config
        Flag("compile_modules", s, (T,), "compile_modules", nargs="+", why="transformer: torch.compile of the "
             "transformer, the only module ft train loads (text_encoder, image_encoder and vae run in ft "
             "precompute, uncompiled: dropped).", convert=_compile_modules),
        Flag("compile_scopes", s, (T,), "compile_scopes", nargs="+", why="regional (default: each block of the "
             "family's block lists) or full (the whole transformer)."),
        Flag("allow_tf32", s, (P, T), nargs=0, why="TF32 matmuls and convolutions on GPUs that have them.",
             convert=_effect("FT_ALLOW_TF32")),
        Flag("float32_matmul_precision", s, (P, T), why="torch.set_float32_matmul_precision.",
             convert=_effect("FT_FLOAT32_MATMUL_PRECISION")),
        Flag("attn_provider_training", u, nargs="+", why="ft uses PyTorch's scaled_dot_product_attention.",
             check=lambda v: None if all(x.endswith(":native") for x in v) else
             "--attn_provider_training: ft uses PyTorch's scaled_dot_product_attention (finetrainers' native); "
             "other providers are not supported."),
        Flag("attn_provider_inference", u, nargs="+", why="see --attn_provider_training.",
             check=lambda v: None if all(x.endswith(":native") for x in v) else
             "--attn_provider_inference: ft uses PyTorch's scaled_dot_product_attention; others are not supported."),
        Flag("list_models", r, why="`ft models` lists the families.", nargs=0,
             check=lambda v: "--list_models: run `ft models`."),
        # finetrainers v0.0.x
        Flag("data_root", r, (P,), "dataset", legacy=True),
        Flag("dataset_file", r, (P,), "dataset", legacy=True),
        Flag("video_column", s, (P,), "video_column", legacy=True),
        Flag("caption_column", s, (P,), "caption_column", legacy=True),
        Flag("id_token", s, (P,), "id_token", legacy=True),
        Flag("video_resolution_buckets", r, (P,), "buckets", nargs="+", convert=_buckets(True), legacy=True,
             why="FxHxW each."),
        Flag("image_resolution_buckets", r, (P,), "buckets", nargs="+", convert=_buckets(False), legacy=True,
             why="HxW each; images are 1-frame buckets."),
        Flag("video_reshape_mode", r, (P,), "resize_mode", convert=_reshape, legacy=True,
             why="center: center-crop; none: stretch."),
        Flag("remove_common_llm_caption_prefixes", r, (P,), "strip_llm_prefixes", nargs=0, legacy=True),
        Flag("caption_dropout_p", s, (T,), "caption_dropout_p", legacy=True),
        Flag("caption_dropout_technique", s, legacy=True, why="empty only: ft trains dropped captions on the "
             "empty caption's embedding.", check=_only("empty", why="--caption_dropout_technique: ft drops to the "
                                                       "empty caption (empty); zero is not supported.")),
        Flag("precompute_conditions", n, nargs=0, legacy=True, why="ft always precomputes."),
        Flag("train_epochs", u, legacy=True, why="ft counts --train-steps.",
             check=lambda v: "--train_epochs: ft counts optimizer steps; give --train_steps instead."),
        Flag("scale_lr", u, nargs=0, legacy=True, why="ft takes --lr as given.",
             check=lambda v: "--scale_lr: ft takes --lr as given; multiply it yourself."),
        Flag("use_8bit_bnb", r, legacy=True, nargs=0, why="--optimizer adamw-8bit.",
             check=lambda v: "--use_8bit_bnb: use --optimizer adamw-8bit."),
        *(Flag(name, u, legacy=True, why=legacy_validation, check=lambda v, name=name: f"--{name}: "
               f"{legacy_validation}") for name in ("validation_prompts", "validation_images", "validation_videos",
                                                    "num_validation_videos", "validation_epochs")),
        Flag("validation_separator", n, legacy=True, why="only used with --validation_prompts."),
        Flag("validation_frame_rate", n, legacy=True, why="only used with --validation_prompts (a validation file "
             "has a frame_rate column)."),
    ]
    return flags


FLAGS: dict[str, Flag] = {f.name: f for f in _flags()}

"""finetrainers' command line, carried over: every flag of its args.py read with finetrainers' meaning.

`translate(command, argv, config, configs)` turns a finetrainers (or ft) argument list, plus the keys of a
`--config` file, into the plain ft argument lists the command runs. One argument list drives both stages:
- a flag of this command is kept, under its ft name (`--pretrained_model_name_or_path` -> `--pretrained`);
- a flag of the other stage is accepted and named once, in one info line ("left to ft train: --rank, --lr");
- a flag with nothing to do in ft is accepted where its value asks for nothing ft lacks (`--pp_degree 1`,
  `--enable_precomputation`), and refused with the reason and the ft way otherwise;
- a misspelt flag gets a "did you mean" only for a near spelling, and a finetrainers flag always its ft name.
`--dataset_config training.json` makes `ft precompute` one run per dataset (precompute/dataset_config.py) and gives
`ft train` the datasets' shard sets with their weights. `FLAGS` is also what docs/finetrainers.md is generated from.

Spelling decides one clash: `--batch_size` (finetrainers' spelling) is the training batch, left to `ft train` by
`ft precompute`, whose own encoding batch is `--batch-size`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ft.common.config import _is_list, flag_name
from ft.common.errors import UserError
from ft.precompute.dataset_config import read_dataset_config

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
    return _only("1", why=f"ft does not split the model across GPUs ({what}); it parallelises data: use "
                          "--dp_degree (replicas) and --dp_shards (FSDP shards), whose product is the number of "
                          "processes.")


def _model_name(v: list[str]) -> list[tuple[str, list[str]]]:
    from ft.pipelines.registry import SPECS

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
            out.append("x".join(parts if frames else ["1", *parts]))
        return [("buckets", out)]
    return convert


def _reshape(v: list[str]) -> list[tuple[str, list[str]]]:
    modes = {"center": "center-crop", "none": "stretch", "bicubic": "stretch", "resize_crop": "center-crop",
             "center_crop": "crop"}
    if v[0] not in modes:
        raise UserError(f"--video_reshape_mode {v[0]}: ft crops at the centre or stretches; use center, none, "
                        "bicubic, resize_crop or center_crop.")
    return [("resize_mode", [modes[v[0]]])]


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
        Flag("cp_degree", n, why="1 only: ft does not split sequences across GPUs.",
             check=_degree("context parallelism")),
        Flag("tp_degree", n, why="1 only: ft does not split layers across GPUs.",
             check=_degree("tensor parallelism")),
        # model
        Flag("model_name", r, (P, T, "generate", "estimate"), "model", why="cogvideox, ltx_video, hunyuan_video, "
             "wan; finetrainers' other families are not supported.", convert=_model_name),
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
             "transformer, the only module ft train loads."),
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


# ---------------------------------------------------------------------------------------------- reading argv


@dataclass
class Entry:
    """One flag as given: its spelling (`--batch_size`), its values, and where it came from."""

    spelling: str
    values: list[str]
    origin: str = "command line"

    @property
    def key(self) -> str:
        return self.spelling.lstrip("-").replace("-", "_")

    @property
    def finetrainers_spelling(self) -> bool:
        return "-" not in self.spelling.lstrip("-")


@dataclass
class Fields:
    """The settings of each ft command: name -> "bool", "list" or "value"."""

    by_command: dict[str, dict[str, str]]

    @classmethod
    def of(cls, configs: dict[str, type]) -> Fields:
        out = {}
        for command, config_cls in configs.items():
            hints = typing.get_type_hints(config_cls)
            out[command] = {f.name: "bool" if hints[f.name] is bool else "list" if _is_list(hints[f.name])
                            else "value" for f in dataclasses.fields(config_cls) if f.init}
        return cls(out)

    def arity(self, key: str, command: str) -> int | str | None:
        for cmd in (command, *self.by_command):
            kind = self.by_command[cmd].get(key.removeprefix("no_"))
            if kind:
                return 0 if kind == "bool" else "+" if kind == "list" else 1
        return None


def _looks_like_flag(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
        return False
    except ValueError:
        return True


def read_argv(argv: list[str], command: str, fields: Fields) -> list[Entry]:
    """Split `--flag values...` into entries, with each flag's arity from ft's configs or finetrainers' table."""
    entries: list[Entry] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not _looks_like_flag(token):
            raise UserError(f"ft {command}: unexpected argument {token!r} (flags are --name value).")
        name, eq, inline = token.partition("=")
        entry = Entry(name, [inline] if eq else [])
        flag = FLAGS.get(entry.key) if entry.finetrainers_spelling else None
        arity = fields.arity(entry.key, command) if flag is None else flag.nargs
        if arity is None and entry.key in FLAGS:
            arity = FLAGS[entry.key].nargs
        i += 1
        if not eq and arity != 0:
            while i < len(argv) and not _looks_like_flag(argv[i]):
                entry.values.append(argv[i])
                i += 1
                if arity == 1:
                    break
            if arity is not None and not entry.values:  # `--out $UNSET` must not become a folder named "true"
                raise UserError(f"{name} needs a value (ft {command}).")
        entries.append(entry)
    return entries


def config_entries(values: dict[str, Any], path: str) -> list[Entry]:
    """A --config file's keys as entries (a list value is several values; true/false switch a flag)."""
    out = []
    for key, value in values.items():
        if value is None:
            continue
        vals = [str(v) for v in value] if isinstance(value, list) else [str(value).lower() if isinstance(value, bool)
                                                                        else str(value)]
        out.append(Entry("--" + str(key).lstrip("-"), vals, origin=f"--config {path}"))
    return out


# ---------------------------------------------------------------------------------------------- translating


@dataclass
class Translation:
    """What a command runs: one ft argument list per run (several for a multi-dataset precompute)."""

    runs: list[list[str]]
    left_to: dict[str, list[str]] = field(default_factory=dict)
    not_needed: list[str] = field(default_factory=list)
    not_yet: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    effects: dict[str, str] = field(default_factory=dict)

    def info_lines(self) -> list[str]:
        lines = [f"left to ft {cmd}: {', '.join(flags)}" for cmd, flags in self.left_to.items()]
        if self.not_needed:
            lines.append(f"accepted, nothing to do in ft (docs/finetrainers.md says why): {', '.join(self.not_needed)}")
        if self.not_yet:
            lines.append(f"accepted, asking for nothing ft lacks (ft does not have these yet): "
                         f"{', '.join(self.not_yet)}")
        return lines + self.notes


def _edits(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def _suggest(entry: Entry, command: str, fields: Fields) -> str | None:
    """A near spelling of one flag of `command` (with its ft name, for a finetrainers flag), or None."""
    names = {flag_name(n)[2:]: n for n in fields.by_command[command]}
    names.update({n.replace("_", "-"): n for n in FLAGS})
    typed = entry.key.replace("_", "-")
    near = [n for n in names if _edits(typed, n) <= max(1, len(n) // 8)]  # a typo or two, never another flag
    if not near:
        return None
    name = names[min(near, key=lambda n: (_edits(typed, n), n))]
    flag = FLAGS.get(name)
    if flag and name not in fields.by_command[command]:
        return f"--{name}" + (f" (ft: {flag_name(flag.ft)})" if flag.ft and flag.ft != name else "")
    return flag_name(name)


def _check_value(flag: Flag, entry: Entry) -> None:
    if flag.check is None:
        return
    if flag.nargs == 0 and entry.values and entry.values[0].strip().lower() in ("false", "0", "no", "off"):
        return  # a switch turned off (a config file's `push_to_hub: false`) asks for nothing
    if flag.nargs == "+" and entry.values == []:
        return  # an empty list (`layerwise_upcasting_modules: []`) asks for nothing
    values = entry.values or ["true"]
    reason = flag.check(values)
    if reason:
        raise UserError(reason if entry.origin == "command line" else f"{entry.origin}: {reason}")


def translate(command: str, argv: list[str], config: dict[str, Any] | None, configs: dict[str, type],
              config_path: str = "") -> Translation:
    """Turn `argv` (after the command name) plus a --config file's keys into the ft runs of `command`.

    Command-line flags override the file's keys; within one of them, a list setting given by several flags (video
    and image buckets) collects them all."""
    fields = Fields.of(configs)
    result = Translation(runs=[])
    finetrainers: dict[str, list[str]] = {}
    by_origin = []
    for entries in (config_entries(config or {}, config_path), read_argv(argv, command, fields)):
        settings: dict[str, list[str]] = {}
        for entry in entries:
            for name, values in _resolve(entry, command, fields, result, finetrainers):
                if name.startswith("@"):
                    result.effects[name[1:]] = values[0]
                elif fields.by_command[command].get(name) == "list" and name in settings:
                    settings[name] = settings[name] + values
                else:
                    settings[name] = values
        by_origin.append(settings)
    settings = {**by_origin[0], **by_origin[1]}
    _special_cases(command, settings, finetrainers, result, fields.by_command[command])
    return result


def _resolve(entry: Entry, command: str, fields: Fields, result: Translation, finetrainers: dict[str, list[str]]
             ) -> list[tuple[str, list[str]]]:
    """The ft settings one entry gives `command` (none when it is left to the other stage or not needed)."""
    own = fields.by_command[command]
    stages = (P, T) if command in (P, T, CHECK) else (command,)
    key = entry.key
    bare = key.removeprefix("no_") if key not in own else key
    # a one-word flag (--seed, --rank) that the command itself has is the command's own; only underscore
    # spellings (--batch_size) are finetrainers' meaning whatever the command
    ambiguous = ("_" not in entry.spelling.lstrip("-") and bare in own and key in FLAGS
                 and command not in FLAGS[key].stages)
    flag = FLAGS.get(key) if (entry.finetrainers_spelling and not ambiguous) or bare not in own else None
    if flag is not None:
        _check_value(flag, entry)
        # a capability still being built is there once a command of its stages has the field (not another
        # command: `ft estimate --dp-shards` does not make sharded training exist)
        available = flag.verdict != NOT_YET or any(flag.ft in fields.by_command.get(stage, {})
                                                   for stage in flag.stages)
        if not available:
            result.not_yet.append(entry.spelling)
            return []
        # ft estimate's flags are ft train's, spelled alike (cli/estimate.py): a finetrainers spelling of one
        # means there what it means to ft train
        if command not in flag.stages and not (command == CHECK and P in flag.stages
                                                and (flag.ft in own or key == "dataset_config")) and not (
                command == ESTIMATE and T in flag.stages and flag.ft in own):
            _leave(result, flag, entry, command, stages)
            return []
        finetrainers[key] = entry.values
        if flag.convert:
            try:
                return flag.convert(entry.values)
            except (IndexError, ValueError, TypeError) as e:
                raise UserError(f"{entry.spelling} {' '.join(entry.values)}: not a value it takes ({e}).") from e
        return [(flag.ft, entry.values or ["true"])] if flag.ft else []  # no ft: read by _special_cases
    if bare in own:
        if own[bare] == "list":  # ft's list flags also take comma-separated values
            return [(bare, [p.strip() for v in entry.values for p in v.split(",") if p.strip()])]
        return [(bare, ["false"] if key != bare else (entry.values or ["true"]))]
    other = next((c for c in stages if c != command and bare in fields.by_command[c]), None)
    if other:
        result.left_to.setdefault(other, []).append(entry.spelling)
        return []
    where = next((c for c, f in fields.by_command.items() if bare in f), None)
    close = None if where else HINTS.get(key) or _suggest(entry, command, fields)
    hint = f"; it is a flag of ft {where}" if where else f"; did you mean {close}?" if close else ""
    if entry.origin != "command line":
        hint = hint.replace(f"{close}?", f"{close[2:]!r}?") if close and close.startswith("--") else hint
        raise UserError(f"{entry.origin}: {key!r} is not a setting of this command{hint}")
    raise UserError(f"No such option: {entry.spelling} (ft {command}){hint}{'' if close else '.'}")


def _leave(result: Translation, flag: Flag, entry: Entry, command: str, stages: tuple[str, ...]) -> None:
    other = next((s for s in flag.stages if s in stages and s != command), None)
    if other:
        result.left_to.setdefault(other, []).append(entry.spelling)
    elif flag.stages:
        raise UserError(f"{entry.spelling} is a flag of ft {' and ft '.join(flag.stages)}, not ft {command}.")
    else:
        result.not_needed.append(entry.spelling)


def _special_cases(command: str, settings: dict[str, list[str]], finetrainers: dict[str, list[str]],
                   result: Translation, kinds: dict[str, str]) -> None:
    target = {P: "out", T: "shards"}.get(command)
    if "precomputation_dir" in finetrainers and target:
        given = settings.get(target)
        value = finetrainers["precomputation_dir"]
        if given and given != value:
            raise UserError(f"--precomputation_dir {value[0]} and --{target} {' '.join(given)} name different "
                            f"folders; give one (ft's --{target}).")
        settings[target] = value
    if command == T:
        _finetrainers_training_semantics(settings, finetrainers, result)
    if command == T and "max_data_samples" in finetrainers:
        try:
            samples = int(finetrainers["max_data_samples"][0])
            per_step = int(settings.get("batch_size", ["1"])[0]) * int(settings.get("gradient_accumulation_steps",
                                                                                     ["1"])[0])
            steps = int(settings.get("train_steps", ["1000"])[0])
        except (IndexError, ValueError) as e:
            raise UserError(f"--max_data_samples, --batch_size, --gradient_accumulation_steps and --train_steps take "
                            f"whole numbers ({e}).") from e
        if -(-samples // per_step) < steps:  # finetrainers goes on while fewer samples were seen: ceil
            settings["train_steps"] = [str(max(1, -(-samples // per_step)))]
            result.notes.append(f"--max_data_samples {samples}: training stops after {settings['train_steps'][0]} "
                                f"steps of {per_step} samples")
    if "dataset_config" in finetrainers and command in (P, T, CHECK):
        datasets = read_dataset_config(finetrainers["dataset_config"][0])
        if command in (P, CHECK):  # check-data checks each dataset as precompute would encode it
            result.runs = _precompute_runs(settings, datasets, kinds, with_out=command == P)
            return
        _mix_shards(settings, datasets)
    result.runs = [to_argv(settings, kinds)]


def _finetrainers_training_semantics(settings: dict[str, list[str]], finetrainers: dict[str, list[str]],
                                     result: Translation) -> None:
    """Where a finetrainers-spelled training flag means something else than ft's flag, translate the value.

    - finetrainers counts --train_steps, --checkpointing_steps, --logging_steps and --validation_steps in
      micro-batches (its step
      counter goes up per batch; the optimizer steps every --gradient_accumulation_steps); ft counts optimizer
      steps, so those values are divided by the accumulation (rounded up).
    - finetrainers trains LTX-Video with first-frame conditioning at p = 0.1, hard-coded; ft's default is 0.
    - finetrainers samples CogVideoX's timesteps uniformly whatever --flow_weighting_scheme says; ft applies the
      density, so a carried-over scheme is dropped for CogVideoX (pass --flow-weighting-scheme to choose one).
    """
    try:
        accumulation = int(settings.get("gradient_accumulation_steps", ["1"])[0])
    except ValueError:
        return  # ft train's own parser names the bad value
    if accumulation > 1:
        for name in ("train_steps", "checkpointing_steps", "logging_steps", "validation_steps"):
            if name in finetrainers and name in settings and settings[name][0].isdigit():
                micro = int(settings[name][0])
                settings[name] = [str(max(1 if micro else 0, -(-micro // accumulation)))]
                result.notes.append(f"--{name} {micro}: finetrainers counts micro-batches, ft optimizer steps; "
                                    f"{settings[name][0]} steps of {accumulation} micro-batches")
    model = (settings.get("model") or [""])[0]
    if "model_name" in finetrainers and model == "ltx_video" and "first_frame_conditioning_p" not in settings:
        settings["first_frame_conditioning_p"] = ["0.1"]
        result.notes.append("LTX-Video: first-frame conditioning at p = 0.1, as finetrainers trains it")
    if model == "cogvideox" and "flow_weighting_scheme" in finetrainers:
        dropped = settings.pop("flow_weighting_scheme")[0]
        result.notes.append(f"--flow_weighting_scheme {dropped}: finetrainers samples CogVideoX timesteps "
                            "uniformly whatever the scheme, and so does this run (--flow-weighting-scheme picks a "
                            "density in ft)")
    # finetrainers parses its shift knobs and never applies them; ft refuses a knob that would do nothing (the
    # resolution knobs without --flow-resolution-shifting, --flow-shift beside it), so a script's leave the run
    shifting = (settings.get("flow_resolution_shifting") or ["false"])[0].lower() in ("true", "1", "yes")
    idle = [name for name in RESOLUTION_FLAGS if name in finetrainers and name in settings] if not shifting else (
        ["flow_shift"] if "flow_shift" in finetrainers and "flow_shift" in settings else [])
    for name in idle:
        dropped = settings.pop(name)[0]
        result.notes.append(f"--{name} {dropped}: finetrainers never applies it, and "
                            f"{'without' if not shifting else 'beside'} --flow_resolution_shifting it means nothing "
                            "to this run either; left out")


def _precompute_runs(settings: dict[str, list[str]], datasets: list[Any], kinds: dict[str, str],
                     with_out: bool = True) -> list[list[str]]:
    from ft.precompute.dataset_config import local_path

    for clash in ("dataset", "buckets", "id_token", "resize_mode"):
        if clash in settings:
            raise UserError(f"--dataset_config gives each dataset's {clash.replace('_', ' ')}; leave out "
                            f"{flag_name(clash)} (or --dataset_config).")
    if "out" not in settings and with_out:
        raise UserError("ft precompute needs --out (or --precomputation_dir): the folder for the shards.")
    runs = []
    several = len(datasets) > 1
    for d in datasets:
        run = dict(settings)
        run["dataset"] = [local_path(d.source, (settings.get("cache_dir") or [None])[0])]
        run["buckets"] = d.buckets
        run["resize_mode"] = [d.resize_mode]
        run.setdefault("frame_sampling", ["uniform"])  # finetrainers spreads the frames it keeps over the clip
        if with_out:
            run["out"] = [d.shard_folder(settings["out"][0], several)]
        if d.id_token:
            run["id_token"] = [d.id_token]
        if d.strip_llm_prefixes:
            run["strip_llm_prefixes"] = ["true"]
        if d.caption_columns:
            run["caption_column"] = [d.caption_columns[0]]
        runs.append(to_argv(run, kinds))
    return runs


def _mix_shards(settings: dict[str, list[str]], datasets: list[Any]) -> None:
    from pathlib import Path

    shards = settings.get("shards", [])
    if len(datasets) < 2 or len(shards) != 1 or (Path(shards[0]) / "manifest.json").is_file():
        return
    absent = [d.shard_folder(shards[0], True) for d in datasets
              if not (Path(d.shard_folder(shards[0], True)) / "manifest.json").is_file()]
    if absent:  # say which --out makes them: the parent, never a dataset's own folder (that would nest)
        raise UserError(f"--dataset_config: {len(absent)} of its {len(datasets)} shard sets are not in "
                        f"{shards[0]} yet (first: {absent[0]}). Run ft precompute with the same --dataset_config and "
                        f"--out {shards[0]} first: it writes one shard set per dataset under it.")
    settings["shards"] = [f"{d.shard_folder(shards[0], True)}:{d.weight:g}" for d in datasets]


def to_argv(settings: dict[str, list[str]], kinds: dict[str, str]) -> list[str]:
    """Settings as an ft argument list (`--name value`, `--flag`/`--no-flag`, a list flag once per value)."""
    argv: list[str] = []
    for name, values in settings.items():
        flag = flag_name(name)
        if kinds.get(name) == "bool":
            on = values[-1].lower() not in ("false", "0", "no") if values else True
            argv.append(flag if on else f"--no-{flag[2:]}")
        else:
            for v in values:
                argv += [flag, v]
    return argv


def apply_effects(effects: dict[str, str]) -> None:
    """Process-wide settings some finetrainers flags ask for: library log levels, TF32, matmul precision."""
    if "FT_LIBRARY_VERBOSITY" in effects:
        level = {"0": "warning", "1": "info", "2": "debug", "3": "debug"}.get(effects["FT_LIBRARY_VERBOSITY"])
        if level is None:
            raise UserError(f"--verbose {effects['FT_LIBRARY_VERBOSITY']}: use 0, 1, 2 or 3.")
        os.environ["FT_LIBRARY_VERBOSITY"] = level
    if "FT_ALLOW_TF32" in effects or "FT_FLOAT32_MATMUL_PRECISION" in effects:
        import torch

        if "FT_ALLOW_TF32" in effects and effects["FT_ALLOW_TF32"].lower() not in ("false", "0"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        precision = effects.get("FT_FLOAT32_MATMUL_PRECISION")
        if precision:
            if precision not in ("highest", "high", "medium"):
                raise UserError(f"--float32_matmul_precision {precision}: use highest, high or medium.")
            torch.set_float32_matmul_precision(precision)

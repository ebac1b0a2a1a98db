"""`ft estimate`: what a run will hold in memory and on disk, from the model's configs alone.

Every component is built from its config under `accelerate.init_empty_weights` (the meta device: no weights, no
memory, no download), so the parameter counts are exact for the architecture. From them:
- precompute holds the text encoders and the VAE (bf16); train holds only the transformer in
  `--transformer-dtype`, and what the optimizer updates, as `ft train` keeps it (train/config.py): LoRA adapters,
  their gradients and Adam's two moments in fp32; a full finetune's weights, gradients and moments in
  `--transformer-dtype`, or all three in fp32 with `--master-dtype fp32` (the forward then runs under autocast,
  whose per-op casts are not counted); adamw-8bit keeps each moment in 1 byte. `--dp-shards S` divides what
  FSDP shards by S and adds the two transformer blocks it holds gathered (the one computing and the one
  prefetched); with `--layerwise-upcasting-modules transformer` the layers `ft train` stores in fp8 (counted by
  applying the same layerwise casting to the meta-device model) are 1 byte per weight, the skipped ones stay in
  `--transformer-dtype` (one layer at a time is cast up for its forward: not counted); with `--offload-blocks N`
  the frozen weights of the last N blocks (in their stored dtype, so fp8 halves them too) leave the GPU for pinned
  CPU memory, and IN_FLIGHT of them (the one computing and the one arriving, train/offload.py) stay counted on
  it; `--compile-modules` adds nothing counted (torch.compile keeps no second copy of the weights; its kernels'
  workspaces are transient);
- `--cp-degree N` (`--cp-mode ring|ulysses`): each GPU holds its 1/N of the video tokens in every block, the
  text whole, the weights and optimizer state whole with `--dp-shards 1` (the cp ranks are DDP replicas) and
  divided by `--dp-shards` x N otherwise (FSDP2 shards over the shard and cp ranks together, train/parallel.py),
  and the context-parallel
  attention's own buffers; `--activation-offload` moves every checkpointed block's input to pinned CPU memory
  (pipelines/memory.py `ActivationModel` says how each is counted). For a bucket that does not fit a card, the
  report names the least that makes it fit: `--activation-offload` on one GPU, the smallest cp degree, and the
  smallest with the offload;
- which GPUs it fits: the peak (static + activations) against 24, 48 and 80 GiB cards, less FIT_HEADROOM of each
  for the CUDA context, the allocator's fragmentation and kernel workspaces (an assumption, not a measurement);
- activations are an estimate, not a measurement: per transformer block, with a fused attention kernel (no
  sequence x sequence matrix kept), (16 + 4 r) bytes per token per hidden unit in bf16 for an MLP of ratio r
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", without dropout).
  With gradient checkpointing each block keeps only its input (2 bytes per token per hidden unit) and one block
  is recomputed at a time. bench/gpu.sh measures the real peak on a GPU;
- disk per sample is exact: one sample of the real shapes is written with `ShardWriter`.
Everything about the family comes from its ModelSpec: its components (all but the tokenizers), its checkpoints'
built-in configs (offline), its conditioning layout and text length, its block lists (the layers a token passes
through, and the block FSDP gathers), its LoRA targets and default bucket. `--pretrained` is a known checkpoint's
name (the spec's `checkpoints`) or a local diffusers folder, whose `<component>/config.json` is read.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.common.config import REQUIRED, check_choice, check_positive, opt
from ft.common.dtypes import DTYPE_NAMES
from ft.common.errors import UserError
from ft.common.model_args import ModelArgs, is_processor
from ft.common.shards import bucket_name, parse_bucket
from ft.pipelines.base import ModelSpec, peft_targets, transformer_blocks
from ft.pipelines.memory import (
    BF16,
    CP_MODES,
    FIT_HEADROOM,
    GIB,
    GPU_SIZES_GIB,
    MAX_CP_DEGREE,
    PINNED_EXACT,
    ActivationModel,
    cp_degrees,
    cp_problem,
    default_cp_mode,
    hidden_and_mlp_ratio,
    pinned_allocation,
    video_tokens,
)
from ft.pipelines.registry import SPECS, get_spec
from ft.train.fp8 import DEFAULT_SKIP_PATTERNS as FP8_SKIP
from ft.train.fp8 import check_args as check_fp8_args
from ft.train.offload import IN_FLIGHT, offloaded_indices

GB = 1e9
# the spellings of `ft train` (train/config.py; a test keeps them equal), so a command line carries over
TRAINING_TYPES = ("lora", "full-finetune")
OPTIMIZERS = ("adamw", "adam", "adamw-8bit")
COMPILE_MODULES = ("transformer",)  # train/compile.py's MODULES
MASTER_DTYPES = ("auto", "fp32")
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(kw_only=True)
class EstimateConfig:
    """Estimate memory and disk of precompute and training from the model's configs (no weights are loaded)."""

    model: str = opt(REQUIRED, f"Model family: {', '.join(SPECS)}.")
    pretrained: str = opt(REQUIRED, "A known checkpoint such as THUDM/CogVideoX-5b (built-in configs, offline) or a "
                                    "local diffusers folder whose configs are read.")
    buckets: list[str] = opt([], "FRAMESxHEIGHTxWIDTH buckets to estimate. Default: the family's default bucket.")
    training_type: str = opt("lora", "lora or full-finetune.")
    transformer_dtype: str = opt("bf16", "dtype of the transformer's weights, as `ft train --transformer-dtype`.")
    master_dtype: str = opt("auto", "dtype of the weights the optimizer updates, as `ft train --master-dtype`: auto "
                                    "is fp32 LoRA adapters, or a full finetune in --transformer-dtype; fp32: a full "
                                    "finetune's weights, gradients and moments in fp32.")
    optimizer: str = opt("adamw", f"Optimizer, as `ft train --optimizer`: {', '.join(OPTIMIZERS)}.")
    rank: int = opt(64, "LoRA rank.")
    batch_size: int = opt(1, "Samples per micro-batch on each GPU.")
    dp_shards: int = opt(1, "FSDP shards: the transformer's weights, gradients and optimizer state are split this "
                            "many ways (times --cp-degree, whose ranks FSDP2 shards over too).")
    num_samples: int = opt(1000, "Dataset size for the disk estimate.")
    layerwise_upcasting_modules: list[str] = opt([], "transformer: fp8 storage of the frozen base, as `ft train "
                                                     "--layerwise-upcasting-modules` (its cast layers at 1 byte per "
                                                     "weight).")
    layerwise_upcasting_storage_dtype: str = opt("float8_e4m3fn", "float8_e4m3fn or float8_e5m2.")
    layerwise_upcasting_skip_modules_pattern: list[str] = opt(list(FP8_SKIP), "Modules kept in "
                                                                              "--transformer-dtype, as in ft train.")
    offload_blocks: int = opt(0, "Transformer blocks whose frozen weights stay in CPU memory, as `ft train "
                                 "--offload-blocks` (LoRA, gradient checkpointing).")
    compile_modules: list[str] = opt([], "transformer: as `ft train --compile-modules` (adds nothing counted).")
    cp_degree: int = opt(1, "Context-parallel GPUs each sample's sequence is split over, as `ft train --cp-degree`: "
                            "each holds 1/N of the video tokens' activations; the text stays whole on each. The "
                            "weights, gradients and optimizer state stay whole with --dp-shards 1 (the cp ranks "
                            "are DDP replicas), and with --dp-shards S > 1 are sharded S x N ways (FSDP2 over the "
                            "shard and cp ranks together).")
    cp_mode: str | None = opt(None, "ring or ulysses, as `ft train --cp-mode`. Default: ulysses where the degree "
                                    "divides the head count, else ring.")
    activation_offload: bool = opt(False, "Every checkpointed block's input in pinned CPU memory, as `ft train "
                                          "--activation-offload` (with --gradient-checkpointing).")

    def __post_init__(self) -> None:
        check_choice(self.training_type, TRAINING_TYPES, "training_type")
        check_choice(self.transformer_dtype.lower(), DTYPE_NAMES, "transformer_dtype")
        check_choice(self.master_dtype, MASTER_DTYPES, "master_dtype")
        check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        for name in ("rank", "batch_size", "dp_shards", "num_samples", "cp_degree"):
            check_positive(getattr(self, name), name)
        check_fp8_args(self.layerwise_upcasting_modules, self.layerwise_upcasting_storage_dtype, self.training_type,
                       self.layerwise_upcasting_skip_modules_pattern)
        from ft.train.offload import check_args as check_offload_args

        check_offload_args(self.offload_blocks, self.training_type, gradient_checkpointing=True)
        if self.offload_blocks and self.dp_shards > 1:
            raise UserError("--offload-blocks: ft train offloads in one process only; leave out --dp-shards.")
        for module in self.compile_modules:  # as ft train refuses them
            if module not in COMPILE_MODULES:
                raise UserError(f"--compile-modules {module}: ft train loads only the transformer; pass "
                                "--compile-modules transformer.")
        if self.layerwise_upcasting_modules and self.dp_shards > 1:
            raise UserError("--layerwise-upcasting-modules: ft train stores the base in fp8 in one process only; "
                            "leave out --dp-shards.")
        if self.cp_mode is not None:
            check_choice(self.cp_mode, CP_MODES, "cp_mode")
            if self.cp_degree == 1:
                raise UserError(f"--cp-mode {self.cp_mode}: nothing is split at --cp-degree 1; add --cp-degree N (the "
                                "GPUs each sequence is split over), or leave --cp-mode out.")
        if self.cp_degree > 1:  # several processes: what ft train keeps to one process is refused as it refuses it
            for flag, used in (("--offload-blocks", self.offload_blocks), ("--layerwise-upcasting-modules",
                                                                           self.layerwise_upcasting_modules)):
                if used:
                    raise UserError(f"{flag} with --cp-degree {self.cp_degree}: ft train does that in one process "
                                    "only, and context parallelism runs one process per GPU; leave one out.")

    def mode(self, heads: int, modes: tuple[str, ...] = CP_MODES) -> str:
        """The context-parallel mode: --cp-mode, or ft train's default for this head count and the family's plan."""
        return self.cp_mode or default_cp_mode(heads, self.cp_degree, modes)


@dataclass
class Component:
    name: str
    cls: str
    params: int


@dataclass
class BucketEstimate:
    bucket: str
    latent_shape: tuple[int, int, int, int]  # (channels, frames, height, width) of the stored posterior
    cond_shapes: dict[str, tuple[int, ...]]
    video_tokens: int
    text_tokens: int
    activations_checkpointed: float  # bytes on each GPU, as configured (cp degree, activation offload)
    activations_full: float
    disk_per_sample: int
    activations_cpu: float = 0.0  # pinned CPU memory, with --activation-offload
    cp_attention: float = 0.0  # the context-parallel attention's own buffers (within the activations)
    cp_sequences: dict[str, int] = field(default_factory=dict)  # what a cp split cuts (ModelSpec.cp_sequences)


@dataclass
class Estimate:
    """All numbers in bytes (parameters as counts); `report()` prints them in GB."""

    family: str
    source: str
    config: EstimateConfig
    components: list[Component]
    trainable_params: int
    train_static: dict[str, float]
    buckets: list[BucketEstimate]
    offloaded_bytes: float = 0.0  # in CPU memory, with --offload-blocks
    block_bytes: list[float] | None = None  # frozen bytes of each block as stored (LoRA: what offloading can move)
    activations: ActivationModel | None = None  # the transformer's shape, for the layouts the report proposes

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def has(self, name: str) -> bool:
        return any(c.name == name for c in self.components)

    @property
    def precompute_bytes(self) -> float:
        return sum(c.params for c in self.components if c.name != "transformer") * BF16

    @property
    def train_static_bytes(self) -> float:
        return sum(self.train_static.values())

    def report(self) -> str:
        cfg = self.config
        what = f"LoRA rank {cfg.rank}" if cfg.training_type == "lora" else "full finetune"
        mode = cfg.mode(self.activations.heads) if self.activations else None
        lines = [f"{self.family} from {self.source}: {what}, batch {cfg.batch_size} per GPU"
                 + (f", FSDP over {cfg.dp_shards} shards" if cfg.dp_shards > 1 else "")
                 + (f", each sequence split over {cfg.cp_degree} GPUs ({mode})" if cfg.cp_degree > 1 else "")
                 + (", activation offload" if cfg.activation_offload else ""), "",
                 "| component | class | parameters | bf16 weights | held by |", "|---|---|---|---|---|"]
        for c in self.components:
            stage = "train" if c.name == "transformer" else "precompute"
            lines.append(f"| {c.name} | {c.cls} | {c.params / 1e9:.3f}B | {c.params * BF16 / GB:.2f} GB | {stage} |")
        if cfg.training_type == "lora":
            lines.append(f"| LoRA r{cfg.rank} | peft | {self.trainable_params / 1e6:.1f}M | "
                         f"{self.trainable_params * BF16 / GB:.2f} GB | train |")
        lines += ["", "| stage | holds | GB per GPU |", "|---|---|---|",
                  f"| precompute | text encoders + VAE{' + image encoder' * self.has('image_encoder')} (bf16) | "
                  f"{self.precompute_bytes / GB:.2f} |"]
        lines += [f"| train | {name} | {b / GB:.2f} |" for name, b in self.train_static.items()]
        lines += [f"| train | **static total** | **{self.train_static_bytes / GB:.2f}** |",
                  f"| all-in-one trainer | the same plus the encoders | "
                  f"{(self.train_static_bytes + self.precompute_bytes) / GB:.2f} |", "",
                  "| bucket | tokens (video + text) | activations, checkpointing on / off | train peak, checkpointing "
                  f"on / off | fits (checkpointing on / off) | disk per sample | disk for {cfg.num_samples} samples |",
                  "|---|---|---|---|---|---|---|"]
        for b in self.buckets:
            on, off = self.peak(b, True), self.peak(b, False)
            needs = cfg.offload_blocks or cfg.activation_offload  # both need checkpointing
            off_text = "n/a (offloading needs checkpointing)" if needs else f"{off / GB:.2f} GB"
            fits = f"{_sizes(self.fits(b, True))} / {'-' if needs else _sizes(self.fits(b, False))}"
            lines.append(f"| {b.bucket} | {b.video_tokens} + {b.text_tokens} | {b.activations_checkpointed / GB:.2f} / "
                         f"{b.activations_full / GB:.2f} GB | {on / GB:.2f} / {off_text} | {fits} | "
                         f"{b.disk_per_sample / 1e6:.2f} MB | {b.disk_per_sample * cfg.num_samples / GB:.2f} GB |")
        for b in self.buckets:
            for gib in GPU_SIZES_GIB:
                n = self.offload_to_fit(b, gib) if gib not in self.fits(b, True) else None
                if n is not None and n != cfg.offload_blocks and cfg.dp_shards == cfg.cp_degree == 1:  # one process
                    lines += ["", f"{b.bucket} fits {gib} GB cards with --offload-blocks {n} (and "
                              "--gradient-checkpointing)."]
                    break
        lines += self.sequence_lines()
        if self.offloaded_bytes:
            lines += ["", f"--offload-blocks {cfg.offload_blocks}: {self.offloaded_bytes / GB:.2f} GB of frozen "
                      "weights in pinned CPU memory (besides the process's own)."]
        if cfg.compile_modules:
            lines += ["", "--compile-modules: torch.compile adds no weights or states; not counted."]
        lines += ["", "Activations are an estimate (see `ft.cli.estimate`); a card fits when the peak is at "
                  f"most {1 - FIT_HEADROOM:.0%} of it. bench/gpu.sh measures the peak."]
        return "\n".join(lines)

    def sequence_lines(self) -> list[str]:
        """What context parallelism and activation offload hold, and for the buckets that do not fit a card, the
        least of them that makes each fit."""
        cfg, model, lines = self.config, self.activations, []
        if model is None:
            return lines
        for b in self.buckets:
            if cfg.cp_degree > 1:
                lines += ["", f"--cp-degree {cfg.cp_degree} ({cfg.mode(model.heads)}), {b.bucket}: each GPU holds "
                          f"{b.video_tokens // cfg.cp_degree} of the {b.video_tokens} video tokens and the "
                          f"{b.text_tokens} text tokens in every block, plus {b.cp_attention / GB:.2f} GB of the "
                          "attention's own buffers (counted in the activations); "
                          + (f"weights, gradients and optimizer state are sharded over the {cfg.dp_shards} x "
                             f"{cfg.cp_degree} ranks of --dp-shards x --cp-degree." if cfg.dp_shards > 1 else
                             "weights, gradients and optimizer state are whole on each (with --dp-shards 1 the cp "
                             "ranks are DDP replicas; --dp-shards N shards them over N x the cp degree).")]
            if cfg.activation_offload:
                rounded = model.layers * pinned_allocation(b.activations_cpu / model.layers)
                lines += ["", f"--activation-offload, {b.bucket}: {b.activations_cpu / GB:.2f} GB of the blocks' "
                          "inputs in pinned CPU memory per GPU and micro-batch (besides the process's own); the GPU "
                          "keeps one block's recompute and its input copied back. torch's pinned allocator rounds "
                          f"each block's up to a power of two by default ({rounded / GB:.2f} GB); "
                          f"{PINNED_EXACT} allocates them exact."]
        rows = [(b, [self.layouts_to_fit(b, gib) for gib in GPU_SIZES_GIB]) for b in self.buckets]
        if any(cell for _, cells in rows for cell in cells):
            lines += ["", "What makes a bucket fit a card (one sample's sequence; one process per GPU):", "",
                      f"| bucket | {' | '.join(f'{gib} GB' for gib in GPU_SIZES_GIB)} |",
                      f"|---|{'---|' * len(GPU_SIZES_GIB)}"]
            lines += [f"| {b.bucket} | {' | '.join(cell or 'fits' for cell in cells)} |" for b, cells in rows]
        return lines

    def smallest_cp_degree(self, bucket: BucketEstimate, gib: int, offload: bool) -> tuple[int, str] | None:
        """The smallest cp degree (from this run's, up to MAX_CP_DEGREE) and its mode with which `bucket` fits a
        `gib` GiB card, with or without activation offload; None when none does."""
        cfg, model = self.config, self.activations
        assert model is not None
        for n in range(cfg.cp_degree, MAX_CP_DEGREE + 1):
            mode = cfg.cp_mode or default_cp_mode(model.heads, n, model.cp_modes)
            if mode in model.cp_modes and cp_problem(n, mode, model.heads, bucket.cp_sequences) is None:
                on_gpu, _ = model.bytes(bucket.video_tokens, bucket.text_tokens, True, n, mode, offload)
                if self.train_static_bytes + on_gpu <= (1 - FIT_HEADROOM) * gib * GIB:
                    return n, mode
        return None

    def layouts_to_fit(self, bucket: BucketEstimate, gib: int) -> str:
        """'' when `bucket` fits a `gib` GiB card as configured (checkpointing on); else the least that makes it
        fit: the smallest cp degree with this run's offload setting, and the smallest with activation offload
        when that takes fewer GPUs; or why nothing up to MAX_CP_DEGREE does."""
        cfg = self.config
        if gib in self.fits(bucket, True):
            return ""
        found = []
        plain = self.smallest_cp_degree(bucket, gib, cfg.activation_offload)
        with_offload = None if cfg.activation_offload else self.smallest_cp_degree(bucket, gib, True)
        if with_offload and (plain is None or with_offload[0] < plain[0]):
            n, mode = with_offload
            found.append("--activation-offload" + (f" --cp-degree {n} ({mode})" if n > 1 else ""))
        if plain:
            n, mode = plain
            found.append(f"--cp-degree {n} ({mode})" + (" --activation-offload" if cfg.activation_offload else ""))
        if found:
            return ", or ".join(found)
        if cfg.dp_shards == cfg.cp_degree == 1 and self.activations is not None:  # one GPU: the weights of n
            offloaded, _ = self.activations.bytes(bucket.video_tokens, bucket.text_tokens, True, offload=True)
            n = self.offload_to_fit(bucket, gib, offloaded)  # blocks and the activations in CPU memory
            if n:
                return ("" if cfg.activation_offload else "--activation-offload ") + f"--offload-blocks {n}"
        if self.train_static_bytes > (1 - FIT_HEADROOM) * gib * GIB:
            return (f"no cp degree: the weights and optimizer state alone are {self.train_static_bytes / GB:.1f} GB "
                    "per GPU (see --offload-blocks, fp8 storage, --dp-shards)")
        return f"no cp degree up to {MAX_CP_DEGREE}, with or without --activation-offload"

    def peak(self, bucket: BucketEstimate, checkpointing: bool) -> float:
        """Static bytes plus the bucket's activations."""
        return self.train_static_bytes + (bucket.activations_checkpointed if checkpointing else bucket.activations_full)

    def offload_to_fit(self, bucket: BucketEstimate, gib: int, activations: float | None = None) -> int | None:
        """The fewest --offload-blocks with which `bucket` fits a `gib` GiB card (checkpointing on; with these
        `activations` on the GPU, or the run's); None when even every block offloaded does not."""
        if not self.block_bytes:
            return None
        moved = sum(v for k, v in self.train_static.items() if "offloaded blocks" in k)  # this run's own offload
        base = self.train_static_bytes - moved + (
            bucket.activations_checkpointed if activations is None else activations)
        for n in range(len(self.block_bytes) + 1):
            tail = self.block_bytes[len(self.block_bytes) - n:] if n else []
            if base - sum(tail) + sum(sorted(tail, reverse=True)[:IN_FLIGHT]) <= (1 - FIT_HEADROOM) * gib * GIB:
                return n
        return None

    def fits(self, bucket: BucketEstimate, checkpointing: bool = True) -> list[int]:
        """The GPU sizes (GiB, of GPU_SIZES_GIB) this configuration fits, the headroom kept free."""
        return [gib for gib in GPU_SIZES_GIB if self.peak(bucket, checkpointing) <= (1 - FIT_HEADROOM) * gib * GIB]


# ---------------------------------------------------------------------------------------------- building


def _build(module: str, cls_name: str, config: dict[str, Any]) -> Any:
    """The model on the meta device: exact parameters, no memory."""
    import importlib

    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(module), cls_name)
    with init_empty_weights():
        model = cls(cls.config_class(**config)) if module == "transformers" else cls.from_config(config)
    if module == "transformers":
        # init_empty_weights leaves the embedding ties unmade: without this a T5 encoder counts its vocabulary
        # twice (shared and encoder.embed_tokens: +1.05B for UMT5-XXL, +0.13B for T5-XXL)
        model.tie_weights()
    return model


def _read_config(spec: ModelSpec, folder: Path, component: str) -> dict[str, Any]:
    path = folder / component / "config.json"
    if not path.is_file():
        raise UserError(f"--pretrained {folder}: no {component}/config.json; pass a diffusers folder of the family "
                        "or a known checkpoint name.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--pretrained {folder}: {path} is not readable JSON ({e}); download that config "
                        "again.") from e
    if not isinstance(data, dict):
        raise UserError(f"--pretrained {folder}: {path} is not a config (a JSON object); download it again.")
    spec.check_component_class(component, data, str(path.parent))
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype",
                                                                                   "dtype", "transformers_version")}


def model_components(spec: ModelSpec, configs: dict[str, Any] | None = None) -> dict[str, tuple[str, str]]:
    """The components that have weights (the transformer, the VAE, the text encoders, and the image encoder of an
    image-to-video checkpoint whose `configs` hold one), by name."""
    found = {name: cls for name, cls in spec.component_classes.items() if not is_processor(name)}
    return found | {name: cls for name, cls in spec.image_component_classes.items()
                    if configs is not None and name in configs}


def _configs(spec: ModelSpec, pretrained: str) -> tuple[str, dict[str, dict[str, Any]]]:
    checkpoint = spec.find_checkpoint(pretrained)
    if checkpoint is not None:
        return f"{checkpoint.display_name} (built-in configs)", checkpoint.configs
    folder = Path(pretrained)
    if folder.is_dir():
        configs = {c: _read_config(spec, folder, c) for c in model_components(spec)}
        configs |= {c: _read_config(spec, folder, c) for c in spec.image_component_classes
                    if (folder / c / "config.json").is_file()}  # an image-to-video checkpoint's image encoder
        spec.check_pretrained(str(folder))
        if spec.has_experts:  # a two-expert Wan 2.2: its transformer/ stands for either expert (the same config)
            from ft.pipelines.wan_experts import read_split

            if read_split(str(folder)) is not None:
                return f"{folder} (one expert: each of its two transformers trains as its own run)", configs
        return str(folder), configs
    raise UserError(f"--pretrained {pretrained}: not a local folder nor a checkpoint ft knows the configs of "
                    f"({', '.join(c.names[0] for c in spec.checkpoints)}). Download its configs (no weights needed) "
                    "and pass the folder.")


def _lora_params(transformer: Any, rank: int, targets: list[str]) -> int:
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=peft_targets(targets)))
    return sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)


def _fp8_params(transformer: Any, cfg: EstimateConfig) -> int:
    """Parameters `ft train` stores in fp8: diffusers' layerwise casting applied to the meta-device transformer
    (LoRA already added) exactly as ft train applies it (train/fp8.py), then counted."""
    import torch

    from ft.train.fp8 import apply_fp8_storage

    apply_fp8_storage(transformer, cfg.layerwise_upcasting_storage_dtype, torch.bfloat16,
                      cfg.layerwise_upcasting_skip_modules_pattern)
    return sum(p.numel() for p in transformer.parameters() if p.element_size() == 1)


def conditioning_shapes(spec: ModelSpec, transformer_config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The conditioning one sample stores at the family's default text length: name -> (shape, dtype name)."""
    length = spec.default_sequence_length(transformer_config)
    return {t.name: (t.shape(transformer_config, length), t.dtype) for t in spec.conditioning}


def _sizes(gibs: list[int]) -> str:
    return ", ".join(f"{g} GB" for g in gibs) if gibs else f"none of {'/'.join(map(str, GPU_SIZES_GIB))} GB"


def _block_bytes(spec: ModelSpec, transformer: Any, weight_bytes: int) -> list[float]:
    """Each block's frozen parameters in bytes, as stored (after LoRA and fp8 storage were applied): what
    --offload-blocks moves. The meta-device model is built in fp32: a weight fp8 storage did not cast is counted
    at `weight_bytes` (--transformer-dtype's), as ft train holds it."""
    return [float(sum(p.numel() * (1 if p.element_size() == 1 else weight_bytes) for p in b.parameters()
                      if not p.requires_grad)) for b in transformer_blocks(transformer, spec.block_lists)]


def _offloaded(block_bytes: list[float], n: int) -> tuple[float, float]:
    """(bytes that leave the GPU, bytes of the IN_FLIGHT largest of those blocks, on it at a time) for the last n."""
    sizes = [block_bytes[i] for i in offloaded_indices(len(block_bytes), n)]
    return sum(sizes), sum(sorted(sizes, reverse=True)[:IN_FLIGHT])


# ---------------------------------------------------------------------------------------------- sizes


def latent_grid(vae: Any, transformer_config: dict, bucket: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(latent channels, latent frames, latent height, latent width) of a bucket, from the VAE's compression."""
    frames, height, width = bucket
    vc = vae.config
    spatial = getattr(vae, "spatial_compression_ratio", None) or 2 ** (len(vc.block_out_channels) - 1)
    temporal = (vc.get("temporal_compression_ratio") or getattr(vae, "temporal_compression_ratio", None)
                or vc.get("scale_factor_temporal", 1))  # the last: Wan's config name
    if height % spatial or width % spatial or (frames - 1) % temporal:
        raise UserError(f"--buckets {bucket_name(*bucket)}: this VAE takes {temporal}k+1 frames and sizes that "
                        f"are multiples of {spatial}.")
    channels = vc.get("latent_channels") or vc["z_dim"]  # z_dim: Wan's name
    return channels, (frames - 1) // temporal + 1, height // spatial, width // spatial


def disk_per_sample(latent_shape: tuple[int, ...], cond: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """Bytes one sample takes in a shard: the posterior (mean, logvar), the conditioning and the JSON, as written."""
    import torch

    from ft.common.shards import ShardWriter

    latents = {"mean": torch.zeros(latent_shape, dtype=torch.bfloat16),
               "logvar": torch.zeros(latent_shape, dtype=torch.bfloat16)}
    conds = {name: torch.zeros(shape, dtype=getattr(torch, dtype)) for name, (shape, dtype) in cond.items()}
    meta = {"caption": "x" * 200, "source": "videos/" + "x" * 40 + ".mp4", "fps": 24.0,
            "frame_indices": list(range(latent_shape[1] * 4)), "bucket": [1, 1, 1], "latent_shape": list(latent_shape)}
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(tmp, max_samples=1)
        writer.write("0" * 32, {"latents": latents, "cond": conds}, meta)
        with tarfile.open(Path(tmp) / writer.completed[0].name) as tar:  # the members with their headers; the
            return sum(512 + -(-m.size // 512) * 512 for m in tar.getmembers())  # tar's end is paid once a shard


def estimate(cfg: EstimateConfig) -> Estimate:
    """Build the components on the meta device and compute every number of the report."""
    spec = get_spec(cfg.model)
    if Path(cfg.pretrained).is_dir():  # a local folder: the checkpoint's own spec (HunyuanVideo-I2V's)
        spec = spec.for_checkpoint(ModelArgs(model=cfg.model, pretrained=cfg.pretrained))
    else:
        spec = spec.for_checkpoint_name(cfg.pretrained)
    source, configs = _configs(spec, cfg.pretrained)
    modules = {name: _build(*cls, configs[name]) for name, cls in model_components(spec, configs).items()}
    components = [Component(name, type(m).__name__, sum(p.numel() for p in m.parameters()))
                  for name, m in modules.items()]
    transformer = modules["transformer"]
    tconfig = dict(transformer.config)
    params = next(c.params for c in components if c.name == "transformer")
    blocks = transformer_blocks(transformer, spec.block_lists)
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    # FSDP2 shards over "shard" x cp flattened (train/parallel.py): the cp ranks split the weights further; with
    # --dp-shards 1 the cp ranks join DDP's replicas, and each holds the weights whole
    shards = cfg.dp_shards * cfg.cp_degree if cfg.dp_shards > 1 else 1
    gathered = 2 * block * BF16 if shards > 1 else 0
    weights = DTYPE_NAMES[cfg.transformer_dtype.lower()]
    base = ELEMENT_BYTES[weights]
    if cfg.training_type == "lora":
        trainable = _lora_params(transformer, cfg.rank, spec.default_lora_targets)
        master = "float32"
        cast = _fp8_params(transformer, cfg) if cfg.layerwise_upcasting_modules else 0
        static = {f"transformer weights ({SHORT[weights]}, frozen)": (params - cast) * base / shards}
        if cast:
            static[f"transformer weights ({cfg.layerwise_upcasting_storage_dtype}, frozen)"] = cast
        static["LoRA weights (fp32)"] = trainable * ELEMENT_BYTES[master] / shards
        block_bytes = _block_bytes(spec, transformer, base)
        if cfg.offload_blocks:
            offloaded, in_flight = _offloaded(block_bytes, cfg.offload_blocks)
            static[f"frozen weights of {cfg.offload_blocks} offloaded blocks, in CPU memory"] = -offloaded
            static[f"offloaded blocks in flight ({min(IN_FLIGHT, cfg.offload_blocks)} on the GPU at once)"] = in_flight
    else:
        trainable = params
        master = weights if cfg.master_dtype == "auto" else "float32"  # fp32: loaded in fp32, autocast computes
        static = {f"transformer weights ({SHORT[master]}, trained)": params * ELEMENT_BYTES[master] / shards}
    moment = 1 if cfg.optimizer == "adamw-8bit" else ELEMENT_BYTES[master]
    what = "LoRA " if cfg.training_type == "lora" else ""
    static[f"{what}gradients ({SHORT[master]})"] = trainable * ELEMENT_BYTES[master] / shards
    static[f"{what}{cfg.optimizer} moments ({'8-bit' if moment == 1 else SHORT[master]})"] = (
        trainable * 2 * moment / shards)
    if gathered:
        static["two blocks gathered by FSDP (bf16)"] = gathered
    hidden, mlp_ratio = hidden_and_mlp_ratio(tconfig)
    heads = int(tconfig.get("num_attention_heads", 1))
    model = ActivationModel(len(blocks), hidden, mlp_ratio, heads, cfg.batch_size, spec.cp_modes)
    mode = cfg.mode(heads, spec.cp_modes)
    if cfg.cp_degree > 1:  # what ft train refuses of the family before it loads a weight
        from ft.train.context_parallel import check_cp_family

        check_cp_family(spec, cfg.cp_degree, mode)
    cond = conditioning_shapes(spec, tconfig)
    text_tokens = spec.default_sequence_length(tconfig)
    vae_config = dict(modules["vae"].config)
    out = []
    for name in cfg.buckets or spec.default_buckets:
        grid = latent_grid(modules["vae"], tconfig, parse_bucket(name))
        tokens = video_tokens(tconfig, grid)
        sequences = spec.cp_sequences(parse_bucket(name), vae_config, tconfig, text_tokens)
        problem = cp_problem(cfg.cp_degree, mode, heads, sequences)
        if problem:
            ring = ("" if mode == "ring" or "ring" not in spec.cp_modes
                    else f"; under ring: {', '.join(map(str, cp_degrees('ring', heads, sequences)))}")
            raise UserError(f"--cp-degree {cfg.cp_degree} --cp-mode {mode}: bucket {name} cannot be split, "
                            f"{problem}. Degrees up to {MAX_CP_DEGREE} that split it under {mode}: "
                            f"{', '.join(map(str, cp_degrees(mode, heads, sequences))) or 'none'}{ring}.")
        on_gpu, on_cpu = model.bytes(tokens, text_tokens, True, cfg.cp_degree, mode, cfg.activation_offload)
        full, _ = model.bytes(tokens, text_tokens, False, cfg.cp_degree, mode)
        out.append(BucketEstimate(name, grid, {k: shape for k, (shape, _) in cond.items()}, tokens, text_tokens,
                                  on_gpu, full, disk_per_sample(grid, cond), on_cpu,
                                  model.attention_buffers(tokens + text_tokens, cfg.cp_degree, mode), sequences))
    offloaded_bytes = -sum(v for k, v in static.items() if "offloaded blocks, in CPU" in k)
    return Estimate(spec.display_name, source, cfg, components, trainable, static, out, offloaded_bytes,
                    block_bytes if cfg.training_type == "lora" else None, model)


def run_estimate(cfg: EstimateConfig) -> Estimate:
    """`ft estimate`: compute and print."""
    result = estimate(cfg)
    print(result.report())
    return result

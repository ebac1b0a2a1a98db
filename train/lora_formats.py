"""The LoRA files ft writes and reads: diffusers' layout, and the family's original layout that ComfyUI loads.

Written (the run's result, each LoRA checkpoint's, `ft export`), as `--lora-format` says (`both` by default):
- diffusers: `pytorch_lora_weights.safetensors` (the name `pipe.load_lora_weights(folder)` looks for), keys
  `transformer.<module>.lora_A.weight` / `.lora_B.weight`, the adapter config in `lora_adapter_metadata`, as the
  pipeline's `save_lora_weights` writes it;
- comfyui: `lora_comfyui.safetensors`, the family's original layout (`ModelSpec.original_layout`,
  ft.pipelines.lora_keys): `diffusion_model.<original module>.lora_A.weight` / `.lora_B.weight` with alpha folded
  into lora_B (B * alpha / rank, no `.alpha` key: ComfyUI and diffusers' readers then apply B @ A * alpha / rank,
  what ft trained); a fused module (HunyuanVideo's img_attn_qkv) is one exact LoRA of its parts, whose ranks are
  recorded in the metadata (`ft.fused_ranks`) so ft reads it back into its parts. Not one key of the
  diffusers file's `lora_adapter_metadata`: diffusers would take its rank and alpha for the folded weights;
- kohya (`lora_kohya.safetensors`, families whose layout has one: Wan, musubi-tuner's layout):
  `lora_unet_<original module, _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha` (not folded).
Every file's metadata says what it is: `ft.*` (family, base model, rank, alpha, target modules, steps, layout,
version) and the `ss_*` / `modelspec.*` keys that LoRA viewers (ComfyUI managers', the hub's) show. A module of
`--target-modules` that the original layout has no key for is refused when the run starts (`LoraPlan.make`).

Read (`ft generate --lora`, `ft train --init-lora`): any of these layouts, from ft or another tool
(diffusion-pipe, ai-toolkit, musubi-tuner), resolved against the transformer's own module names
(`lora_keys.resolve`); an unknown layout is one message listing the layouts ft reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.common import __version__
from ft.common.errors import UserError
from ft.pipelines.base import ModelSpec, peft_targets
from ft.pipelines.lora_keys import (
    DIFFUSERS_PREFIX,
    KOHYA_PREFIX,
    LAYOUTS_READ,
    LoraPair,
    from_original,
    original_index,
    resolve,
    to_original,
)

from .weights_io import LORA_WEIGHTS_NAME, write_aside

LORA_FORMATS = ("both", "diffusers", "comfyui", "kohya")
FILE_NAMES = {"diffusers": LORA_WEIGHTS_NAME, "comfyui": "lora_comfyui.safetensors",
              "kohya": "lora_kohya.safetensors"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' (LORA_ADAPTER_METADATA_KEY)
SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
            (".lora_up.weight", "up"), (".alpha", "alpha"))


def formats_of(choice: str) -> tuple[str, ...]:
    """`--lora-format` -> the layouts written, in order (the first is the result a run reports)."""
    return ("diffusers", "comfyui") if choice == "both" else (choice,)


def lora_modules(transformer: Any) -> dict[str, int]:
    """The modules a LoRA can adapt (Linear, Conv) by diffusers name, with their output rows."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {name: getattr(m, "out_features", None) or m.out_channels for name, m in transformer.named_modules()
            if isinstance(m, kinds) and ".lora_" not in name and not name.endswith(".base_layer")}


def config_modules(spec: ModelSpec, transformer_config: dict) -> dict[str, int]:
    """`lora_modules` of the family's transformer built from its config on the meta device (no memory, no
    weights): what a run adapts, known before any weight loads."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = spec.component_class("transformer").from_config(transformer_config)
    return lora_modules(model)


def lora_config_dict(rank: int, alpha: float, target_modules: list[str]) -> dict[str, Any]:
    """The adapter config peft makes for the run, as diffusers stores it (`lora_adapter_metadata`)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=peft_targets(target_modules))
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def adapted_modules(modules: dict[str, int], rank: int, alpha: float, target_modules: list[str]) -> list[str]:
    """The modules peft puts the run's adapter on (its own matching of `--target-modules`)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=peft_targets(target_modules))
    return [m for m in modules if check_target_module_exists(config, m)]


@dataclass
class LoraPlan:
    """What a LoRA run writes (and starts from): checked when the run starts, before any weight loads."""

    spec: ModelSpec
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str
    formats: tuple[str, ...]
    modules: dict[str, int]  # every LoRA-able module of the transformer, with its output rows
    adapted: list[str]
    init: dict[str, LoraPair] | None = field(default=None, repr=False)  # --init-lora, by diffusers module

    @classmethod
    def make(cls, spec: ModelSpec, transformer_config: dict, rank: int, alpha: float, target_modules: list[str],
             base_model: str, lora_format: str, init_lora: str | None = None) -> LoraPlan:
        """Check that every adapted module has a key in each layout written (naming those that do not) and read
        --init-lora; raises UserError."""
        targets = target_modules or spec.default_lora_targets
        modules = config_modules(spec, transformer_config)
        adapted = adapted_modules(modules, rank, alpha, targets)
        if not adapted:
            raise UserError(f"--target-modules {' '.join(targets)} matches no module of this {spec.display_name} "
                            f"transformer (its modules are named like {next(iter(modules))}).")
        plan = cls(spec, rank, alpha, targets, base_model, formats_of(lora_format), modules, adapted)
        plan.check_layouts()
        if init_lora:
            plan.init = plan.read_init(init_lora)
        return plan

    def check_layouts(self) -> None:
        layout = self.spec.original_layout
        if "kohya" in self.formats and not layout.kohya:
            raise UserError(f"--lora-format kohya: {self.spec.display_name} LoRAs have no kohya layout ft writes "
                            "(Wan's, musubi-tuner's, is the one); use comfyui, diffusers or both.")
        if set(self.formats) - {"diffusers"}:
            missing = [(m, layout.why_not(m)) for m in self.adapted if layout.why_not(m)]
            if missing:
                listing = "; ".join(f"{m} ({why})" for m, why in missing[:5])
                raise UserError(f"--lora-format {'/'.join(self.formats)}: {len(missing)} adapted module(s) have no "
                                f"key in {layout.description}'s layout, which ComfyUI reads: {listing}. Leave them "
                                "out of --target-modules, or write --lora-format diffusers only.")

    def read_init(self, path: str) -> dict[str, LoraPair]:
        """--init-lora's adapters, checked against the run's: the same modules (or fewer) at --rank."""
        pairs = read_lora(self.spec, find_lora_file(path, "--init-lora"), self.modules, "--init-lora")[1]
        extra = sorted(set(pairs) - set(self.adapted))
        if extra:
            raise UserError(f"--init-lora {path} adapts {len(extra)} module(s) this run's --target-modules do not "
                            f"(e.g. {extra[0]}); give --target-modules that include them.")
        ranks = sorted({p.rank for p in pairs.values()})
        if ranks != [self.rank]:
            raise UserError(f"--init-lora {path} has rank {', '.join(map(str, ranks))}, this run --rank {self.rank}; "
                            f"continue it with --rank {ranks[-1]}." if len(ranks) == 1 else
                            f"--init-lora {path} mixes ranks {ranks}; ft trains one --rank.")
        return pairs

    def metadata(self, layout: str, steps: int) -> dict[str, str]:
        """What the file is, in the metadata LoRA viewers show (all strings, as safetensors requires)."""
        family = self.spec.name
        return {"format": "pt", "ft.layout": layout, "ft.family": family, "ft.base_model": self.base_model,
                "ft.rank": str(self.rank), "ft.alpha": f"{self.alpha:g}",
                "ft.target_modules": json.dumps(self.target_modules), "ft.steps": str(steps),
                "ft.version": __version__, "ss_network_dim": str(self.rank), "ss_network_alpha": f"{self.alpha:g}",
                "ss_steps": str(steps), "ss_base_model_version": family, "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": f"{family}/lora", "modelspec.implementation": layout,
                "modelspec.title": f"{self.spec.display_name} LoRA (rank {self.rank}, {steps} steps)"}

    def files(self, peft_state: dict[str, Any], steps: int) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
        """Each layout's file name -> (tensors, metadata), from the adapter's weights in peft's names."""
        pairs = pairs_from_peft(peft_state, self.alpha / self.rank)
        out = {}
        for layout in self.formats:
            meta = self.metadata(layout, steps)
            if layout == "diffusers":
                state = {f"{DIFFUSERS_PREFIX}{k}": v for k, v in peft_state.items()}
                config = lora_config_dict(self.rank, self.alpha, self.target_modules)
                meta[METADATA_KEY] = json.dumps({f"{DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}, indent=2,
                                                sort_keys=True)
            else:
                state, ranks = original_state(self.spec, pairs, self.modules, layout)
                meta["ft.fused_ranks"] = json.dumps(ranks)
                meta["ft.alpha_folded"] = "yes: lora_B is B * alpha / rank" if layout == "comfyui" else "no: .alpha"
            out[FILE_NAMES[layout]] = (state, meta)
        return out

    def write(self, out_dir: str | Path, peft_state: dict[str, Any], steps: int) -> Path:
        """Write each layout's file into `out_dir` (each aside, then renamed); returns the first. A failure on one
        removes those this call wrote before it, so no set is left half-written."""
        from safetensors.torch import save_file

        written: list[Path] = []
        try:
            for name, (state, meta) in self.files(peft_state, steps).items():
                written.append(write_aside(Path(out_dir) / name,
                                           lambda tmp, s=state, m=meta: save_file(s, str(tmp), metadata=m)))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return written[0]


def pairs_from_peft(peft_state: dict[str, Any], scale: float) -> dict[str, LoraPair]:
    """peft's `<module>.lora_A.weight` / `.lora_B.weight` -> one pair per module."""
    downs = {k[: -len(".lora_A.weight")]: v for k, v in peft_state.items() if k.endswith(".lora_A.weight")}
    return {m: LoraPair(down, peft_state[f"{m}.lora_B.weight"], scale) for m, down in downs.items()}


def original_state(spec: ModelSpec, pairs: dict[str, LoraPair], modules: dict[str, int], layout: str
                   ) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The tensors of the comfyui (alpha folded) or kohya (`.alpha` kept) file, and the fused part ranks."""
    import torch

    original, ranks = to_original(spec.original_layout, pairs, modules)
    state = {}
    for name, pair in original.items():
        if layout == "comfyui":
            key = spec.original_layout.prefix + name
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = pair.down, pair.folded_up()
        else:
            key = KOHYA_PREFIX + name.replace(".", "_")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = pair.down, pair.up
            state[f"{key}.alpha"] = torch.tensor(pair.scale * pair.rank, dtype=torch.float32)
    return state, ranks


# ---------------------------------------------------------------------------------------------- reading


def find_lora_file(path: str | Path, flag: str) -> Path:
    """A .safetensors file, or the LoRA file in a folder (diffusers', else ComfyUI's, else kohya's)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    for name in FILE_NAMES.values():
        if (path / name).is_file():
            return path / name
    raise UserError(f"{flag} {path}: no LoRA there; give a .safetensors file or a folder holding one of "
                    f"{', '.join(FILE_NAMES.values())} (the --output-dir of `ft train`, or a checkpoint).")


def read_lora(spec: ModelSpec, path: Path, modules: dict[str, int], flag: str) -> tuple[str, dict[str, LoraPair]]:
    """The file's layout and its adapters by diffusers module name (scale: alpha / rank, or 1 without alpha), for
    a transformer with `modules` (`lora_modules`). UserError naming the file for anything ft cannot read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{flag} {path}: not a readable safetensors file ({e}).") from e
    family = metadata.get("ft.family")
    if family and family != spec.name:
        raise UserError(f"{flag} {path}: a LoRA ft trained for --model {family}, not {spec.name}.")
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        kind = next(((key[: -len(s)], k) for s, k in SUFFIXES if key.endswith(s)), None)
        if kind is None:
            raise UserError(f"{flag} {path}: key {key} is no LoRA down/up projection or alpha (bias, DoRA and "
                            f"full-weight diff keys are not read). ft reads: {LAYOUTS_READ}.")
        parts.setdefault(kind[0], {})[kind[1]] = value
    if not parts:
        raise UserError(f"{flag} {path}: the file holds no tensors.")
    layout = spec.original_layout
    index = original_index(layout, list(modules))
    try:
        found = resolve(layout, sorted(parts), list(modules), index, spec.display_name)
    except UserError as e:
        raise UserError(f"{flag} {path}: {e}") from e
    pairs = {}
    for name, tensors in parts.items():
        if "down" not in tensors or "up" not in tensors:
            raise UserError(f"{flag} {path}: {name} lacks its {'up' if 'down' in tensors else 'down'} projection.")
        down = tensors["down"]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else None
        scale = alpha / down.shape[0] if alpha is not None else diffusers_scale(metadata, found.names[name], down)
        pairs[found.names[name]] = LoraPair(down, tensors["up"], scale)
    if found.layout == "diffusers":
        return found.layout, pairs
    try:
        return found.layout, from_original(index, pairs, modules, json.loads(metadata.get("ft.fused_ranks", "null")))
    except UserError as e:
        raise UserError(f"{flag} {path}: {e}") from e


def diffusers_scale(metadata: dict[str, str], module: str, down: Any) -> float:
    """A diffusers-layout module's scale from the file's adapter config (peft's alpha / r, its patterns, rsLoRA);
    1 without one, as diffusers loads such a file."""
    from peft.utils.other import get_pattern_key

    if METADATA_KEY not in metadata:
        return 1.0
    config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in json.loads(metadata[METADATA_KEY]).items()}
    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(list(patterns), module), config.get("lora_alpha", down.shape[0]))
    rank = down.shape[0]
    return float(alpha) / (rank ** 0.5 if config.get("use_rslora") else rank)


def diffusers_state(pairs: dict[str, LoraPair]) -> dict[str, Any]:
    """Adapters as a diffusers-layout state dict with the scales folded in (what load_lora_weights takes)."""
    state = {}
    for module, pair in pairs.items():
        state[f"{DIFFUSERS_PREFIX}{module}.lora_A.weight"] = pair.down
        state[f"{DIFFUSERS_PREFIX}{module}.lora_B.weight"] = pair.folded_up()
    return state


def init_adapters(transformer: Any, pairs: dict[str, LoraPair], rank: int, alpha: float) -> None:
    """Set the run's fresh adapters (`add_lora`) to --init-lora's: the same delta at the run's alpha / rank."""
    import torch

    scale = alpha / rank
    with torch.no_grad():
        for module, pair in pairs.items():
            layer = transformer.get_submodule(module)
            down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if tuple(down.shape) != tuple(pair.down.shape) or tuple(up.shape) != tuple(pair.up.shape):
                raise UserError(f"--init-lora: {module} is {tuple(pair.up.shape)} x {tuple(pair.down.shape)} there, "
                                f"{tuple(up.shape)} x {tuple(down.shape)} in this transformer.")
            down.copy_(pair.down)
            up.copy_(pair.up.float() * (pair.scale / scale))

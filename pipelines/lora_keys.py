"""A LoRA in the module names of a family's original checkpoint (the layout ComfyUI reads), and back.

ft trains adapters on diffusers' modules (`blocks.0.attn1.to_q`). ComfyUI, and the trainers that write for it
(musubi-tuner, diffusion-pipe, ai-toolkit), name modules as the family's original checkpoint does (Wan:
`blocks.0.self_attn.q`; HunyuanVideo: `double_blocks.0.img_attn_qkv`, one fused q/k/v projection). Each family's
ModelSpec names its `OriginalLayout`, made of:
- `Rename`: a diffusers module (a regex over its whole name) and its original name;
- `Fused`: an original module whose output rows are those of several diffusers modules, stacked in order (q, k,
  v; HunyuanVideo's single-stream `linear1` is q, k, v and the MLP's input projection). Its LoRA is one exact LoRA
  made from the parts' adapters: their down-projections stacked, their up-projections block-diagonal, so each
  part's rows get exactly that part's delta (rank: the parts' ranks summed); a part with no adapter gets zero rows;
- `refused`: modules (regex) whose original counterpart no single key can carry, with the reason.
A module that matches none has no counterpart: a run that writes this layout refuses it when it starts.

`to_original` turns adapters keyed by diffusers names into adapters keyed by original names (plus the part ranks
of each fused one, which ft records in the file); `from_original` undoes it: a fused LoRA splits into its parts
by those ranks, or, from another tool (one down-projection shared by the parts), by columns when the parts use
disjoint ones, else each part gets the shared down-projection and its own rows of the up-projection. Either way
each part's delta is the fused delta's rows, exactly. `resolve` tells which layout a LoRA's module names are in
(diffusers', the original with one of the prefixes other tools write, or kohya's `lora_unet_` flattening).
Adapters are `LoraPair`s: delta = scale * up @ down (a convolution's kernel dimensions ride along).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ft.common.errors import UserError

if TYPE_CHECKING:
    import torch

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."


@dataclass(frozen=True)
class Rename:
    """A diffusers module (regex over its whole name) and its original name (a `re` replacement template)."""

    pattern: str
    original: str


@dataclass(frozen=True)
class Fused:
    """An original module (template) whose output rows are the diffusers modules `prefix` + each of `parts`, in
    that order; `prefix` is a regex (its groups fill the template)."""

    prefix: str
    parts: tuple[str, ...]
    original: str


@dataclass(frozen=True)
class Counterpart:
    """Where a diffusers module lives in the original layout: the original module, and for a fused one the
    module's index among the parts and every part's diffusers name (`group`, in row order)."""

    original: str
    index: int | None = None
    group: tuple[str, ...] = ()


@dataclass(frozen=True)
class OriginalLayout:
    """How a family's LoRA is named in its original checkpoint's layout, as ComfyUI reads it."""

    description: str  # for messages and docs: whose layout this is
    prefix: str = "diffusion_model."  # what ft writes in front of each original module name
    renames: tuple[Rename, ...] = ()
    fused: tuple[Fused, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)  # regex over a diffusers module name -> why it has no key
    read_prefixes: tuple[str, ...] = ("diffusion_model.",)  # the prefixes other tools write, read back
    kohya: bool = False  # whether ft writes kohya's `lora_unet_` flattening too (musubi-tuner's layout)

    def counterpart(self, module: str) -> Counterpart | None:
        """The module's place in the original layout; None when it has none (or is refused: `why_not`)."""
        for fused in self.fused:
            for index, part in enumerate(fused.parts):
                match = re.fullmatch(fused.prefix + re.escape(part), module)
                if match:
                    prefix = module[: len(module) - len(part)]
                    return Counterpart(match.expand(fused.original), index, tuple(prefix + p for p in fused.parts))
        if any(re.fullmatch(pattern, module) for pattern in self.refused):
            return None
        for rename in self.renames:
            match = re.fullmatch(rename.pattern, module)
            if match:
                return Counterpart(match.expand(rename.original))
        return None

    def why_not(self, module: str) -> str | None:
        """Why `module` has no LoRA key in this layout, or None when it has one."""
        if self.counterpart(module) is not None:
            return None
        for pattern, reason in self.refused.items():
            if re.fullmatch(pattern, module):
                return reason
        return f"{self.description} has no module it corresponds to"


@dataclass
class LoraPair:
    """One module's adapter: delta = scale * up @ down (down [rank, in, *kernel], up [out, rank, *ones])."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def folded_up(self) -> torch.Tensor:
        """`up` times the scale, in up's dtype (the scale is then 1)."""
        return self.up if self.scale == 1.0 else (self.up.float() * self.scale).to(self.up.dtype)

    def delta(self) -> torch.Tensor:
        """The weight delta in fp32, shaped as the module's weight."""
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        return (self.scale * up @ down).reshape(self.up.shape[0], *self.down.shape[1:])


def to_original(layout: OriginalLayout, pairs: dict[str, LoraPair], out_features: dict[str, int]
                ) -> tuple[dict[str, LoraPair], dict[str, list[int]]]:
    """Adapters keyed by diffusers module names -> keyed by original names (the scales of fused parts folded into
    their rows), and each fused module's part ranks in row order (0: a part without an adapter). `out_features`
    gives the output rows of every part of a fused module."""
    import torch

    out: dict[str, LoraPair] = {}
    groups: dict[str, tuple[tuple[str, ...], dict[str, LoraPair]]] = {}
    for module, pair in pairs.items():
        where = layout.counterpart(module)
        if where is None:
            raise UserError(f"{module}: {layout.why_not(module)}; its LoRA cannot be written in that layout "
                            "(--lora-format diffusers writes it).")
        if where.index is None:
            out[where.original] = pair
        else:
            groups.setdefault(where.original, (where.group, {}))[1][module] = pair
    ranks: dict[str, list[int]] = {}
    for original, (group, present) in groups.items():
        first = next(iter(present.values()))
        rows = [out_features[m] for m in group]
        ranks[original] = [present[m].rank if m in present else 0 for m in group]
        up = torch.zeros(sum(rows), sum(ranks[original]), dtype=first.up.dtype)
        row = col = 0
        for module, height, rank in zip(group, rows, ranks[original], strict=True):
            if rank:
                up[row:row + height, col:col + rank] = present[module].folded_up().reshape(height, rank)
            row, col = row + height, col + rank
        out[original] = LoraPair(torch.cat([present[m].down for m in group if m in present]), up)
    return out, ranks


def original_index(layout: OriginalLayout, modules: list[str]) -> dict[str, Counterpart]:
    """Each original module name the transformer's `modules` have, with where it leads back to."""
    index: dict[str, Counterpart] = {}
    for module in modules:
        where = layout.counterpart(module)
        if where is not None:
            index.setdefault(where.original, Counterpart(module, where.index, where.group))
    return index


def from_original(index: dict[str, Counterpart], pairs: dict[str, LoraPair], out_features: dict[str, int],
                  part_ranks: dict[str, list[int]] | None = None) -> dict[str, LoraPair]:
    """Adapters keyed by original names (found in `index`, from `original_index`) -> keyed by diffusers names."""
    out: dict[str, LoraPair] = {}
    for original, pair in pairs.items():
        where = index[original]
        if where.index is None:
            out[where.original] = pair
            continue
        rows = [out_features[m] for m in where.group]
        if pair.up.shape[0] != sum(rows):
            raise UserError(f"{original}: its LoRA has {pair.up.shape[0]} output rows, this transformer's "
                            f"{' + '.join(map(str, rows))}: it was trained for another model size.")
        ups = pair.up.reshape(pair.up.shape[0], -1).split(rows)
        columns = _part_columns(ups, (part_ranks or {}).get(original))
        for module, up, cols in zip(where.group, ups, columns, strict=True):
            if cols is not None:
                out[module] = LoraPair(pair.down[cols], up[:, cols], pair.scale)
    return out


def _part_columns(ups: tuple[torch.Tensor, ...], ranks: list[int] | None) -> list[Any]:
    """Which columns of the fused LoRA each part keeps (None: the part has no adapter). With the ranks ft
    recorded: its own blocks. Otherwise: each part's nonzero columns when no two parts share one (a block-diagonal
    LoRA written without the record), else every column (a down-projection shared by the parts)."""
    if ranks is not None:
        if len(ranks) != len(ups) or sum(ranks) != ups[0].shape[1]:
            raise UserError(f"the recorded part ranks {ranks} do not fit a fused LoRA of rank {ups[0].shape[1]}.")
        starts = [sum(ranks[:i]) for i in range(len(ranks))]
        return [slice(s, s + r) if r else None for s, r in zip(starts, ranks, strict=True)]
    used = [up.ne(0).any(dim=0) for up in ups]
    if not any(bool(u.any()) for u in used):  # an untrained LoRA: the same (zero) delta either way
        return [slice(None)] * len(ups)
    if int(sum(u.int() for u in used).max()) <= 1:
        return [u.nonzero().flatten() if bool(u.any()) else None for u in used]
    return [slice(None) if bool(u.any()) else None for u in used]


@dataclass(frozen=True)
class Resolved:
    """A LoRA's module names resolved: the layout they are in, and each name's module (diffusers') or original."""

    layout: str  # "diffusers", "comfyui" (the original names, any read prefix) or "kohya"
    names: dict[str, str]


LAYOUTS_READ = ("diffusers: transformer.<diffusers module>.lora_A.weight / .lora_B.weight (ft's, diffusers', "
                "finetrainers'); ComfyUI / original: diffusion_model.<original module>.lora_A.weight / .lora_B"
                ".weight or .lora_down.weight / .lora_up.weight, with an optional .alpha (ft's, diffusion-pipe's, "
                "ai-toolkit's, musubi-tuner's converted ones); kohya / musubi-tuner: lora_unet_<original module "
                "with _ for .>.lora_down.weight / .lora_up.weight / .alpha")


def resolve(layout: OriginalLayout, names: list[str], modules: list[str], index: dict[str, Counterpart],
            display_name: str) -> Resolved:
    """Which layout the module names of a LoRA file (keys without their .lora_A.weight etc.) are in, for a
    transformer with `modules` (diffusers names) whose original names are `index`. Raises UserError naming what
    does not fit."""
    known = set(modules)
    flat = {original.replace(".", "_"): original for original in index}
    candidates = [("diffusers", DIFFUSERS_PREFIX, known, lambda rest: rest)]
    candidates += [("comfyui", prefix, index, lambda rest: rest) for prefix in layout.read_prefixes]
    candidates.append(("kohya", KOHYA_PREFIX, index, lambda rest: flat.get(rest, "")))
    scored = []
    for name, prefix, targets, to_module in candidates:
        found = Resolved(name, {n: to_module(n[len(prefix):]) for n in names if n.startswith(prefix)})
        fits = [n for n, module in found.names.items() if module in targets]
        if len(fits) == len(names):
            return found
        # a layout whose prefix every key has, but whose modules this transformer lacks: another model's LoRA
        every_key = bool(prefix) and len(found.names) == len(names)
        scored.append((len(fits), every_key, found, [n for n in names if n not in fits]))
    fits, every_key, found, misfits = max(scored, key=lambda s: s[:2])
    if not fits and not every_key:
        raise UserError(f"its keys (e.g. {names[0]}) are in no LoRA layout ft reads for {display_name}. ft reads: "
                        f"{LAYOUTS_READ}.")
    raise UserError(f"in the {found.layout} layout, {len(misfits)} of its modules are not in this {display_name} "
                    f"transformer (e.g. {misfits[0]}): it was trained for another model.")

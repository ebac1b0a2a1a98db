"""The model families `ft` knows, by name: a plain dict. An unknown name is an error listing the known ones.

Each family's other spellings of `--model` are its spec's `aliases`; adding a family is its file and one line here.
`per_family` writes a fact of every family for a help text, so the help restates no number a spec holds.
`save_tiny_model` writes a family's toy-size model (`ModelSpec.tiny_components`) as a diffusers folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs

from .base import ModelSpec
from .cogvideox import CogVideoXSpec
from .hunyuan_video import HunyuanVideoSpec
from .hunyuan_video_1_5 import HunyuanVideo15Spec
from .loading import import_class
from .ltx_video import LTXVideoSpec
from .wan import WanSpec

SPECS: dict[str, type[ModelSpec]] = {
    CogVideoXSpec.name: CogVideoXSpec,
    LTXVideoSpec.name: LTXVideoSpec,
    HunyuanVideoSpec.name: HunyuanVideoSpec,
    WanSpec.name: WanSpec,
    HunyuanVideo15Spec.name: HunyuanVideo15Spec,
}
ALIASES = {alias: name for name, spec in SPECS.items() for alias in spec.aliases}


def per_family(fact: Callable[[type[ModelSpec]], object]) -> str:
    """One fact of every family as help texts give it, read from the specs: `per_family(lambda s:
    s.default_text_tokens)` is "226 CogVideoX, 128 LTX-Video, 256 HunyuanVideo, 512 Wan"."""
    return ", ".join(f"{fact(spec)} {spec.display_name}" for spec in SPECS.values())


def family_name(name: str) -> str:
    """The registry name of `--model NAME` (case-insensitive; the specs' aliases accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SPECS:
        raise UserError(f"--model {name!r} is not a model family ft knows; use one of: {', '.join(sorted(SPECS))}.")
    return key


def get_spec(name: str) -> ModelSpec:
    """The spec for `--model NAME`."""
    return SPECS[family_name(name)]()


def spec_for(args: ModelArgs) -> ModelSpec:
    """The spec for `args.model` and its `--pretrained`, after checking the component flags make sense for that
    family."""
    spec = get_spec(args.model)
    spec.check_args(args)
    return spec.for_checkpoint(args)


def save_tiny_model(model: str, folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny `model` family with random weights and save it as a diffusers folder; `family:variant` (e.g.
    `wan:i2v`) builds one of the family's `tiny_variants`."""
    name, _, variant = model.partition(":")
    spec = get_spec(name)
    pipeline_class, parts = spec.tiny_variant(variant, seed) if variant else (spec.pipeline_class,
                                                                              spec.tiny_components(seed))
    pipe = import_class(*pipeline_class)(**parts)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder

"""The model families `ft` knows, by name: a plain dict. An unknown name is an error listing the known ones."""

from __future__ import annotations

import dataclasses
from typing import Any

from ft.common.errors import UserError
from ft.common.model_args import ModelArgs

from .base import ModelSpec
from .cogvideox import CogVideoXSpec
from .hunyuan_video import HunyuanVideoSpec
from .ltx_video import LTXVideoSpec
from .wan import ALIASES as WAN_ALIASES
from .wan import WanSpec

SPECS: dict[str, type[ModelSpec]] = {
    CogVideoXSpec.name: CogVideoXSpec,
    LTXVideoSpec.name: LTXVideoSpec,
    HunyuanVideoSpec.name: HunyuanVideoSpec,
    WanSpec.name: WanSpec,
}
ALIASES = {"cogvideo": "cogvideox", "cog": "cogvideox", "ltx-video": "ltx_video", "ltx": "ltx_video",
           "hunyuan-video": "hunyuan_video", "hunyuan": "hunyuan_video", **dict.fromkeys(WAN_ALIASES, WanSpec.name)}


def get_spec(name: str, options: dict[str, Any] | None = None) -> ModelSpec:
    """The spec for `--model NAME` (case-insensitive; a few common aliases accepted), built with the run's
    options."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SPECS:
        raise UserError(f"--model {name!r} is not a model family ft knows; use one of: {', '.join(sorted(SPECS))}.")
    return SPECS[key](options)


def spec_for(args: ModelArgs) -> ModelSpec:
    """The spec for `args.model`, built with the run's settings, after checking the component flags make sense
    for that family."""
    spec = get_spec(args.model, dataclasses.asdict(args))
    spec.check_args(args)
    return spec

"""The validation file (`--validation-dataset-file`): the prompts `ft train` generates videos from while it trains.

Read as finetrainers reads it (finetrainers/data/dataset.py, ValidationDataset): a CSV, JSON (a list of objects,
or an object with a `data` list, finetrainers' layout), JSONL, Parquet or Arrow table with finetrainers' columns:
- `caption` (required): the prompt, used as written (an `--id-token` is not added: write it in the caption, as
  finetrainers' examples do);
- optional `height`, `width`, `num_frames`: the size; a row without them takes the shard set's first video bucket
  (the first of `--buckets` with more than one frame), the size the model is being trained at;
- optional `num_inference_steps`, `guidance_scale`: the pipeline's defaults when absent (50; 6 for CogVideoX and
  HunyuanVideo, whose scale is the embedded guidance, 3 for LTX-Video);
- optional `seed` (default: the run's `--seed`) and `frame_rate` (the mp4's rate, and the one LTX-Video is
  conditioned on; default the family's);
- optional `true_cfg_scale` (ft's addition): true classifier-free guidance with the stored negative (empty) prompt,
  for pipelines whose guidance scale is embedded (HunyuanVideo); 1 (off) by default;
- `image_path` / `video_path` must be empty (null): they condition image-to-video, which ft does not train yet.
Any other column is refused with the list of known ones, so a misspelt `num_frame` is not silently ignored.

Both stages read the file: `ft precompute --validation-dataset-file FILE` encodes the captions (and the negative
prompt) into the shard set's prompt table (common/prompt_table.py); `ft train` checks every row before the first
step (sizes included, with the family's rules) and refuses captions that were not precomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .datasets import read_table
from .errors import UserError

FLAG = "--validation-dataset-file"
SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".arrow")
INT_COLUMNS = ("height", "width", "num_frames", "num_inference_steps", "seed")
FLOAT_COLUMNS = ("guidance_scale", "frame_rate", "true_cfg_scale")
CONDITION_COLUMNS = ("image_path", "video_path")
COLUMNS = ("caption", *INT_COLUMNS, *FLOAT_COLUMNS, *CONDITION_COLUMNS)


@dataclass(frozen=True)
class ValidationPrompt:
    """One row of the validation file; None means the default (see the module docstring)."""

    caption: str
    index: int  # the row's place in the file, from 0: names its outputs
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    frame_rate: float | None = None
    true_cfg_scale: float | None = None

    @property
    def size(self) -> tuple[int, int, int]:
        assert self.num_frames and self.height and self.width, "sizes are resolved by resolve_sizes"
        return self.num_frames, self.height, self.width


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))  # pandas-written Parquet keeps missing numbers as NaN


def _number(value: Any, column: str, where: str, whole: bool) -> int | float:
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or (whole and number != int(number)):
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{where}: {column} {value!r} is not {kind}; fix the cell or leave it empty for the "
                        "default.")
    if (column != "seed" and number <= 0) or number < 0:
        raise UserError(f"{where}: {column} must be above 0{' or 0' if column == 'seed' else ''}, not {value!r}.")
    return int(number) if whole else number


def read_validation_file(path: str | Path) -> list[ValidationPrompt]:
    """Every row of the validation file, checked; a UserError names the file, the row and what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{FLAG} {path}: no such file.")
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{FLAG} {path}: a validation file is .csv, .json, .jsonl, .parquet or .arrow (finetrainers' "
                        f"formats), not {path.suffix or 'a file without a suffix'!r}.")
    rows = read_table(path)
    if not rows:
        raise UserError(f"{FLAG} {path} has no rows; give at least one caption, or leave the flag out.")
    prompts = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        if not isinstance(row, dict):
            raise UserError(f"{where} is {type(row).__name__}, not an object with a 'caption'.")
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise UserError(f"{where}: unknown column(s) {', '.join(map(repr, unknown))}; a validation file has "
                            f"{', '.join(COLUMNS)}.")
        caption = row.get("caption")
        if "caption" not in row:
            raise UserError(f"{where} has no 'caption' column; every row needs the prompt to generate from.")
        if not isinstance(caption, str) or not caption.strip():
            raise UserError(f"{where}: the caption is {'empty' if _missing(caption) else repr(caption)}; every row "
                            "needs a prompt (text).")
        for column in CONDITION_COLUMNS:
            if not _missing(row.get(column)):
                raise UserError(f"{where}: {column} {row[column]!r}: ft generates text-to-video only (image-to-video "
                                f"is not in ft yet); leave {column} empty (null).")
        values: dict[str, Any] = {}
        for column in (*INT_COLUMNS, *FLOAT_COLUMNS):
            if not _missing(row.get(column)):
                values[column] = _number(row[column], column, where, whole=column in INT_COLUMNS)
        prompts.append(ValidationPrompt(caption.strip(), i, **values))
    return prompts


def default_size(buckets: list[list[int]] | list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The size of a row that gives none: the first video bucket of the shard set (the first bucket if all are
    1-frame)."""
    assert buckets, "a shard set records its buckets"
    video = [tuple(b) for b in buckets if b[0] > 1]
    return (video or [tuple(b) for b in buckets])[0]  # type: ignore[return-value]


def resolve_sizes(prompts: list[ValidationPrompt], path: str | Path, spec: Any, vae_config: dict,
                  transformer_config: dict, default: tuple[int, int, int]) -> list[ValidationPrompt]:
    """Each prompt with its size filled in from `default`, checked with the family's rule (`spec` is a ModelSpec:
    `check_generation_size`); and its true CFG refused where the pipeline has none."""
    out = []
    for p in prompts:
        size = (p.num_frames or default[0], p.height or default[1], p.width or default[2])
        problem = spec.check_generation_size(size, vae_config, transformer_config)
        if problem:
            raise UserError(f"{path} row {p.index + 1}: num_frames {size[0]}, height {size[1]}, width {size[2]}: "
                            f"{problem}. Fix the row (or leave the size out to generate at {default[0]}x"
                            f"{default[1]}x{default[2]}).")
        if p.true_cfg_scale is not None and not spec.takes_true_cfg():
            raise UserError(f"{path} row {p.index + 1}: true_cfg_scale: {spec.display_name}'s pipeline has no true "
                            "CFG; its guidance_scale is classifier-free guidance already. Leave the column out.")
        out.append(replace(p, num_frames=size[0], height=size[1], width=size[2]))
    return out

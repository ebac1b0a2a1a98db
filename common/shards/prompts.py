"""Validation prompts, both stages' side: the validation file users write, and the shard set's prompt table.

The validation file (`--validation-dataset-file`), read as finetrainers reads it (finetrainers/data/dataset.py,
ValidationDataset): a CSV, JSON (a list of objects, or an object with a `data` list, finetrainers' layout), JSONL,
Parquet or Arrow table with finetrainers' columns:
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
- `image_path` / `video_path` (finetrainers' columns) and `last_image_path` (ft's, for first-last-frame models):
  the conditioning of an image-to-video run: the image, or the video's first frame (and its last frame where
  `last_image_path` is not given), relative to the file's folder, else to the current one. Required by an
  image-to-video run, refused by a text-to-video one (`check_condition_rows`). Stage 1 stores each row's frames at
  the row's size with the family's `encode_image` tensors (`image_row_key`), so validation loads no image encoder.
Any other column is refused with the list of known ones, so a misspelt `num_frame` is not silently ignored. Both
stages check every row (sizes with the family's rules: `resolve_sizes`) before any model loads.

The prompt table: text conditioning that no training sample carries, stored beside the shards, keyed by
`text_key`: each validation caption and the negative prompt (the empty caption) that classifier-free guidance
samples against. It generalises the older `empty_caption.safetensors` (still written, for caption dropout): the
empty caption is the table's `negative` row. Layout, part of the shard contract:
    prompts/<text_key>.safetensors   one prompt's conditioning (the family's `cond` tensors, no batch dimension),
                                     with `__metadata__` {"text_key", "caption", "digest"}; digest: sha256 over the
                                     tensors' names, dtypes, shapes and bytes, checked on read
    manifest.json "prompts"          {"folder": "prompts", "negative": <text_key of "">}, empty when there is none
A prompt's `text_key` is the one a sample with that caption gets (`text_key`, shared with
precompute/planned_sample.py): the caption, the text encoders' fingerprint, the text length and the family's encoding
choices. So a file is content-addressed: several precompute jobs may write the same prompt at once (each renames
identical bytes into place), there is no index to merge, and `ft train` finds a caption's row from the manifest
alone (`PromptTable`), loading no text encoder.

Writing (stage 1, `PromptWriter`): `ft precompute --validation-dataset-file FILE` works out which rows the shard
set lacks; only those are encoded, in batches, once the run's models are loaded, so a rerun with a new file on an
unchanged dataset loads the text encoders alone and encodes only its captions. `needed` (what makes the text
encoders load) is the missing validation captions, plus the negative prompt when there are validation prompts;
without a file the negative row is written only when the encoders load anyway (a new shard set, new captions), so
a rerun of an older shard set still loads no model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..logs import log
from ..tables import read_table
from .codec import sample_key, tensors_from_bytes

if TYPE_CHECKING:
    import torch

    from .manifest import Manifest

FLAG = "--validation-dataset-file"
SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".arrow")
INT_COLUMNS = ("height", "width", "num_frames", "num_inference_steps", "seed")
FLOAT_COLUMNS = ("guidance_scale", "frame_rate", "true_cfg_scale")
CONDITION_COLUMNS = ("image_path", "video_path", "last_image_path")
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
    # the conditioning of an image-to-video run, as found on disk (see the module docstring)
    image_path: str | None = None
    video_path: str | None = None
    last_image_path: str | None = None

    @property
    def conditions(self) -> bool:
        return bool(self.image_path or self.video_path or self.last_image_path)

    def frame_sources(self, frames: tuple[str, ...]) -> list[tuple[str, str]]:
        """(file, which frame of it: "first" or "last") of each conditioning frame an image-to-video model takes."""
        out = []
        for which in frames:
            if which == "first":
                out.append((self.image_path, "first") if self.image_path else (self.video_path, "first"))
            else:
                out.append((self.last_image_path, "first") if self.last_image_path else (self.video_path, "last"))
        return [(str(path), frame) for path, frame in out]

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
    if path.is_dir():
        raise UserError(f"{FLAG} {path} is a folder; give the validation file itself (.csv, .json, .jsonl, .parquet "
                        "or .arrow).")
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
        values: dict[str, Any] = {}
        for column in CONDITION_COLUMNS:
            if not _missing(row.get(column)):
                values[column] = _condition_file(row[column], column, path, where)
        for column in (*INT_COLUMNS, *FLOAT_COLUMNS):
            if not _missing(row.get(column)):
                values[column] = _number(row[column], column, where, whole=column in INT_COLUMNS)
        prompts.append(ValidationPrompt(caption.strip(), i, **values))
    return prompts


def _condition_file(value: Any, column: str, path: Path, where: str) -> str:
    """A condition column's file: relative to the validation file's folder, else to the current one."""
    if not isinstance(value, str):
        raise UserError(f"{where}: {column} {value!r} is not a path.")
    for candidate in (path.parent / value, Path(value)):
        if candidate.is_file():
            return str(candidate.resolve())
        if candidate.is_dir():
            raise UserError(f"{where}: {column} {value!r} is a folder ({candidate}); give the file itself.")
    raise UserError(f"{where}: {column} {value!r}: no such file (looked beside {path} and in the current folder); "
                    "fix the path or leave the cell empty.")


def check_condition_rows(prompts: list[ValidationPrompt], path: str | Path, conditioning: Any) -> None:
    """Every row conditions an image-to-video run (`conditioning`, an ImageConditioning: an image or a video for
    the first frame, and for a first-last-frame model a last image or a video), and none a text-to-video run."""
    for p in prompts:
        where = f"{path} row {p.index + 1}"
        if conditioning is None and p.conditions:
            raise UserError(f"{where}: image_path/video_path/last_image_path condition image-to-video, and this run "
                            "is text-to-video (its --pretrained, or --mode t2v); leave them empty.")
        if conditioning is None:
            continue
        if not (p.image_path or p.video_path):
            raise UserError(f"{where}: an image-to-video run samples from an image: give the row an image_path (or "
                            "a video_path, whose first frame is taken).")
        if "last" in conditioning.frames and not (p.last_image_path or p.video_path):
            raise UserError(f"{where}: a first-last-frame model also needs the last frame: give the row a "
                            "last_image_path (or a video_path, whose last frame is taken).")


def image_row_key(prompt: ValidationPrompt, encoding: dict[str, Any], vae: dict[str, Any]) -> str:
    """The prompt table key of a row's image conditioning: its frames' files (their bytes' digests, and which
    frame), the row's size, the VAE and the manifest's image conditioning (`encoding["image"]`)."""
    from .codec import file_digest

    frames = tuple(encoding["image"]["frames"])
    return sample_key({"half": "validation-image", "sources": [[file_digest(f), which] for f, which in
                                                               prompt.frame_sources(frames)],
                       "size": list(prompt.size), "vae": sample_key(vae), "image": encoding["image"]})


def default_size(buckets: list[list[int]] | list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The size of a row that gives none: the first video bucket of the shard set (the first bucket if all are
    1-frame)."""
    assert buckets, "a shard set records its buckets"
    video = [tuple(b) for b in buckets if b[0] > 1]
    return (video or [tuple(b) for b in buckets])[0]  # type: ignore[return-value]


def resolve_sizes(prompts: list[ValidationPrompt], path: str | Path, spec: Any, vae_config: dict,
                  transformer_config: dict, default: tuple[int, int, int],
                  memory: tuple[float, str] | None = None) -> list[ValidationPrompt]:
    """Each prompt with its size filled in from `default`, checked with the family's rule (`spec` is a ModelSpec:
    `check_generation_size`) and, given `memory` (bytes, and what they are), against the estimate of what
    generating it holds (`check_generation_memory`); and its true CFG refused where the pipeline has none."""
    out = []
    for p in prompts:
        size = (p.num_frames or default[0], p.height or default[1], p.width or default[2])
        problem = spec.check_generation_size(size, vae_config, transformer_config)
        if not problem and memory is not None:
            problem = spec.check_generation_memory(size, vae_config, transformer_config, memory)
        if problem:
            raise UserError(f"{path} row {p.index + 1}: num_frames {size[0]}, height {size[1]}, width {size[2]}: "
                            f"{problem}. {_size_fix(p, spec, vae_config, transformer_config, default, memory)}")
        if p.true_cfg_scale is not None and not spec.takes_true_cfg():
            raise UserError(f"{path} row {p.index + 1}: true_cfg_scale: {spec.display_name}'s pipeline has no true "
                            "CFG; its guidance_scale is classifier-free guidance already. Leave the column out.")
        out.append(replace(p, num_frames=size[0], height=size[1], width=size[2]))
    return out


def _size_fix(p: ValidationPrompt, spec: Any, vae_config: dict, transformer_config: dict,
              default: tuple[int, int, int], memory: tuple[float, str] | None) -> str:
    """What to do about a row whose size cannot be generated: leave the size out only when the default size (the
    set's first video bucket) can be; else give the row a size of its own."""
    fix = "Set the row's num_frames, height and width columns to a size the pipeline can make"
    given = p.num_frames or p.height or p.width
    ok = spec.check_generation_size(default, vae_config, transformer_config) is None and (
        memory is None or spec.check_generation_memory(default, vae_config, transformer_config, memory) is None)
    if given and ok:
        return f"{fix}, or leave them out to generate at {default[0]}x{default[1]}x{default[2]}."
    if not given:
        return (f"{fix}: without them the row takes the set's first video bucket, {default[0]}x{default[1]}x"
                f"{default[2]}, which this pipeline cannot generate.")
    return f"{fix} (the set's first video bucket, {default[0]}x{default[1]}x{default[2]}, cannot be generated either)."


# ---------------------------------------------------------------------------------------------- prompt table

PROMPTS_FOLDER = "prompts"


def text_fingerprint(encoders: dict[str, Any]) -> str:
    """The text encoders' part of a manifest's `encoders` (everything but the VAE), hashed."""
    return sample_key({k: v for k, v in encoders.items() if k != "vae"})


def text_key(caption: str, fingerprint: str, encoding: dict[str, Any]) -> str:
    """The key of a caption's text conditioning: `fingerprint` from `text_fingerprint`, `encoding` the manifest's
    encoding parameters (its text length and the family's choices)."""
    return sample_key({"half": "text", "caption": caption, "text_encoders": fingerprint,
                       "max_sequence_length": encoding["max_sequence_length"],
                       "family_choices": encoding.get("family_choices") or {}})


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prompt_bytes(cond: dict[str, torch.Tensor], caption: str, key: str) -> bytes:
    """One prompt's file: its tensors as safetensors, with the caption, key and digest in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in cond.items()}
    return save(tensors, metadata={"text_key": key, "caption": caption, "digest": tensors_digest(tensors)})


def write_prompt_file(folder: str | Path, key: str, data: bytes) -> Path:
    """Write a prompt's bytes atomically under the shard set's prompts/ folder (a unique temp name per process, so
    jobs writing the same prompt at once never share a temp file)."""
    path = Path(folder) / PROMPTS_FOLDER / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _metadata(data: bytes | bytearray) -> dict[str, str]:
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8 : 8 + length]))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


class PromptTable:
    """The prompt table of one shard set, read through its manifest."""

    def __init__(self, folder: str | Path, manifest: Manifest):
        self.folder, self.manifest = Path(folder), manifest
        self.fingerprint = text_fingerprint(manifest.encoders)
        self.info = dict(getattr(manifest, "prompts", None) or {})

    def key(self, caption: str) -> str:
        return text_key(caption, self.fingerprint, self.manifest.encoding)

    def path(self, key: str) -> Path:
        return self.folder / self.info.get("folder", PROMPTS_FOLDER) / f"{key}.safetensors"

    def missing(self, captions: list[str]) -> list[str]:
        """The captions (each once, in order) that have no row in the table."""
        return [c for c in dict.fromkeys(captions) if not self.info or not self.path(self.key(c)).is_file()]

    def read(self, caption: str) -> dict[str, torch.Tensor]:
        """A caption's conditioning, verified; a UserError says how to store it when it is not there."""
        return self.read_key(self.key(caption), f"the prompt {caption[:60]!r}")

    def read_key(self, key: str, what: str) -> dict[str, torch.Tensor]:
        """The row `key` (a caption's, or an image row's: `image_row_key`), verified."""
        path = self.path(key)
        if not self.info or not path.is_file():
            raise UserError(f"{self.folder} holds no conditioning for {what}; add it with `ft precompute ... --out "
                            f"{self.folder} --validation-dataset-file FILE` (it encodes only what is missing).")
        data = bytearray(path.read_bytes())
        try:
            meta = _metadata(data)
            tensors = tensors_from_bytes(data)
            if meta.get("text_key") != key or meta.get("digest") != tensors_digest(tensors):
                raise ValueError("its key or digest does not match its tensors")
        except (ValueError, KeyError, UnicodeDecodeError, RuntimeError, struct.error) as e:
            raise UserError(f"{path} is damaged ({e}); delete it and rerun `ft precompute` with the same --out and "
                            "--validation-dataset-file to write it again.") from e
        return tensors

    def negative(self) -> dict[str, torch.Tensor]:
        """The negative prompt's (the empty caption's) conditioning."""
        return self.read("")


# ---------------------------------------------------------------------------------------------- writing (stage 1)

NEGATIVE_PROMPT = ""  # the negative prompt of classifier-free guidance, as the pipelines default it


def check_validation_file(path: str | None, spec: Any, vae_config: dict, transformer_config: dict,
                          buckets: list[tuple[int, int, int]],
                          memory: tuple[float, str] | None = None) -> list[ValidationPrompt]:
    """The validation file's prompts, checked as `ft train` will check them, their sizes resolved (no model is
    loaded; `spec` is the run's ModelSpec; `memory`: the bound on what generating a row may hold, see
    `resolve_sizes`)."""
    if not path:
        return []
    prompts = read_validation_file(path)
    return resolve_sizes(prompts, path, spec, vae_config, transformer_config, default_size(buckets), memory)


class PromptWriter:
    """The prompt table rows a precompute run must add to `out`: each validation caption and the negative prompt
    (`needed`: see the module docstring)."""

    def __init__(self, out: str | Path, fingerprints: dict[str, Any], encoding: dict[str, Any],
                 prompts: list[ValidationPrompt]):
        self.out = Path(out)
        fingerprint = text_fingerprint(fingerprints)
        captions = dict.fromkeys([NEGATIVE_PROMPT, *(p.caption for p in prompts)])
        self.keys = {c: text_key(c, fingerprint, encoding) for c in captions}
        self.missing = [c for c, k in self.keys.items() if not self._path(k).is_file()]
        self.needed = self.missing if prompts else []

    def _path(self, key: str) -> Path:
        return self.out / PROMPTS_FOLDER / f"{key}.safetensors"

    def write(self, spec: Any, encoders: dict | None, seq_len: int, batch_size: int) -> dict[str, Any]:
        """Encode and store the missing rows (when `encoders` are loaded); returns the manifest's `prompts` entry,
        empty while the table has no negative row."""
        import torch

        todo = self.missing if encoders is not None else []
        for start in range(0, len(todo), batch_size):
            captions = todo[start : start + batch_size]
            with torch.no_grad():
                cond = spec.encode_prompts(encoders, captions, seq_len)
            for j, caption in enumerate(captions):
                key = self.keys[caption]
                write_prompt_file(self.out, key, prompt_bytes({k: v[j] for k, v in cond.items()}, caption, key))
        validation = [c for c in todo if c != NEGATIVE_PROMPT]
        if validation:
            log.info(f"stored {len(validation)} validation prompt(s) in {self.out / PROMPTS_FOLDER}")
        if not self._path(self.keys[NEGATIVE_PROMPT]).is_file():
            return {}
        return {"folder": PROMPTS_FOLDER, "negative": self.keys[NEGATIVE_PROMPT]}

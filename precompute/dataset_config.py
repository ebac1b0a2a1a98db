"""finetrainers' `--dataset_config training.json`, read into the `ft precompute` runs it stands for.

The file holds `{"datasets": [...]}`; each entry names its data (`data_root`: a local folder or a hub dataset id;
or `dataset_file`: a metadata table), its `dataset_type` (video or image), an `id_token` prefixed to every caption,
its resolution buckets, a `reshape_mode`, whether to strip common LLM caption prefixes ("The video shows ..."),
WebDataset `caption_options`, and, when there are several datasets, a `weight` for mixing them in training.

ft encodes each dataset as its own shard set (they may differ in buckets, reshape mode and captions) and mixes
them in `ft train` by weight: one dataset is written to `--out` itself, several to `--out/<n>-<name>`
(`DatasetEntry.shard_folder`). Unknown keys are an error that names them: a misspelt key would otherwise cost a
run trained on other data than intended.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.common.errors import UserError

# finetrainers/constants.py: COMMON_LLM_START_PHRASES, in its order (the first prefix that matches is removed)
_BEGINNINGS = ("This video", "The video", "This clip", "The clip", "The animation", "This image", "The image",
               "This picture", "The picture")
_CONTINUATIONS = ("shows", "depicts", "features", "captures", "highlights", "introduces", "presents")
LLM_CAPTION_PREFIXES: tuple[str, ...] = (
    "In the video,", "In this video,", "In this video clip,", "In the clip,", "Caption:",
    *(f"{b} {c}" for b in _BEGINNINGS for c in _CONTINUATIONS),
)

# finetrainers' reshape modes -> ft's --resize-mode (see precompute/media.py RESIZE_MODES)
RESHAPE_MODES = {"bicubic": "stretch", "resize_crop": "center-crop", "center_crop": "crop"}
KNOWN_KEYS = ("data_root", "dataset_file", "dataset_type", "id_token", "video_resolution_buckets",
              "image_resolution_buckets", "reshape_mode", "remove_common_llm_caption_prefixes", "caption_options",
              "weight", "rename_columns", "drop_columns")


def strip_llm_prefix(caption: str) -> str:
    """Remove the first common LLM caption opening ("The video shows", ...) as finetrainers does."""
    for prefix in LLM_CAPTION_PREFIXES:
        if caption.startswith(prefix):
            return caption.removeprefix(prefix).strip()
    return caption


@dataclass
class DatasetEntry:
    """One dataset of a finetrainers dataset config, in ft's terms."""

    source: str  # a local folder or metadata file, or a hub dataset id (see `local_path`)
    dataset_type: str
    buckets: list[str]  # FRAMESxHEIGHTxWIDTH; images get 1xHxW
    resize_mode: str
    id_token: str | None = None
    strip_llm_prefixes: bool = False
    caption_columns: list[str] = field(default_factory=list)
    weight: float = 1.0
    index: int = 0

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.source.rstrip("/")).name).strip("-") or "dataset"

    def shard_folder(self, out: str, several: bool) -> str:
        """Where this dataset's shards go: `out` itself for a single dataset, `out/<n>-<name>` for several."""
        return str(Path(out) / f"{self.index}-{self.name}") if several else out


def _buckets(value: Any, dims: int, key: str, path: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise UserError(f"--dataset_config {path}: {key} must be a non-empty list of "
                        f"{'[frames, height, width]' if dims == 3 else '[height, width]'} lists.")
    out = []
    for b in value:
        if not isinstance(b, (list, tuple)) or len(b) != dims or not all(isinstance(x, int) and x > 0 for x in b):
            raise UserError(f"--dataset_config {path}: {key} entry {b!r} is not {dims} positive integers.")
        out.append("x".join(str(x) for x in ((1, *b) if dims == 2 else b)))
    return out


def _entry(raw: Any, index: int, path: str) -> DatasetEntry:
    where = f"--dataset_config {path}: datasets[{index}]"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be an object with data_root (or dataset_file) and dataset_type.")
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise UserError(f"{where} has keys ft does not know: {', '.join(unknown)}. Known keys: "
                        f"{', '.join(KNOWN_KEYS)}.")
    if ("data_root" in raw) == ("dataset_file" in raw):
        raise UserError(f"{where} needs exactly one of data_root and dataset_file.")
    source = str(raw.get("data_root") or raw.get("dataset_file"))
    dataset_type = raw.get("dataset_type")
    if dataset_type not in ("video", "image"):
        raise UserError(f"{where}: dataset_type must be 'video' or 'image', not {dataset_type!r}.")
    key = f"{dataset_type}_resolution_buckets"
    other = "image_resolution_buckets" if dataset_type == "video" else "video_resolution_buckets"
    if other in raw:
        raise UserError(f"{where}: {other} does not apply to a dataset_type {dataset_type!r} dataset; use {key}.")
    if key not in raw:
        raise UserError(f"{where}: a {dataset_type} dataset needs {key} (finetrainers requires it too).")
    buckets = _buckets(raw[key], 3 if dataset_type == "video" else 2, key, path)
    mode = raw.get("reshape_mode", "bicubic")
    if mode not in RESHAPE_MODES:
        raise UserError(f"{where}: reshape_mode {mode!r} is not one of {', '.join(RESHAPE_MODES)}.")
    for key in ("rename_columns", "drop_columns"):
        if raw.get(key):
            raise UserError(f"{where}: {key} is not supported by ft; ft reads the caption and media columns "
                            "itself (--caption-column, --video-column).")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise UserError(f"{where}: weight must be a positive number, not {weight!r}.")
    id_token = raw.get("id_token")
    if id_token is not None and not isinstance(id_token, str):
        raise UserError(f"{where}: id_token must be a string (one trigger word or phrase), not "
                        f"{type(id_token).__name__} {id_token!r}.")
    strip = raw.get("remove_common_llm_caption_prefixes", False)
    if not isinstance(strip, bool):  # "false" as a string would read as true
        raise UserError(f"{where}: remove_common_llm_caption_prefixes must be true or false (JSON booleans, no "
                        f"quotes), not {strip!r}.")
    return DatasetEntry(source=source, dataset_type=dataset_type, buckets=buckets, resize_mode=RESHAPE_MODES[mode],
                        id_token=id_token or None, strip_llm_prefixes=strip,
                        caption_columns=_caption_columns(raw.get("caption_options"), where),
                        weight=float(weight), index=index)


def _caption_columns(options: Any, where: str) -> list[str]:
    """finetrainers' `caption_options` of a WebDataset: `column_names` (a name or a list), `weights` per column."""
    if not options:
        return []
    if not isinstance(options, dict) or set(options) - {"column_names", "weights"}:
        raise UserError(f"{where}: caption_options takes column_names and weights.")
    weights = options.get("weights")
    if isinstance(weights, dict) and len(weights) > 1:
        raise UserError(f"{where}: caption_options weights draw one of several caption columns per step; ft "
                        "encodes each clip once, so name the one column to use in column_names.")
    names = options.get("column_names") or (list(weights) if isinstance(weights, dict) else [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}: caption_options column_names is a column name or a list of them, not "
                        f"{names!r}.")
    return names


def read_dataset_config(path: str | Path) -> list[DatasetEntry]:
    """The datasets of a finetrainers dataset config, checked. Relative local paths are taken from the directory
    ft runs in, as finetrainers takes them."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--dataset_config {path}: no such file.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--dataset_config {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise UserError(f"--dataset_config {path} must hold {{\"datasets\": [ ... ]}} with at least one dataset.")
    extra = sorted(set(data) - {"datasets"})
    if extra:
        raise UserError(f"--dataset_config {path} has top-level keys ft does not know: {', '.join(extra)}.")
    return [_entry(raw, i, str(path)) for i, raw in enumerate(data["datasets"])]


def local_path(source: str, cache_dir: str | None = None) -> str:
    """A local folder or file for `source`: itself when it exists, else the hub dataset it names, downloaded with
    huggingface_hub (an error that says so when offline)."""
    if Path(source).exists():
        return source
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise UserError(f"dataset {source}: no such file or folder (and it is not a hub dataset id owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, repo_type="dataset", cache_dir=cache_dir)
    except Exception as e:  # offline mode, missing repo, network errors
        raise UserError(f"dataset {source}: not a local folder, and downloading it from the Hugging Face Hub failed "
                        f"({type(e).__name__}: {e}). Download it yourself (huggingface-cli download {source} "
                        "--repo-type dataset --local-dir DIR) and point data_root at DIR.") from e


def apply_caption_options(items: list[Any], id_token: str | None, strip_llm_prefixes: bool) -> list[Any]:
    """Captions as finetrainers makes them: the LLM opening stripped, then `id_token` and a space put first."""
    import dataclasses

    if not id_token and not strip_llm_prefixes:
        return items
    out = []
    for item in items:
        caption = strip_llm_prefix(item.caption) if strip_llm_prefixes else item.caption
        # an empty caption stays empty, so the data policy still rejects it (not "sks " trained on)
        out.append(dataclasses.replace(item, caption=f"{id_token} {caption}" if id_token and caption else caption))
    return out

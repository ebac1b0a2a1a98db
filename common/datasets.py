"""Readers of every dataset layout users bring, each giving the same list of `DatasetItem(path, caption)`.

Layouts, tried in this order for a folder `--dataset DATA`:
1. a media list (`videos.txt`, `video.txt`, `images.txt` or `image.txt`) beside a caption list (`prompts.txt`,
   `prompt.txt`, `captions.txt` or `caption.txt`): one relative media path / one caption per line (finetrainers'
   layout; `--video-column` / `--caption-column` may name other .txt files in the folder).
2. `DATA/metadata.{csv,json,jsonl,parquet}`: a table with a path column and a caption column.
3. WebDataset tars (`*.tar`, searched recursively) holding media and captions, read as finetrainers reads them
   (common/webdataset_media.py);
4. media files, each with a same-named `.txt` caption beside it (searched recursively).
`--dataset` may also be a metadata file itself. Images stand wherever videos may. Paths are relative to the folder
holding the list or table. A missing media file is not an error here: precompute rejects it with a reason.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

PATH_COLUMNS = ("video", "video_path", "videos", "path", "file_name", "filename", "file", "media", "image",
                "image_path", "video_file")
CAPTION_COLUMNS = ("caption", "captions", "text", "prompt", "prompts", "description", "title")
# finetrainers' list-layout file names (finetrainers/data/dataset.py)
CAPTION_LIST_NAMES = ("prompt.txt", "prompts.txt", "caption.txt", "captions.txt")
MEDIA_LIST_NAMES = ("video.txt", "videos.txt", "image.txt", "images.txt")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json", "metadata.parquet")
TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class DatasetItem:
    """One training clip: where its media is and what it shows."""

    path: Path
    caption: str


def load_dataset(dataset: str | Path, video_column: str | None = None, caption_column: str | None = None
                 ) -> list[DatasetItem]:
    """Read any supported layout into items, in the dataset's own order."""
    root = Path(dataset)
    if not root.exists():
        raise UserError(f"--dataset {dataset}: no such file or folder.")
    if root.is_file():
        if root.suffix.lower() not in TABLE_SUFFIXES:
            raise UserError(f"--dataset {dataset}: a dataset file must be .csv, .json, .jsonl or .parquet.")
        return _from_table(root, video_column, caption_column)
    list_files = _list_files(root, video_column, caption_column)
    if list_files:
        return _from_list_files(root, *list_files)
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return _from_table(root / name, video_column, caption_column)
    if any(root.rglob("*.tar")):
        from .webdataset_media import read_webdataset_folder

        return read_webdataset_folder(root, caption_column)
    items = _from_sidecar_captions(root)
    if items:
        return items
    raise UserError(
        f"--dataset {dataset}: found no dataset in this folder. Give it videos.txt + prompts.txt, a "
        f"metadata.csv/.json/.jsonl/.parquet with path and caption columns, or media files with same-named .txt "
        f"captions beside them.")


def _one_of(root: Path, names: tuple[str, ...], named: str | None, what: str) -> Path | None:
    """The list file of `what` in `root`: the one the flag names, else the single one of finetrainers' names."""
    if named and named.endswith(".txt"):
        return root / named if (root / named).is_file() else None
    found = [root / n for n in names if (root / n).is_file()]
    if len(found) > 1:
        raise UserError(f"{root} has {' and '.join(p.name for p in found)}: more than one {what} list, so which to "
                        f"use is unclear. Keep one, or name it with "
                        f"{'--caption-column' if what == 'caption' else '--video-column'}.")
    return found[0] if found else None


def _list_files(root: Path, video_column: str | None, caption_column: str | None) -> tuple[Path, Path] | None:
    """finetrainers' list layout: one media list (video.txt, videos.txt, image.txt or images.txt) beside one
    caption list (prompt.txt, prompts.txt, caption.txt or captions.txt)."""
    videos = _one_of(root, MEDIA_LIST_NAMES, video_column, "media")
    prompts = _one_of(root, CAPTION_LIST_NAMES, caption_column, "caption")
    if videos and prompts:
        return videos, prompts
    if videos or prompts:
        named = caption_column if videos else video_column
        lack = [named] if named and named.endswith(".txt") else CAPTION_LIST_NAMES if videos else MEDIA_LIST_NAMES
        raise UserError(f"{videos or prompts} is there but no {' / '.join(lack)} beside it: the list layout needs a "
                        "media list and a caption list, one line each.")
    return None


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_list_files(root: Path, videos: Path, prompts: Path) -> list[DatasetItem]:
    paths, captions = _read_lines(videos), _read_lines(prompts)
    if len(paths) != len(captions):
        raise UserError(f"{videos} has {len(paths)} lines but {prompts} has {len(captions)}: they must pair up "
                        "line by line (one caption per video).")
    return [DatasetItem(root / p, c) for p, c in zip(paths, captions, strict=True)]


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a .csv, .json (a list of objects), .jsonl, .parquet or .arrow table, as dicts."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":  # the csv module keeps every value a string: a caption "007" stays "007"
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".arrow":
            import pyarrow as pa

            with pa.memory_map(str(path)) as source:
                try:
                    return pa.ipc.open_file(source).read_all().to_pylist()
                except pa.ArrowInvalid:
                    source.seek(0)
                    return pa.ipc.open_stream(source).read_all().to_pylist()
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"data": [...]} or a single-key wrapper
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else None
            if not isinstance(data, list):
                raise UserError(f"{path}: a JSON dataset must be a list of objects, one per sample.")
            return data
    except UserError:
        raise
    except Exception as e:  # pyarrow / json parse errors
        raise UserError(f"{path} could not be read as {suffix[1:]}: {e}") from e
    raise UserError(f"{path}: unsupported table type {suffix!r}; use csv, json, jsonl, parquet or arrow.")


def pick_column(columns: list[str], wanted: str | None, usual: tuple[str, ...], what: str, path: Path) -> str:
    """The column named by the flag, or the first usual name present (case-insensitive)."""
    if wanted:
        if wanted not in columns:
            raise UserError(f"{path} has no column {wanted!r} for the {what}; its columns are: {', '.join(columns)}.")
        return wanted
    lower = {c.lower(): c for c in columns}
    for name in usual:
        if name in lower:
            return lower[name]
    flag = "--video-column" if what == "media path" else "--caption-column"
    raise UserError(f"{path}: no {what} column found among {', '.join(columns) or '(none)'}; name it with {flag}.")


def _from_table(path: Path, video_column: str | None, caption_column: str | None) -> list[DatasetItem]:
    rows = read_table(path)
    if not rows:
        raise UserError(f"{path} has no rows.")
    columns = list(rows[0].keys())
    path_col = pick_column(columns, video_column, PATH_COLUMNS, "media path", path)
    caption_col = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", path)
    items = []
    for i, row in enumerate(rows):
        media, caption = row.get(path_col), row.get(caption_col)
        if not media:
            raise UserError(f"{path}: row {i + 1} has an empty {path_col!r}.")
        items.append(DatasetItem(path.parent / str(media), "" if caption is None else str(caption).strip()))
    return items


def _from_sidecar_captions(root: Path) -> list[DatasetItem]:
    media = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS)
    items = []
    uncaptioned = []
    for p in media:
        caption_file = p.with_suffix(".txt")
        if caption_file.is_file():
            items.append(DatasetItem(p, caption_file.read_text(encoding="utf-8").strip()))
        else:
            uncaptioned.append(p)
    if items and uncaptioned:
        raise UserError(f"{uncaptioned[0]} has no caption file {uncaptioned[0].with_suffix('.txt').name} beside it "
                        f"({len(uncaptioned)} media files lack one). Add the captions or move those files out.")
    return items

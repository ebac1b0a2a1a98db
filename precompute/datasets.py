"""Readers of every dataset layout users bring, each giving the same list of `DatasetItem(path, caption)`.

Layouts, tried in this order for a folder `--dataset DATA`:
1. a media list (`videos.txt`, `video.txt`, `images.txt` or `image.txt`) beside a caption list (`prompts.txt`,
   `prompt.txt`, `captions.txt` or `caption.txt`): one relative media path / one caption per line (finetrainers'
   layout; `--video-column` / `--caption-column` may name other .txt files in the folder).
2. `DATA/metadata.{csv,json,jsonl,parquet,arrow}`: a table with a path column and a caption column.
3. WebDataset tars (`*.tar`, searched recursively) holding media and captions, read as finetrainers reads them
   (precompute/webdataset_media.py);
4. media files, each with a same-named `.txt` caption beside it (searched recursively).
`--dataset` may also be a metadata file itself. Images stand wherever videos may. Paths are relative to the folder
holding the list or table. A missing media file is not an error here: precompute rejects it with a reason.

Bad rows do not stop the reading either: a blank path, a caption that is not UTF-8 (the file and line named) or
a path line that is not UTF-8 becomes an item carrying its `problem`, which precompute rejects with that reason
while the rest go on. An empty caption is kept as "" (the data policy decides). Only a dataset that cannot be
paired up at all (videos.txt and prompts.txt of different lengths) is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ft.common.errors import UserError
from ft.common.shards import MANIFEST_NAME
from ft.common.tables import iter_table
from ft.precompute.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

PATH_COLUMNS = ("video", "video_path", "videos", "path", "file_name", "filename", "file", "media", "image",
                "image_path", "video_file")
CAPTION_COLUMNS = ("caption", "captions", "text", "prompt", "prompts", "description", "title")
# a table's column naming each clip's conditioning image for image-to-video (beside its media column; finetrainers'
# and diffusers' examples call it image or image_path); without one, the clip's first frame conditions
CONDITION_IMAGE_COLUMNS = ("image", "image_path", "conditioning_image", "first_frame")
# finetrainers' list-layout file names (finetrainers/data/dataset.py)
CAPTION_LIST_NAMES = ("prompt.txt", "prompts.txt", "caption.txt", "captions.txt")
MEDIA_LIST_NAMES = ("video.txt", "videos.txt", "image.txt", "images.txt")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json", "metadata.parquet", "metadata.arrow")
TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".arrow")


@dataclass(frozen=True, slots=True)
class DatasetItem:
    """One training clip: where its media is and what it shows (slots: a rerun holds one per row of the dataset)."""

    path: Path
    caption: str
    # where the item was read from ("prompts.txt line 3", "metadata.csv row 2"), for messages about it
    source: str = field(default="", compare=False)
    # why the item cannot be used, found while reading it, and the kind of problem (empty-cell, caption-not-utf8)
    problem: str = ""
    problem_kind: str = ""
    # extracted by ft from a tar inside the dataset (WebDataset layout): inside the dataset whatever its temp path
    extracted: bool = field(default=False, compare=False)
    # the image that conditions an image-to-video model in place of the clip's first frame (a table's image column:
    # CONDITION_IMAGE_COLUMNS), or None
    image: Path | None = None


DATASET_CHUNK = 1 << 16  # items per list of `iter_dataset`


def load_dataset(dataset: str | Path, video_column: str | None = None, caption_column: str | None = None
                 ) -> list[DatasetItem]:
    """Read any supported layout into items, in the dataset's own order (`iter_dataset`'s lists, joined)."""
    return [item for part in iter_dataset(dataset, video_column, caption_column) for item in part]


def iter_dataset(dataset: str | Path, video_column: str | None = None, caption_column: str | None = None,
                 chunk: int = DATASET_CHUNK) -> Iterator[list[DatasetItem]]:
    """The items of `load_dataset`, in the same order with the same problems and errors, a list of up to `chunk`
    at a time: the list layout and the tables are read as they are consumed (a rerun of ten million rows holds one
    list of items, not every row's); WebDataset tars and sidecar captions come as one list. An item's row number is
    its position in the whole sequence (the items before it, over every list)."""
    root = Path(dataset)
    if not root.exists():
        raise UserError(f"--dataset {dataset}: no such file or folder.")
    if root.is_file():
        if root.suffix.lower() not in TABLE_SUFFIXES:
            raise UserError(f"--dataset {dataset}: a dataset file must be .csv, .json, .jsonl, .parquet or .arrow.")
        yield from _from_table(root, video_column, caption_column, chunk)
        return
    list_files = _list_files(root, video_column, caption_column)
    tables = [root / name for name in METADATA_NAMES if (root / name).is_file()]
    if list_files:
        if tables:
            _two_layouts(root, f"{list_files[0].name} + {list_files[1].name}", tables[0])
        yield from _from_list_files(root, *list_files, chunk)
        return
    if len(tables) > 1:
        _two_layouts(root, tables[0].name, tables[1])
    if tables:
        yield from _from_table(tables[0], video_column, caption_column, chunk)
        return
    # ft's own shards are not a dataset (an --out inside --dataset)
    if any(t.suffix == ".tar" and not (t.parent / MANIFEST_NAME).is_file() for t in walk_files(root)):
        from .webdataset_media import read_webdataset_folder

        yield read_webdataset_folder(root, caption_column)
        return
    items = _from_sidecar_captions(root)
    if not items:
        raise UserError(
            f"--dataset {dataset}: found no dataset in this folder. Give it videos.txt + prompts.txt, a "
            f"metadata.csv/.json/.jsonl/.parquet with path and caption columns, or media files with same-named .txt "
            f"captions beside them.")
    yield items


def row_files(dataset: str | Path, video_column: str | None = None, caption_column: str | None = None
              ) -> list[Path]:
    """The files `iter_dataset` reads rows from as it goes: the table, or the two lists (none for the layouts it
    reads whole: WebDataset tars, sidecar captions)."""
    root = Path(dataset)
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    lists = _list_files(root, video_column, caption_column)
    return list(lists) if lists else [root / name for name in METADATA_NAMES if (root / name).is_file()]


def _two_layouts(root: Path, used: str, other: Path) -> None:
    """Two layouts in one folder: the first in the documented order is read, and the log says so."""
    from ft.common.logs import log

    log.warning(f"--dataset {root} holds two dataset layouts: reading {used}, not {other.name} (the order is "
                f"list files, then metadata.csv/jsonl/json/parquet). To read {other.name}, pass --dataset {other}.")


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


def decode_utf8(data: bytes, where: str) -> tuple[str, str]:
    """(text, "") for UTF-8 bytes (a byte-order mark dropped), else ("", a reason naming `where` and the byte)."""
    try:
        return data.decode("utf-8-sig"), ""
    except UnicodeDecodeError as e:
        return "", (f"{where} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8, "
                    f"e.g. `iconv -f cp1252 -t utf-8`")


def read_lines(path: Path) -> list[tuple[str, str]]:
    """Each line of a text file as (stripped text, problem), trailing blank lines dropped; a line that is not
    UTF-8 comes back as ("", a reason naming the file and line) instead of failing the whole file."""
    raw = path.read_bytes().split(b"\n")
    while raw and not raw[-1].strip():
        raw.pop()
    return [_decoded(line, path, i) for i, line in enumerate(raw)]


def _decoded(line: bytes, path: Path, index: int) -> tuple[str, str]:
    text, problem = decode_utf8(line, f"{path.name} line {index + 1}")
    return text.strip(), problem


def _count_lines(path: Path) -> int:
    """How many lines `read_lines` gives, counted without keeping them."""
    count = 0
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if line.strip():
                count = i + 1
    return count


def _streamed_lines(path: Path, count: int) -> Iterator[tuple[str, str]]:
    """The first `count` of `read_lines`, read as they are consumed."""
    with open(path, "rb") as f:
        for i, line in zip(range(count), f, strict=False):
            yield _decoded(line.removesuffix(b"\n"), path, i)


def _non_blank(lines: list[tuple[str, str]]) -> list[tuple[int, tuple[str, str]]]:
    return [(i + 1, line) for i, line in enumerate(lines) if line[0] or line[1]]


def _blank_lines(lines: list[tuple[str, str]]) -> list[int]:
    return [i + 1 for i, (text, problem) in enumerate(lines) if not text and not problem]


def _from_list_files(root: Path, videos: Path, prompts: Path, chunk: int) -> Iterator[list[DatasetItem]]:
    count = _count_lines(videos)
    if count != _count_lines(prompts):  # rare: paired after dropping blank lines, or an error; read whole
        yield _unequal_lists(root, videos, prompts)
        return
    items: list[DatasetItem] = []
    lines = zip(_streamed_lines(videos, count), _streamed_lines(prompts, count), strict=True)
    for i, ((path, path_problem), (caption, caption_problem)) in enumerate(lines):
        if not path and not caption and not path_problem and not caption_problem:
            continue  # a blank line in both files pairs up with itself: nothing to read
        item = DatasetItem(root / path, caption, f"{videos.name}/{prompts.name} line {i + 1}")
        if path_problem or not path:
            item = _with_problem(item, path_problem or f"{videos.name} line {i + 1} is blank (no media path)",
                                 "bad-path" if path_problem else "empty-cell", videos)
        elif caption_problem:
            item = _with_problem(item, caption_problem, "caption-not-utf8")
        items.append(item)
        if len(items) == chunk:
            yield items
            items = []
    if items:
        yield items


def _unequal_lists(root: Path, videos: Path, prompts: Path) -> list[DatasetItem]:
    """Lists of different lengths: finetrainers skips blank lines, so they pair when what is left pairs up; else
    the error says where the blank lines are."""
    paths, captions = read_lines(videos), read_lines(prompts)
    numbered_paths, numbered_captions = _non_blank(paths), _non_blank(captions)
    if len(numbered_paths) == len(numbered_captions):
        return [DatasetItem(root / p, c, f"{videos.name} line {i}/{prompts.name} line {j}")
                for (i, (p, _)), (j, (c, _)) in zip(numbered_paths, numbered_captions, strict=True)]
    blanks = [f"{f.name} has blank lines at {', '.join(map(str, b[:5]))}" for f, b in
              ((videos, _blank_lines(paths)), (prompts, _blank_lines(captions))) if b]
    why = (f" ({'; '.join(blanks)}: a blank line counts as a line, an empty caption or path; delete it if it "
           "is not one)") if blanks else ""
    raise UserError(f"{videos} has {len(paths)} lines but {prompts} has {len(captions)}: they must pair up "
                    f"line by line (one caption per video){why}.")


def _with_problem(item: DatasetItem, problem: str, kind: str, path: Path | None = None) -> DatasetItem:
    return DatasetItem(path or item.path, item.caption, item.source, problem, kind)


def dataset_root(dataset: str | Path) -> Path:
    """The folder a dataset's media should live under: `--dataset` itself, or the folder of a metadata file."""
    root = Path(dataset)
    return root.parent if root.is_file() else root


def outside_folder(path: Path, root: Path) -> bool:
    """Whether `path` lies outside `root`, judged on the written path ("../x.mp4", "/elsewhere/x.mp4"); a
    symlink inside the folder counts as inside."""
    full, base = os.path.abspath(path), os.path.abspath(root)
    return os.path.commonpath([full, base]) != base


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


def _from_table(path: Path, video_column: str | None, caption_column: str | None, chunk: int
                ) -> Iterator[list[DatasetItem]]:
    columns: tuple[str, str, str | None] | None = None
    number = 0
    for rows in iter_table(path, chunk):
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise UserError(f"{path} row {number + bad + 1} is {type(rows[bad]).__name__} {str(rows[bad])[:60]!r}, "
                            "not an object of named columns; every row needs the path and caption columns.")
        if columns is None and rows:
            names = list(rows[0].keys())
            path_col = pick_column(names, video_column, PATH_COLUMNS, "media path", path)
            caption_col = pick_column(names, caption_column, CAPTION_COLUMNS, "caption", path)
            columns = (path_col, caption_col,
                       next((c for c in names if c.lower() in CONDITION_IMAGE_COLUMNS and c != path_col), None))
        if rows:
            assert columns is not None
            yield [_table_item(path, number + i, row, *columns) for i, row in enumerate(rows)]
        number += len(rows)
    if not number:
        raise UserError(f"{path} has no rows.")


def _table_item(path: Path, i: int, row: dict, path_col: str, caption_col: str, image_col: str | None
                ) -> DatasetItem:
    media, caption = row.get(path_col), row.get(caption_col)
    image = row.get(image_col) if image_col else None
    item = DatasetItem(path.parent / str(media), "" if caption is None else str(caption).strip(),
                       f"{path.name} row {i + 1}",
                       image=path.parent / image if isinstance(image, str) and image.strip() else None)
    if media is None or not str(media).strip():
        return _with_problem(item, f"{path.name} row {i + 1} has an empty {path_col!r} cell", "empty-cell", path)
    if not isinstance(media, str) or not isinstance(caption, (str, type(None))):
        wrong = path_col if not isinstance(media, str) else caption_col
        return _with_problem(item, f"{path.name} row {i + 1}: the {wrong!r} cell is "
                             f"{type(row.get(wrong)).__name__} {str(row.get(wrong))[:40]!r}, not text",
                             "empty-cell", path)
    return item


def walk_files(root: Path) -> list[Path]:
    """Every file under `root`, sorted, following symlinked folders (Path.rglob skips them: a dataset assembled
    from links would lose those clips without a word); a link back to a folder already walked is not followed."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / name for name in files]
    return sorted(found)


def _from_sidecar_captions(root: Path) -> list[DatasetItem]:
    media = [p for p in walk_files(root) if p.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS]
    items = []
    uncaptioned = []
    for p in media:
        caption_file = p.with_suffix(".txt")
        if caption_file.is_file():
            caption, problem = decode_utf8(caption_file.read_bytes(), f"caption file {caption_file}")
            items.append(DatasetItem(p, caption.strip(), caption_file.name, problem,
                                     "caption-not-utf8" if problem else ""))
        else:
            uncaptioned.append(p)
    if items and uncaptioned:
        raise UserError(f"{uncaptioned[0]} has no caption file {uncaptioned[0].with_suffix('.txt').name} beside it "
                        f"({len(uncaptioned)} media files lack one). Add the captions or move those files out.")
    return items

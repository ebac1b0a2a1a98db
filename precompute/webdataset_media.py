"""A folder of WebDataset tars holding media and captions (not ft's shards), read as finetrainers reads one.

A sample is the tar members that share a key (`clip001.mp4`, `clip001.txt`, ...): its media is the member with a
video (mp4, mov) or image (jpg, jpeg, png) extension, its caption the first of finetrainers' caption column names
(`COMMON_WDS_CAPTION_COLUMN_NAMES`: txt, text, caption, ...) that the sample has, or the column `--caption-column`
names. finetrainers draws one of several caption columns at random each step; ft encodes each clip once, so it
takes one. Media members are extracted to a temporary folder for the run (decoders read files); the sample key
hashes the media bytes, so where they are extracted does not matter to the cache.
"""

from __future__ import annotations

import atexit
import shutil
import tarfile
import tempfile
from pathlib import Path

from ft.common.errors import UserError
from ft.common.shards import MANIFEST_NAME

from .datasets import DatasetItem, walk_files

# finetrainers/data/dataset.py, in its order
CAPTION_COLUMNS = (
    "txt", "text", "caption", "captions", "short_caption", "long_caption", "prompt", "prompts", "short_prompt",
    "long_prompt", "description", "descriptions", "alt_text", "alt_texts", "alt_caption", "alt_captions",
    "alt_prompt", "alt_prompts", "alt_description", "alt_descriptions", "image_description", "image_descriptions",
    "image_caption", "image_captions", "image_prompt", "image_prompts", "image_alt_text", "image_alt_texts",
    "image_alt_caption", "image_alt_captions", "image_alt_prompt", "image_alt_prompts", "image_alt_description",
    "image_alt_descriptions", "video_description", "video_descriptions", "video_caption", "video_captions",
    "video_prompt", "video_prompts", "video_alt_text", "video_alt_texts", "video_alt_caption", "video_alt_captions",
    "video_alt_prompt", "video_alt_prompts", "video_alt_description")
MEDIA_COLUMNS = ("mp4", "mov", "jpg", "jpeg", "png")


def _split(name: str) -> tuple[str, str]:
    """WebDataset's key/column split: the column is everything after the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, column = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), column.lower()


def _caption_text(raw: bytes) -> str:
    text = raw.decode("utf-8").strip()  # UnicodeDecodeError: the caller makes it the item's problem
    if text.startswith("b'") and text.endswith("'"):  # a stringified bytes value, as some webdatasets hold
        text = text[2:-1]
    return text


def _extract_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ft-webdataset-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def read_webdataset_folder(root: Path, caption_column: str | None = None) -> list[DatasetItem]:
    """The samples of every `*.tar` under `root` (sorted by path), in tar order."""
    out_dir = _extract_dir()
    items: list[DatasetItem] = []
    wanted = (caption_column,) if caption_column else CAPTION_COLUMNS
    for tar_path in (t for t in walk_files(root) if t.suffix == ".tar" and not (t.parent / MANIFEST_NAME).is_file()):
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, column = _split(member.name)
                    if column in MEDIA_COLUMNS or column in wanted:
                        samples.setdefault(key, {})[column] = tar.extractfile(member).read()  # type: ignore[union-attr]
        except tarfile.TarError as e:
            raise UserError(f"{tar_path} is not a readable tar ({e}).") from e
        target = out_dir / tar_path.relative_to(root).with_suffix("")
        for key, columns in samples.items():
            media = next((c for c in MEDIA_COLUMNS if c in columns), None)
            caption = next((c for c in wanted if c in columns), None)
            if media is None:
                continue  # finetrainers skips what has no media column too
            source = f"{tar_path.name} sample {key}"
            path = (target / f"{key}.{media}").resolve()
            if key.startswith("/") or ".." in Path(key).parts or not path.is_relative_to(target.resolve()):
                # a member name like ../../x.mp4 or /etc/x.mp4 would write outside the extraction folder
                items.append(DatasetItem(target / "refused", "", source=source, problem=f"{tar_path}: member name "
                                         f"{key!r} leads outside the tar; refused, nothing written",
                                         problem_kind="outside-dataset", extracted=True))
                continue
            if caption is None:
                items.append(DatasetItem(path, "", source=source, problem=f"{tar_path}: sample {key!r} has no caption "
                                         f"column; ft looks for {', '.join(wanted[:8])}"
                                         f"{', ...' if len(wanted) > 8 else ''} (name yours with --caption-column)",
                                         problem_kind="empty-cell", extracted=True))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(columns[media])
            try:
                items.append(DatasetItem(path, _caption_text(columns[caption]), source=source, extracted=True))
            except UnicodeDecodeError as e:
                items.append(DatasetItem(path, "", source=source, problem=f"{tar_path}: the {caption} caption of "
                                         f"sample {key!r} is not UTF-8 ({e.reason} at byte {e.start}); re-encode it "
                                         "as UTF-8", problem_kind="caption-not-utf8", extracted=True))
    if not items:
        raise UserError(f"{root}: its tars hold no samples with a media member ({', '.join(MEDIA_COLUMNS)}).")
    return items

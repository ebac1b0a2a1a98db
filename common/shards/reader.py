"""Reading shards: a fast tar walk (`_tar_members`), verified streaming of samples (`iter_shard`), and the
compact per-shard index files that let a rerun or `ft train` see what a shard holds without opening it.

`iter_shard` reads each member with one `readinto` into the buffer its tensors will view, checks the shard's
digest as it goes, and refuses any member that is not `.json` or `.safetensors` (a pickle could run code) and any
name leaving the shard. It never extracts anything.

The index file `<shard>.idx` beside each shard (written by `ShardWriter`) is JSON lines: a header naming the shard,
its size and digests, then one `[key, video_key, text_key, bucket, begin, end]` row per sample (the byte span of
its members in the tar), with a seventh item, `image_key`, for an image-to-video sample (its image half's key).
`shard_rows` reads it when its header matches the shard's manifest entry and size, and otherwise (a shard set
written before indexes existed, or a damaged index) falls back to the tar headers and JSON members
(`shard_index`). Training reads one index of the whole set instead (set_index.py), built from these. A plain
WebDataset reader ignores the index and reads the tars alone.
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from ..errors import UserError
from .buckets import bucket_name
from .codec import file_digest, new_hasher, safetensors_layout, tensors_from_bytes
from .manifest import MANIFEST_NAME, ShardInfo

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "ft-shard-index"
INDEX_VERSION = 1


@dataclass
class Sample:
    """One decoded sample: tensor groups (views of the shard's bytes) and its JSON metadata."""

    key: str
    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]


class ShardCorruptError(UserError):
    """A shard's bytes do not match the digest in its manifest, or the tar cannot be read."""


def _read_exact(f: BinaryIO, buf: bytearray | memoryview, sha: Any) -> int:
    """Fill `buf` from the unbuffered file `f` (straight from the kernel, no intermediate copy); hash it."""
    view, got = memoryview(buf), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    if sha is not None:
        sha.update(view[:got])
    return got


def _tar_members(f: BinaryIO, sha: Any, path: Path, wanted: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, bytearray]]:
    """Regular-file members of an uncompressed tar as (name, bytes), each read with one `readinto`.

    Python's tarfile streams members through 10 KiB buffers, which made reading cached latents slower than
    torch.load; this reads each member's bytes once into the buffer its tensors will view. It understands ustar,
    GNU long names ('L') and pax path records ('x'), which covers what WebDataset writers produce.
    Members whose name `wanted` refuses are skipped: seeked over, or read and hashed when `sha` is verifying.
    """
    header = bytearray(512)
    long_name = None
    while True:
        got = _read_exact(f, header, sha)
        if got == 0 or header.count(0) == 512:  # end of archive
            return
        if got < 512:
            raise ShardCorruptError(f"{path}: the tar ends inside a header; the shard is truncated.")
        try:
            info = tarfile.TarInfo.frombuf(bytes(header), "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ShardCorruptError(f"{path}: not a readable tar ({e}).") from e
        padding = -info.size % 512
        if (wanted is not None and info.type in tarfile.REGULAR_TYPES
                and not wanted(long_name or info.name)):
            long_name = None
            if sha is None:
                f.seek(info.size + padding, os.SEEK_CUR)
                continue
            scratch = bytearray(min(info.size + padding, 1 << 20) or 1)
            left = info.size + padding
            while left:
                view = memoryview(scratch)[: min(left, len(scratch))]
                got = _read_exact(f, view, sha)
                if got < len(view):
                    raise ShardCorruptError(f"{path}: the tar ends inside a member; the shard is truncated.")
                left -= got
            continue
        data = bytearray(info.size)
        if _read_exact(f, data, sha) < info.size:
            raise ShardCorruptError(f"{path}: {info.name} is truncated; the shard is incomplete.")
        if padding:
            pad = bytearray(padding)
            _read_exact(f, pad, sha)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            for record in data.decode("utf-8", "surrogateescape").splitlines():
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
        elif info.type in tarfile.REGULAR_TYPES:
            yield (long_name or info.name), data
            long_name = None
        elif info.type != tarfile.XGLTYPE:
            long_name = None


ALLOWED_MEMBER_SUFFIXES = (".safetensors", "json")


def _check_member(path: Path, name: str, ext: str) -> None:
    """Refuse what ft never writes and must never load: pickles (.pth, .pyd, ...) and names that leave the shard."""
    if not ext.endswith(ALLOWED_MEMBER_SUFFIXES):
        raise ShardCorruptError(f"{path}: member {name} is neither .json nor .safetensors. ft shards never hold "
                                "pickles (.pth, .pt, .pyd, .pickle) because loading one can run code; it was not "
                                "loaded. Rebuild the shard with `ft precompute`.")
    if name.startswith("/") or ".." in name.split("/"):
        raise ShardCorruptError(f"{path}: member {name} has a path leaving the shard; it was not read.")


def _member_key(name: str) -> str:
    return os.path.basename(name).partition(".")[0]


def iter_shard(path: str | Path, expected_sha256: str | None = None,
               wanted: Callable[[str], bool] | None = None, *, verify: ShardInfo | None = None) -> Iterator[Sample]:
    """Stream the samples of one tar shard, verifying its bytes as they are read when told what to expect.

    `verify`: the shard's manifest entry; its fastest recorded digest is checked (`ShardInfo.check`).
    `expected_sha256`: check the sha256 instead (`ft inspect --verify`, or a caller holding only that).
    Members of a sample must be adjacent (as `ShardWriter` and every WebDataset writer leave them). The digest
    covers the whole file, so a damaged shard is reported once it has been read to the end. With `wanted`, only
    the samples whose key it accepts are decoded; the others' bytes are skipped (or only hashed).
    """
    assert expected_sha256 is None or verify is None, "pass one of expected_sha256 and verify"
    path = Path(path)
    algorithm, expected = verify.check() if verify is not None else ("sha256", expected_sha256)
    sha = new_hasher(algorithm) if expected else None
    member_wanted = None if wanted is None else (lambda name: wanted(_member_key(name)))
    with open(path, "rb", buffering=0) as f:
        key, tensors, meta = None, {}, None
        for name, buf in _tar_members(f, sha, path, member_wanted):  # type: ignore[arg-type]
            k, _, ext = os.path.basename(name).partition(".")
            _check_member(path, name, ext)
            if k != key:
                if key is not None and meta is not None:
                    yield Sample(key, tensors, meta)
                key, tensors, meta = k, {}, None
            try:
                if ext == "json":
                    meta = json.loads(buf)
                elif ext.endswith(".safetensors"):
                    tensors[ext[: -len(".safetensors")]] = tensors_from_bytes(buf)
            except (ValueError, KeyError, TypeError, struct.error, RuntimeError) as e:  # a damaged JSON or header
                raise ShardCorruptError(f"{path}: member {name} is damaged ({e}). Delete the shard and rerun "
                                        "`ft precompute` with the same --out to rebuild it.") from e
        if key is not None and meta is not None:
            yield Sample(key, tensors, meta)
        if sha is not None:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
            if sha.hexdigest() != expected:
                raise ShardCorruptError(f"{path}: {algorithm} does not match {MANIFEST_NAME}; the shard is damaged. "
                                        "Delete it and rerun `ft precompute` with the same --out to rebuild it.")


def verify_shard(path: str | Path, expected_sha256: str) -> int:
    """The samples in a shard (keys with a JSON member), its sha256 checked against `expected_sha256` as it is
    read; raises ShardCorruptError as `iter_shard` would. Each member is checked as `iter_shard` checks it (its
    name, its JSON, its safetensors header against its bytes) but no tensor is made (what `ft inspect --verify`
    needs of a million samples)."""
    path = Path(path)
    sha = new_hasher("sha256")
    count, key, whole = 0, None, False
    with open(path, "rb", buffering=0) as f:
        for name, buf in _tar_members(f, sha, path):
            k, _, ext = os.path.basename(name).partition(".")
            _check_member(path, name, ext)
            if k != key:
                count, key, whole = count + whole, k, False
            try:
                if ext == "json":
                    whole = json.loads(buf) is not None
                elif ext.endswith(".safetensors"):
                    safetensors_layout(buf)
            except (ValueError, KeyError, TypeError, struct.error) as e:
                raise ShardCorruptError(f"{path}: member {name} is damaged ({e}). Delete the shard and rerun "
                                        "`ft precompute` with the same --out to rebuild it.") from e
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    if sha.hexdigest() != expected_sha256:
        raise ShardCorruptError(f"{path}: sha256 does not match {MANIFEST_NAME}; the shard is damaged. Delete it and "
                                "rerun `ft precompute` with the same --out to rebuild it.")
    return count + whole


def describe_shard(path: str | Path) -> ShardInfo:
    """A `ShardInfo` made by reading a shard (for one that is complete on disk but missing from its manifest)."""
    buckets: Counter[str] = Counter()
    samples = 0
    for sample in iter_shard(path):
        samples += 1
        buckets[bucket_name(*sample.meta["bucket"])] += 1
    path = Path(path)
    return ShardInfo(path.name, samples, path.stat().st_size, file_digest(path), dict(sorted(buckets.items())),
                     file_digest(path, algorithm="xxh3_128"))


def shard_keys(path: str | Path) -> set[str]:
    """The keys of the whole samples in a shard (those with their `.json`, written last), from member names only."""
    with tarfile.open(path, "r:") as tar:
        names = [os.path.basename(n).partition(".") for n in tar.getnames()]
    return {key for key, _, ext in names if ext == "json"}


def shard_index(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(key, JSON metadata) of each whole sample of a shard, in file order, reading only tar headers and the JSON
    members: tensors are seeked over. This is what lets training plan an epoch, or fast-forward a resumed one,
    without reading any latents."""
    path = Path(path)
    out = []
    with open(path, "rb", buffering=0) as f:
        for name, buf in _tar_members(f, None, path, lambda n: n.endswith(".json")):  # type: ignore[arg-type]
            try:
                out.append((_member_key(name), json.loads(buf)))
            except ValueError as e:
                raise ShardCorruptError(f"{path}: member {name} is damaged ({e}). Delete the shard and rerun "
                                        "`ft precompute` with the same --out to rebuild it.") from e
    return out


class IndexRow(NamedTuple):
    """One sample as the shard index records it; `begin`/`end` are -1 when read from tar headers instead;
    `image_key` is an image-to-video sample's third half key (a text-to-video sample's row leaves it out)."""

    key: str
    video_key: str
    text_key: str
    bucket: str
    begin: int
    end: int
    image_key: str = ""


def index_path(shard_path: str | Path) -> Path:
    """`shard-000003.tar` -> `shard-000003.idx`, beside it."""
    shard_path = Path(shard_path)
    return shard_path.with_name(shard_path.name.removesuffix(".tar") + INDEX_SUFFIX)


def index_header(info: ShardInfo) -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": info.name, "bytes": info.bytes,
            "sha256": info.sha256, "xxh3_128": info.xxh3_128, "samples": info.samples}


def read_index_file(shard_path: str | Path, info: ShardInfo | None = None) -> list[IndexRow] | None:
    """The rows of a shard's index file, or None when there is none or it does not describe this shard (its
    header must match `info` when given, and the shard's size on disk)."""
    path = index_path(shard_path)
    try:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0])
        size = Path(shard_path).stat().st_size
    except (OSError, ValueError, IndexError):
        return None
    if (not isinstance(header, dict) or header.get("format") != INDEX_FORMAT
            or header.get("version") != INDEX_VERSION or header.get("bytes") != size):
        return None
    if info is not None and (header.get("sha256") != info.sha256 or header.get("samples") != info.samples
                             or (info.xxh3_128 and header.get("xxh3_128") != info.xxh3_128)):
        return None
    try:  # one JSON array of every row: a parse per shard, not per row
        rows = [IndexRow(*row) for row in json.loads("[" + ",".join(lines[1:]) + "]")]
    except (ValueError, TypeError):
        return None
    return rows if len(rows) == header.get("samples") else None


def rows_from_headers(shard_path: str | Path) -> list[IndexRow]:
    """What an index file would say, read from the tar headers and JSON members (no byte spans)."""
    return [IndexRow(key, meta.get("video_key", ""), meta.get("text_key", ""), bucket_name(*meta["bucket"]), -1, -1,
                     meta.get("image_key", "")) for key, meta in shard_index(shard_path)]


def shard_rows(shard_path: str | Path, info: ShardInfo | None = None) -> list[IndexRow]:
    """A shard's samples in file order: from its index file when it matches, else from its tar headers."""
    rows = read_index_file(shard_path, info)
    return rows if rows is not None else rows_from_headers(shard_path)


def write_index_file(shard_path: str | Path, info: ShardInfo, rows: list[IndexRow]) -> Path:
    """Write a shard's index atomically (a kill never leaves a torn one that looks whole)."""
    path = index_path(shard_path)
    tmp = path.with_name(path.name + ".tmp")
    lines = [index_header(info), *(row if row.image_key else row[:6] for row in rows)]
    tmp.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
    os.replace(tmp, path)
    return path

"""THE contract between `ft precompute` and `ft train`: WebDataset tar shards plus a manifest.

A shard set is a folder holding `manifest.json` and `*.tar` shards. A sample is the tar members sharing a key:

    <key>.latents.safetensors   the VAE posterior of the clip (the ModelSpec names the tensors: mean, logvar, ...)
    <key>.cond.safetensors      the text conditioning (prompt_embeds, masks, pooled embeddings, ...)
    <key>.json                  caption, source path, source fps, frame indices, bucket, latent shape, model family

`<key>` is a content hash (`sample_key`) of everything that produced the sample, so a rerun, a grown dataset or
another experiment can reuse what was already encoded. Tensors travel as safetensors and metadata as JSON: no
pickle anywhere in the data path. Any plain WebDataset reader can read the shards; `iter_shard` here adds
verification and a zero-copy decode (tensors are views of the bytes read from the tar). Each shard's manifest
entry records two digests of its bytes: sha256 (the archival one) and xxh3-128, which hashes at several GB/s and
is what the reader checks (bench/loader.py: sha256 held the verified first pass to about a quarter of the
unverified rate; xxh3 keeps it within 2x). Manifests written before xxh3 was recorded are verified by sha256.

Shards are written to `<name>.tar.tmp` and renamed when complete, so a killed job never leaves a truncated
`.tar` that looks whole; the manifest lists only completed shards, and says whether the run that wrote it
finished (`complete`, and `missing`: the dataset's samples not encoded yet, per bucket). `require_complete` is
what `ft train` asks before it trains.

Safety: the reader refuses any member that is not `.json` or `.safetensors` (a `.pth`, `.pyd` or `.pickle`
would be a pickle, which can run code when loaded), checks every safetensors header against the bytes it
describes, and never extracts anything: reading a shard set writes nothing anywhere.

Test hook: `FT_TEST_KILL_AT=<point>[:<n>]` makes the process SIGKILL itself the n-th time (default 1st) it
reaches a named point (`kill_point`), so the kill tests can stop `ft precompute` exactly between two steps, such
as a shard's rename and its manifest entry (`FT_TEST_KILL_SIGNAL=INT` sends a Ctrl-C instead). It is read only by
`kill_point` and does nothing when unset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import struct
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import __version__
from .errors import UserError

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ACTIVE_KEYS_NAME = "active_keys.txt"
EMPTY_CAPTION_NAME = "empty_caption.safetensors"
TENSOR_GROUPS = ("latents", "cond")


def kill_point(name: str) -> None:
    """Test hook (see the module docstring): SIGKILL this process at the named point when FT_TEST_KILL_AT asks."""
    wanted = os.environ.get("FT_TEST_KILL_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    if _KILL_COUNTS[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("FT_TEST_KILL_SIGNAL", "KILL")))


_KILL_COUNTS: dict[str, int] = {}


def sample_key(parts: dict[str, Any]) -> str:
    """The content hash naming a sample: sha256 of the canonical JSON of what produced it (first 32 hex chars)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def new_hasher(algorithm: str = "sha256") -> Any:
    """A hashlib-style object (`update`, `hexdigest`) for one of the digests a manifest records."""
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.new(algorithm)


def file_digest(path: str | Path, chunk: int = 1 << 20, algorithm: str = "sha256") -> str:
    """The digest of a file's bytes: sha256, or "xxh3_128"."""
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bucket_name(frames: int, height: int, width: int) -> str:
    """`(49, 480, 720)` -> `'49x480x720'`, the spelling of `--buckets` and of the manifest's histograms."""
    return f"{frames}x{height}x{width}"


# ---------------------------------------------------------------------------------------------- tensors <-> bytes

_ST_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize named tensors as safetensors bytes (contiguous CPU copies)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def tensors_from_bytes(buf: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into tensors that VIEW `buf` (no copy). Pass a bytearray for writable tensors.

    The header is checked against the bytes before any tensor is made: a known dtype, offsets inside the data,
    and a shape whose size is the span's; anything else raises ValueError (never an out-of-bounds view)."""
    import torch

    if len(buf) < 8:
        raise ValueError("shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", bytes(buf[:8]))
    if header_len > len(buf) - 8:
        raise ValueError(f"the header claims {header_len} bytes but the member has {len(buf) - 8}")
    header = json.loads(bytes(buf[8 : 8 + header_len]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    base = 8 + header_len
    data_len = len(buf) - base
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info.get("dtype") if isinstance(info, dict) else None
        if dtype_name not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has an unknown dtype {dtype_name!r}")
        dtype = getattr(torch, _ST_DTYPES[dtype_name])
        begin, end = (int(x) for x in info["data_offsets"])
        shape = [int(d) for d in info["shape"]]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (not 0 <= begin <= end <= data_len or any(d < 0 for d in shape)
                or end - begin != math.prod(shape) * itemsize):
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} and shape {shape} do not fit the data")
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // itemsize,
                                     offset=base + begin).view(shape)
    return out


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    """One completed shard: its file name, sample count, size, digests and bucket histogram.

    `xxh3_128` is empty in manifests written before it was recorded; readers then verify the sha256.
    """

    name: str
    samples: int
    bytes: int
    sha256: str
    buckets: dict[str, int] = field(default_factory=dict)
    xxh3_128: str = ""

    def check(self) -> tuple[str, str]:
        """The digest the reader verifies: (algorithm, hex digest), the fastest one recorded."""
        return ("xxh3_128", self.xxh3_128) if self.xxh3_128 else ("sha256", self.sha256)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardInfo:
        """Read a manifest entry, ignoring keys a newer ft may have added."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Manifest:
    """What a shard set holds and how it was made. Written as `manifest.json` beside the shards."""

    model_family: str
    encoders: dict[str, Any]
    encoder_fingerprint: str
    encoding: dict[str, Any]
    shapes: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    # The dataset's view of the cache: the keys of the last completed precompute run (in ACTIVE_KEYS_NAME) and
    # their bucket histogram. Samples outside it (old captions, removed clips) stay cached but are not trained on.
    active: dict[str, Any] = field(default_factory=dict)
    # The conditioning of the empty caption, for caption dropout: {"file": EMPTY_CAPTION_NAME, "sha256": ...}
    empty_caption: dict[str, Any] = field(default_factory=dict)
    # The prompt table (validation prompts and the negative prompt), in its own files: see common/prompts.py
    prompts: dict[str, Any] = field(default_factory=dict)
    # Whether the run that last wrote this manifest finished, and the dataset's samples it had not encoded yet
    # (bucket -> count). None: written by an ft before 0.2 that did not record it (judged from `active` on load).
    complete: bool | None = None
    missing: dict[str, int] = field(default_factory=dict)
    # Inputs kept with a note (caption cut at the text length, duplicate rows, ...), like `rejected`.
    warnings: list[dict[str, str]] = field(default_factory=list)
    # How to run precompute again on the same data and --out (the saved config), to complete the set.
    resume_command: str = ""
    schema_version: int = SCHEMA_VERSION
    tool: str = "ft"
    tool_version: str = __version__
    updated: str = ""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def bucket_histogram(self) -> dict[str, int]:
        """Samples per bucket over every shard (cached samples outside the active view included)."""
        total: Counter[str] = Counter()
        for s in self.shards:
            total.update(s.buckets)
        return dict(sorted(total.items()))

    def training_histogram(self) -> dict[str, int]:
        """Samples per bucket that training uses: the active view (less what is not encoded yet) when there is
        one, else every sample."""
        if not self.active:
            return self.bucket_histogram()
        counts = {b: n - self.missing.get(b, 0) for b, n in self.active["buckets"].items()}
        return {b: n for b, n in counts.items() if n > 0}

    @property
    def missing_samples(self) -> int:
        return sum(self.missing.values())

    def set_active(self, folder: str | Path, keys: list[str], buckets: dict[str, int]) -> None:
        """Record the current dataset's keys (written atomically to ACTIVE_KEYS_NAME) as the training view."""
        path = Path(folder) / ACTIVE_KEYS_NAME
        tmp = path.with_suffix(".txt.tmp")
        tmp.write_text("".join(k + "\n" for k in keys))
        os.replace(tmp, path)
        self.active = {"keys_file": ACTIVE_KEYS_NAME, "samples": len(keys), "buckets": dict(sorted(buckets.items()))}

    def set_empty_caption(self, folder: str | Path, cond: dict[str, torch.Tensor]) -> None:
        """Store the empty caption's conditioning (one sample, batch dimension dropped) beside the shards."""
        data = tensors_to_bytes(cond)
        path = Path(folder) / EMPTY_CAPTION_NAME
        tmp = path.with_suffix(".safetensors.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.empty_caption = {"file": EMPTY_CAPTION_NAME, "sha256": hashlib.sha256(data).hexdigest()}

    def active_keys(self, folder: str | Path) -> set[str] | None:
        """The keys training uses, or None for all of them."""
        if not self.active:
            return None
        path = Path(folder) / self.active["keys_file"]
        if not path.is_file():
            raise UserError(f"{path} is missing; rerun `ft precompute` with the same --out to rewrite it.")
        return set(path.read_text().split())

    def save(self, folder: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written manifest."""
        self.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not Path(folder).exists():
            raise UserError(f"{folder}: no such shard folder. Run `ft precompute ... --out {folder}` first.")
        if not path.is_file():
            raise UserError(f"{folder} has no {MANIFEST_NAME}: it is not a shard set written by `ft precompute`.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}): delete it and rerun `ft precompute` with the same "
                            "--out; the shards there are adopted, not encoded again.") from e
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"{path} has schema version {version}; this ft reads version {SCHEMA_VERSION}. "
                            "Re-encode with this version of `ft precompute`.")
        data["shards"] = [ShardInfo.from_json(s) for s in data.get("shards", [])]
        if "complete" not in data:  # ft 0.1 recorded the training view only when a run finished
            data["complete"] = bool(data.get("active"))
            data["completeness_guessed"] = True
        known = {f.name for f in dataclasses.fields(cls)}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest.completeness_guessed = bool(data.get("completeness_guessed"))
        return manifest

    completeness_guessed = False  # set on load: an older manifest without `complete` (not saved)

    def describe_completeness(self) -> str:
        """One line: complete, or how much of the dataset is missing and how to encode it."""
        if self.complete:
            note = " (an older manifest without the field: judged from its training view)" \
                if self.completeness_guessed else ""
            return f"complete{note}"
        how = f"`{self.resume_command}`" if self.resume_command else "`ft precompute` again with the same flags"
        if self.completeness_guessed:
            return (f"INCOMPLETE: written by an older ft whose run did not finish (no training view); run {how} "
                    "to complete it")
        count = f"{self.missing_samples} samples of the dataset are not encoded yet" if self.missing else \
            "the run that wrote it did not finish"
        return f"INCOMPLETE: {count}; run {how} to complete it"


def require_complete(manifest: Manifest, folder: str | Path, allow_incomplete: bool = False) -> None:
    """Refuse to train on a shard set whose precompute run did not finish, naming the command that completes it;
    with `allow_incomplete`, warn with the count instead."""
    if manifest.complete:
        return
    status = manifest.describe_completeness()
    if not allow_incomplete:
        raise UserError(f"{folder} is {status}. Training on it would see only part of the dataset (some buckets "
                        "may be empty); or pass --allow-incomplete to train on what is there.")
    from .logs import log

    usable = sum(manifest.training_histogram().values())
    log.warning(f"--allow-incomplete: {folder} is {status}; training on the {usable} samples encoded so far")


def open_shard_set(folder: str | Path) -> tuple[Manifest, list[Path]]:
    """The manifest and the shard paths of a shard set, checking that every listed shard is there."""
    manifest = Manifest.load(folder)
    paths = [Path(folder) / s.name for s in manifest.shards]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{folder}: {len(missing)} shard(s) listed in {MANIFEST_NAME} are missing "
                        f"(first: {missing[0]}). Rerun `ft precompute` with the same --out to rebuild them.")
    if not paths:
        raise UserError(f"{folder} holds no samples (every input was rejected?); see `ft inspect {folder}`.")
    return manifest, paths


# ---------------------------------------------------------------------------------------------- writing


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.xxh3, self.size = f, hashlib.sha256(), new_hasher("xxh3_128"), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.xxh3.update(b)
        self.size += len(b)
        return self.f.write(b)


class ShardWriter:
    """Writes samples into `<prefix>-NNNNNN.tar` shards of at most `max_samples` samples / `max_bytes` bytes.

    `on_shard` is called with each completed shard's `ShardInfo`, after its rename, so the caller can record it in
    the manifest at once (a kill then loses at most the shard being written).
    """

    def __init__(self, folder: str | Path, prefix: str = "shard", start_index: int = 0, max_samples: int = 256,
                 max_bytes: int = 1 << 30, on_shard: Callable[[ShardInfo], None] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix, self.index = prefix, start_index
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.on_shard = on_shard
        self.completed: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None  # the .tar.tmp being written, until it is renamed into place
        self._writing = False

    def _open(self) -> None:
        self._name = f"{self.prefix}-{self.index:06d}.tar"
        self._tmp = self.folder / (self._name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._hasher = _HashingWriter(self._file)
        # plain "w" mode writes each member through at once (stream mode would hold 10 KiB back)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.USTAR_FORMAT)
        self._samples, self._buckets = 0, Counter()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Add one sample: `tensors` maps a group ('latents', 'cond') to named tensors; `meta` is its JSON."""
        assert set(tensors) <= set(TENSOR_GROUPS), tensors.keys()
        members = [(f"{key}.{group}.safetensors", tensors_to_bytes(named)) for group, named in tensors.items()]
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))  # last: marks the sample whole
        if self._tar is None:
            self._open()
        self._writing = True  # an interrupt between here and the end leaves a half-written sample
        for name, data in members:
            self._add(name, data)
            kill_point("sample-member")
        self._writing = False
        self._samples += 1
        self._buckets[bucket_name(*meta["bucket"])] += 1
        if self._samples >= self.max_samples or self._hasher.size >= self.max_bytes:
            self.finish_shard()

    def discard(self) -> tuple[int, int] | None:
        """Drop the shard being written (a write failed: disk full), freeing its space; returns its (bytes,
        samples), or None when none was open. Errors closing it are ignored: its bytes are being thrown away."""
        if self._tmp is None:  # none open (or the last one was renamed into place)
            return None
        if self._tar is not None:
            self._tar.closed = True  # nothing more may be written to it
        try:
            self._file.close()
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)
        self._tar, self._tmp, self._writing = None, None, False
        return self._hasher.size, self._samples

    def finish_shard(self) -> ShardInfo | None:
        """Close the shard being written (if any), rename it into place and report it."""
        if self._tar is None:
            return None
        if self._writing:  # interrupted inside a sample: the tar's end is damaged, so the shard is not kept
            self.discard()
            return None
        tar, self._tar = self._tar, None  # an interrupt from here on must not close it twice
        tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        kill_point("shard-written")
        os.replace(self.folder / (self._name + ".tmp"), self.folder / self._name)
        self._tmp = None
        kill_point("shard-renamed")  # an unlisted whole shard: the next run adopts it
        info = ShardInfo(self._name, self._samples, self._hasher.size, self._hasher.sha.hexdigest(),
                         dict(sorted(self._buckets.items())), self._hasher.xxh3.hexdigest())
        self.index += 1
        self.completed.append(info)
        if self.on_shard:
            self.on_shard(info)
        return info


# ---------------------------------------------------------------------------------------------- reading


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

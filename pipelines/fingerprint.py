"""The encoders' fingerprint from their files, without instantiating a model (or, failing that, from the model).

A shard set names the encoders that made it (`Manifest.encoders`, hashed into every sample key). Loading a T5-XXL
only to learn that nothing needs encoding cost a rerun most of the first run's time, so the fingerprint is read
from what is stored: each component's `config.json` (with the class's defaults filled in, as the loaded model's
config has them), its weights' bytes as stored (every safetensors tensor's name, dtype and shape, and up to 64 KiB
of its bytes: start, middle and end, found through the safetensors header; the shard index of sharded weights
too), the tokenizer files, and the dtype each component is loaded in.

Sources: a local diffusers folder and its component subfolders, a per-component override (`--vae-id`, ...) as
`ModelSpec._source` resolves it, or a hub id whose files are in the Hugging Face cache (fetched there when online:
configs, tokenizer files and the safetensors the component loads). What cannot be read this way (a single-file
checkpoint, `.bin` weights, a hub id offline and not cached) raises `FilesUnavailable`, and the caller falls back
to loading the models and fingerprinting them (`module_fingerprint`, below: the same facts read from the loaded
module, its weights sampled where they live), saying so.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common.dtypes import dtype_name

if TYPE_CHECKING:
    import torch

SAMPLE_BYTES = 1 << 16
TOKENIZER_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken")
DROP_CONFIG_KEYS = {"_name_or_path", "_commit_hash", "transformers_version", "_diffusers_version", "dtype",
                    "torch_dtype", "_use_default_values", "architectures", "name_or_path", "_class_name"}


class FilesUnavailable(Exception):
    """A component's files cannot be read without loading it (the message says why)."""


def clean_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config as the fingerprint holds it: bookkeeping keys dropped, JSON-normal (tuples as lists), sorted."""
    return json.loads(json.dumps({k: v for k, v in data.items() if k not in DROP_CONFIG_KEYS}, default=str,
                                 sort_keys=True))


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of a .safetensors file and where its data starts. A file that is not one (truncated, a git-lfs
    pointer, an HTML error page) raises FilesUnavailable: the caller then loads the model, which names the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8 or length > 1 << 28:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (struct.error, ValueError) as e:
            raise FilesUnavailable(f"{path} is not a readable safetensors file ({e})") from e
    return header, 8 + length


def stored_weights_digest(files: list[Path], index: Path | None = None, sample_bytes: int = SAMPLE_BYTES) -> str:
    """A digest of weights as stored: each tensor's name, dtype and shape, and up to `sample_bytes` of its bytes
    (start, middle, end), in name order over all files; plus the shard index's weight map when sharded."""
    tensors: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for path in files:
        header, base = read_safetensors_header(path)
        for name, info in header.items():
            if name != "__metadata__":
                tensors[name] = (path, base, info)
    h = hashlib.sha256()
    if index is not None:
        h.update(json.dumps(json.loads(index.read_text()).get("weight_map", {}), sort_keys=True).encode())
    third = sample_bytes // 3
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(tensors):
            path, base, info = tensors[name]
            h.update(f"{name}:{tuple(info['shape'])}:{info['dtype']}".encode())
            begin, end = info["data_offsets"]
            size = end - begin
            if not size:
                continue
            f = handles.setdefault(path, open(path, "rb"))  # noqa: SIM115 (closed below)
            for start in (0, max(0, size // 2 - third // 2), max(0, size - third)):
                f.seek(base + begin + start)
                h.update(f.read(min(third, size - start)))
    finally:
        for f in handles.values():
            f.close()
    return h.hexdigest()[:32]


def read_stored_tensor(files: list[Path], name: str) -> list[float]:
    """One small tensor's values (a VAE's latents_mean, say) read from the safetensors files, as floats."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return [float(x) for x in f.get_tensor(name).float().reshape(-1)]
    raise FilesUnavailable(f"no tensor {name} in {', '.join(str(p) for p in files)}")


@dataclass
class ComponentFiles:
    """Where a component's files are on this machine: its folder, and its safetensors (with the index)."""

    folder: Path
    weights: list[Path]
    index: Path | None = None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def hub_hint(source: str) -> str:
    """What to do when a model source that is not a local path could not be read: it is a hub id, and either ft is
    offline (HF_HUB_OFFLINE) and it is not in the cache, or the download failed. Empty for a local path."""
    if Path(source).exists() or source.count("/") != 1 or source.startswith((".", "/", "~")):
        return ""
    fetch = (f"download it where there is a network (`huggingface-cli download {source} --local-dir DIR`) and pass "
             "the folder DIR instead")
    if offline():
        return (f" {source} is a Hugging Face Hub id, HF_HUB_OFFLINE is set and it is not in the Hugging Face cache "
                f"(HF_HOME, or --cache-dir): {fetch}, or unset HF_HUB_OFFLINE on a machine that can reach the Hub.")
    return (f" {source} is a Hugging Face Hub id and reading it from the Hub failed: check the id and the network, "
            f"or {fetch}.")


def _hub_folder(repo: str, subfolder: str | None, revision: str | None, cache_dir: str | None,
                patterns: list[str]) -> Path:
    """A hub component's folder in the local cache: from the cache first, then (when online) fetched."""
    from huggingface_hub import snapshot_download

    allow = [f"{subfolder}/{p}" if subfolder else p for p in patterns]
    try:
        root = snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=allow,
                                 local_files_only=True)
    except Exception as cached_error:  # not cached (LocalEntryNotFoundError, ...)
        if offline():
            raise FilesUnavailable(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                                   f"({cached_error})") from cached_error
        try:
            root = snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=allow)
        except Exception as e:
            raise FilesUnavailable(f"could not fetch {repo}'s files: {e}") from e
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise FilesUnavailable(f"{repo} has no {subfolder}/ folder in the cache")
    return folder


def _weight_files(folder: Path, variant: str | None) -> tuple[list[Path], Path | None]:
    """The safetensors a from_pretrained of `folder` loads (sharded through an index, or one file)."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for index in sorted(folder.glob(f"*{suffix}.index.json")):
        if variant is None and index.name.count(".") > 3:  # a variant's index, e.g. model.fp16.safetensors...
            continue
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        files = [folder / n for n in names]
        if names and all(p.is_file() for p in files):
            return files, index
    singles = [p for p in sorted(folder.glob(f"*{suffix}")) if variant or p.name.count(".") == 1]
    if len(singles) == 1:
        return singles, None
    have = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise FilesUnavailable(f"{folder} has no single set of {suffix} weights (it has: {have})")


def locate(source: str, subfolder: str | None, revision: str | None, cache_dir: str | None, variant: str | None,
           tokenizer: bool) -> ComponentFiles:
    """Find a component's files: a local folder (or its subfolder), or a hub id's files in the cache."""
    if source.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth")):
        raise FilesUnavailable(f"{source} is a single-file checkpoint (its config is derived when loading)")
    local = Path(source)
    if local.exists():
        folder = local / subfolder if subfolder else local
    else:
        weights = [] if tokenizer else (
            [f"*.{variant}.safetensors", f"*.{variant}.safetensors.index.json"] if variant
            else ["*.safetensors", "*.safetensors.index.json"])
        folder = _hub_folder(source, subfolder, revision, cache_dir, [*TOKENIZER_PATTERNS, *weights])
    if not folder.is_dir():
        raise FilesUnavailable(f"{folder} is not a folder")
    if tokenizer:
        return ComponentFiles(folder, [])
    if not (folder / "config.json").is_file():
        raise FilesUnavailable(f"{folder} has no config.json")
    files, index = _weight_files(folder, variant)
    return ComponentFiles(folder, files, index)


def _config_with_defaults(cls: type, folder: Path) -> dict[str, Any]:
    """The config a loaded model would report: config.json over the class's defaults (diffusers'
    register_to_config), or the transformers config class's own `to_dict`."""
    if cls.__module__.startswith("transformers"):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder)).to_dict()
    raw = json.loads((folder / "config.json").read_text())
    params = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in params.items()
                if k != "self" and p.default is not inspect.Parameter.empty and p.kind == p.POSITIONAL_OR_KEYWORD}
    return {**defaults, **{k: v for k, v in raw.items() if not k.startswith("_")}}


def tokenizer_files_digest(folder: Path) -> str:
    """sha256 over the tokenizer files in `folder` (names and bytes, in name order): vocabularies, merges,
    sentencepiece models and their JSON configs; weights beside them are not read."""
    h = hashlib.sha256()
    for path in sorted({p for pattern in TOKENIZER_PATTERNS for p in folder.glob(pattern) if p.is_file()}):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:32]


def file_fingerprint(cls: type, files: ComponentFiles, dtype_name: str | None) -> dict[str, Any]:
    """A component's fingerprint from its files: class, config and stored-weights digest (models) or the files'
    digest (tokenizers), and the dtype it is loaded in."""
    info: dict[str, Any] = {"class": cls.__name__, "from": "files"}
    if not files.weights:
        info["files"] = tokenizer_files_digest(files.folder)
        return info
    info["config"] = clean_config(_config_with_defaults(cls, files.folder))
    info["weights"] = stored_weights_digest(files.weights, files.index)
    if dtype_name is not None:
        info["dtype"] = dtype_name
    return info


def _module_config(module: Any) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    return clean_config(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def weights_digest(module: torch.nn.Module, sample_bytes: int = SAMPLE_BYTES) -> str:
    """A digest of a module's weights: every tensor's name, shape and dtype, and up to 64 KiB of its bytes
    (start, middle, end). Distinguishes finetunes without hashing gigabytes."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if flat.numel() == 0:
            continue
        # bytes are sampled where the tensor lives; only the samples cross to the host
        raw = (flat if tensor.dtype.is_floating_point else flat.to(torch.int64)).view(torch.uint8)
        third = sample_bytes // 3
        for start in (0, max(0, raw.numel() // 2 - third // 2), max(0, raw.numel() - third)):
            h.update(raw[start : start + third].cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def module_fingerprint(module: Any, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What identifies a loaded encoder in a manifest: its class, config, weights digest and dtype (the fallback of
    `file_fingerprint`)."""
    info: dict[str, Any] = {"class": type(module).__name__, "config": _module_config(module)}
    if hasattr(module, "state_dict"):
        info["weights"] = weights_digest(module)
    if dtype is not None:
        info["dtype"] = dtype_name(dtype)
    if hasattr(module, "get_vocab"):  # a tokenizer
        vocab = module.get_vocab()
        info["vocab"] = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:32]
        info["vocab_size"] = len(vocab)
    return info

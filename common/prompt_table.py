"""The prompt table of a shard set: text conditioning stored apart from the samples, keyed by `text_key`.

`ft precompute` stores here what stage 2 needs of text that no training sample carries: the validation prompts
(`--validation-dataset-file`) and the negative prompt (the empty caption) that classifier-free guidance samples
against. It generalises the older `empty_caption.safetensors` (still written, for caption dropout): the empty
caption is the table's `negative` row.

Layout, part of the shard contract:
    prompts/<text_key>.safetensors   one prompt's conditioning (the family's `cond` tensors, no batch dimension),
                                     with `__metadata__` {"text_key", "caption", "digest"}; digest: sha256 over the
                                     tensors' names, dtypes, shapes and bytes, checked on read
    manifest.json "prompts"          {"folder": "prompts", "negative": <text_key of "">}, empty when there is none
A prompt's `text_key` is the one a sample with that caption gets (`text_key`, shared with precompute/plan.py):
the caption, the text encoders' fingerprint, the text length and the family's encoding choices. So a file is
content-addressed: several precompute jobs may write the same prompt at once (each renames identical bytes into
place), there is no index to merge, and `ft train` finds a caption's row from the manifest alone, loading no text
encoder. Readers verify each file's header against its bytes and its digest against its tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .shards import sample_key, tensors_from_bytes

if TYPE_CHECKING:
    import torch

    from .shards import Manifest

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
        key = self.key(caption)
        path = self.path(key)
        if not self.info or not path.is_file():
            raise UserError(f"{self.folder} holds no conditioning for the prompt {caption[:60]!r}; add it with "
                            f"`ft precompute ... --out {self.folder} --validation-dataset-file FILE` (it encodes "
                            "only the text).")
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

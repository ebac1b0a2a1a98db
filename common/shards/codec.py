"""The tensor codec and digests of the shard contract: named tensors <-> safetensors bytes (a zero-copy, checked
decode), the content hash naming samples, and the file digests a manifest records (sha256, xxh3-128).

No pickle: tensors travel as safetensors, and `tensors_from_bytes` checks every header against the bytes it
describes before making any view of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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


_ST_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize named tensors as safetensors bytes (contiguous CPU copies)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


_ST_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_layout(buf: bytes | bytearray | memoryview) -> tuple[int, list[tuple[str, str, int, int, list[int]]]]:
    """The checked header of safetensors bytes: (where the data starts, [(name, dtype, begin, end, shape)]). A known
    dtype, offsets inside the data, and a shape whose size is the span's; anything else raises ValueError. Makes no
    tensor (`ft inspect --verify` checks every member with it)."""
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
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info.get("dtype") if isinstance(info, dict) else None
        if dtype_name not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has an unknown dtype {dtype_name!r}")
        begin, end = (int(x) for x in info["data_offsets"])
        shape = [int(d) for d in info["shape"]]
        if (not 0 <= begin <= end <= data_len or any(d < 0 for d in shape)
                or end - begin != math.prod(shape) * _ST_ITEMSIZE[dtype_name]):
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} and shape {shape} do not fit the data")
        out.append((name, dtype_name, begin, end, shape))
    return base, out


def tensors_from_bytes(buf: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into tensors that VIEW `buf` (no copy). Pass a bytearray for writable tensors.

    The header is checked against the bytes before any tensor is made (`safetensors_layout`): never an
    out-of-bounds view."""
    import torch

    base, layout = safetensors_layout(buf)
    out = {}
    for name, dtype_name, begin, end, shape in layout:
        dtype = getattr(torch, _ST_DTYPES[dtype_name])
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // _ST_ITEMSIZE[dtype_name],
                                     offset=base + begin).view(shape)
    return out


def stack_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack` of equal-shape, equal-dtype CPU tensors, bitwise the same, made as one byte copy per tensor by
    numpy: it never starts torch's intra-op (OpenMP) threads, so a loader thread may call it.

    Why it matters: a thread that runs one parallel torch op gets an OpenMP thread team of its own. With the
    training thread's team that is more OpenMP threads than cores, and GNU OpenMP (the CPU wheels' runtime) then
    stops busy-waiting in every team: each of the step's thousands of parallel regions wakes its sleeping worker
    through the kernel. On a 2-core CPU that left a third of a core idle in every step of the medium CogVideoX
    (636 ms against finetrainers' 536 ms with the same kernels and CPU time; bench/results/peer_medium.md)."""
    import numpy as np
    import torch

    first = tensors[0]
    rows = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors]  # contiguous views of the bytes (no copy)
    return torch.from_numpy(np.stack(rows)).view(first.dtype).reshape(len(tensors), *first.shape)

"""Names of torch dtypes as users type them on the command line (`bf16`, `bfloat16`, `fp32`, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """Turn `bf16` / `fp16` / `fp32` (or their long names) into a torch dtype; a clear error otherwise."""
    import torch

    canonical = DTYPE_NAMES.get(str(name).lower())
    if canonical is None:
        raise UserError(f"{flag} {name!r} is not a dtype we know; use one of bf16, fp16, fp32.")
    return getattr(torch, canonical)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bf16`, the short name we write into manifests and logs."""
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(str(dtype).replace("torch.", ""), str(dtype))

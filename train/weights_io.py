"""Writing the weights users load: the LoRA files (lora_formats.py) and a transformer folder `from_pretrained`
takes (built on the meta device from a config and full tensors: no base weights loaded), each written aside (a
hidden temporary file or folder next to the target) and renamed into place, so a kill never leaves half a
transformer that loads. Used by the run's export (trainable.py, lora_formats.py), each LoRA checkpoint and `ft
export` (export.py).

`ft export` writes through `write_guarded`: the target folder is probed for a write and its free space compared
with the bytes the weights take before anything is written, and a fault while writing (safetensors raises its own
SafetensorError for a full disk, not an OSError) becomes one line naming the path, the bytes needed and free;
nothing half-written is left (not even the folder it made) and the checkpoint is only read.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.common.faults import FAULTS, bytes_text, check_writable, describe, environment_fault, fix, free_bytes

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_DIR = "transformer"


def write_aside(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a hidden sibling of `target`, then rename it to `target` (replacing an older one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        write(tmp)
        if target.is_dir() and tmp.is_dir():  # a folder cannot be replaced in one rename: move the old one aside
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    return target


def save_transformer(spec: Any, config: dict[str, Any], state: dict[str, Any], dtype_name: str, folder: Path) -> None:
    """A diffusers transformer folder from a config and full tensors: the family's class, built on the meta
    device, takes the tensors (no base weights are loaded)."""
    from accelerate import init_empty_weights

    from ft.common.dtypes import parse_dtype

    dtype = parse_dtype(dtype_name, "--transformer-dtype")
    cls = spec.component_class("transformer")
    with init_empty_weights():
        model = cls.from_config(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise UserError(f"the weights lack {len(missing)} of the transformer's tensors (e.g. {missing[0]}); they are "
                        "not a full finetune of this transformer.")
    model.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()
                           if k in expected}, strict=True, assign=True)
    model.save_pretrained(folder)


def weights_bytes(state: dict[str, Any], dtype_name: str | None = None) -> int:
    """The bytes `state` takes on disk, its floating tensors in `dtype_name` (as saved) when given."""
    from ft.common.dtypes import parse_dtype

    dtype = parse_dtype(dtype_name) if dtype_name else None
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for t in state.values())


def write_fault(exc: BaseException, path: Path) -> OSError | None:
    """The environment fault in `exc`: an OSError, or a library's error that carries one only in its text
    (safetensors: `I/O error: No space left on device (os error 28) at path ...`)."""
    found = environment_fault(exc)
    if found is not None:
        return found
    found_code = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(exc))
    code = int(next(g for g in found_code.groups() if g)) if found_code else 0
    return OSError(code, os.strerror(code), str(path)) if code in FAULTS else None


def write_guarded(out: Path, needed: int, write: Callable[[], Path], flag: str = "--out") -> Path:
    """Run `write()` (which writes into `out`, aside then renamed) after checking `out` takes a write and has
    `needed` bytes free; a fault while writing is one UserError, and a folder made for it is removed again."""
    out = Path(out)
    check_writable(out, flag, "where the weights are written")
    existing = out
    while not existing.exists():
        existing = existing.parent
    free = free_bytes(existing)
    if free is not None and free < needed:
        raise UserError(f"{flag} {out}: the weights need {bytes_text(needed)} and {bytes_text(free)} is free there; "
                        "free space or use a folder on a larger disk. Nothing was written; the checkpoint is "
                        "untouched.")
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        return write()
    except Exception as e:
        fault = write_fault(e, out)
        if fault is None:
            raise
        for folder in made:  # innermost first: only folders this write made, and only when empty
            try:
                folder.rmdir()
            except OSError:
                break
        free = free_bytes(existing)
        space = f"; the weights need {bytes_text(needed)}, {bytes_text(free or 0)} is free" \
            if fault.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise UserError(f"{flag} {out}: {describe(fault)}{space}. {fix(fault).capitalize()}. Nothing half-written was "
                        "left; the checkpoint is untouched.") from e

"""Writing the weights users load: the LoRA files (lora_formats.py) and a transformer folder `from_pretrained`
takes (built on the meta device from a config and full tensors: no base weights loaded), each written aside (a
hidden temporary file or folder next to the target) and renamed into place, so a kill never leaves half a
transformer that loads. Used by the run's export (trainable.py, lora_formats.py), each LoRA checkpoint and `ft
export` (export.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft.common.errors import UserError

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

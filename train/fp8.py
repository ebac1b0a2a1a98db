"""fp8 storage of the frozen base weights (finetrainers' `--layerwise_upcasting_*`), through diffusers' layerwise
casting (`diffusers.hooks.apply_layerwise_casting`): each matched Linear/Conv of the frozen transformer is stored
in fp8 and cast to `--transformer-dtype` just for its own forward (and back after it).

ft applies it after the LoRA adapter is added, with the adapters' modules (`lora_`) skipped on top of the skip
patterns, so the adapters are created, stored and trained in fp32 and never pass through fp8 (finetrainers applies
it first and patches peft so that adding the adapter does not move it to the fp8 dtype). diffusers then makes peft
feed the adapters the layer's input uncast; ft removes that hook again, so that peft casts the input to the fp32
adapters' dtype, as it does without fp8.
"""

from __future__ import annotations

from typing import Any

from ft.common.errors import UserError

MODULES = ("transformer",)
STORAGE_DTYPES = ("float8_e4m3fn", "float8_e5m2")
# finetrainers' default (finetrainers/args.py, BaseArgs.layerwise_upcasting_skip_modules_pattern): norms,
# embeddings, the input and output projections stay in --transformer-dtype
DEFAULT_SKIP_PATTERNS = ("patch_embed", "pos_embed", "x_embedder", "context_embedder", "time_embed", "^proj_in$",
                         "^proj_out$", "norm")
ADAPTER_PATTERN = "lora_"  # peft's adapter modules (lora_A, lora_B, lora_embedding_*, lora_magnitude_vector)


def check_args(modules: list[str], storage_dtype: str, training_type: str,
               skip_patterns: list[str] | tuple[str, ...] = DEFAULT_SKIP_PATTERNS) -> None:
    """The `--layerwise-upcasting-*` values, checked before any weight loads: each skip pattern compiled, and the
    knobs of fp8 storage refused without it (they would do nothing)."""
    import re

    for pattern in skip_patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"--layerwise-upcasting-skip-modules-pattern {pattern!r} is not a valid regex ({e}); "
                            "each pattern is a Python regex searched in module names.") from e
    if not modules:
        knobs = (("--layerwise-upcasting-storage-dtype", storage_dtype != STORAGE_DTYPES[0]),
                 ("--layerwise-upcasting-skip-modules-pattern", tuple(skip_patterns) != DEFAULT_SKIP_PATTERNS))
        changed = [flag for flag, differs in knobs if differs]
        if changed:
            raise UserError(f"{' and '.join(changed)} set fp8 storage up, which is off: it would do nothing. Add "
                            "--layerwise-upcasting-modules transformer to store the frozen weights in fp8, or leave "
                            f"{'them' if len(changed) > 1 else 'it'} out.")
    for m in modules:
        if m not in MODULES:
            raise UserError(f"--layerwise-upcasting-modules {m}: only the transformer is loaded by ft train; pass "
                            "--layerwise-upcasting-modules transformer.")
    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--layerwise-upcasting-storage-dtype {storage_dtype}: use {' or '.join(STORAGE_DTYPES)}.")
    if modules and training_type == "full-finetune":
        raise UserError("--layerwise-upcasting-modules transformer applies to --training-type lora: fp8 storage is "
                        "for FROZEN weights (each one is rounded to fp8 once and cast up for its forward); a full "
                        "finetune updates every weight, and the optimizer cannot update weights stored in fp8 "
                        "(finetrainers refuses it too). Leave it out, or train a LoRA.")


def apply_fp8_storage(transformer: Any, storage_dtype: str, compute_dtype: Any, skip_patterns: list[str]) -> None:
    """Store the frozen weights of `transformer` (LoRA already added) in `storage_dtype`, computing each layer in
    `compute_dtype`."""
    import torch
    from diffusers.hooks import apply_layerwise_casting
    from peft.tuners.tuners_utils import BaseTunerLayer

    apply_layerwise_casting(transformer, storage_dtype=getattr(torch, storage_dtype), compute_dtype=compute_dtype,
                            skip_modules_pattern=(*skip_patterns, ADAPTER_PATTERN), non_blocking=True)
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(module, BaseTunerLayer) and registry is not None:
            registry.remove_hook("peft_autocast_disable", recurse=False)


def fp8_bytes(transformer: Any) -> dict[str, int]:
    """Bytes of the transformer's parameters by dtype (what the tests and `ft estimate` compare)."""
    out: dict[str, int] = {}
    for p in transformer.parameters():
        key = str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out

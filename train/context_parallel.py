"""Context parallelism for `ft train --cp-degree N`: each sample's token sequence split over N processes.

diffusers does the splitting (hooks/context_parallel.py): a plan (the transformer's `_cp_plan`, or the one a family
gives, `ModelSpec.cp_plan`) names which module inputs are cut along the sequence before the blocks (the video
tokens, the rotary tables) and where the output is gathered again (after the last projection), and the attention
processors run ring or Ulysses attention over the context-parallel ranks (attention_dispatch.py):
- Ulysses: an all-to-all swaps the sequence split for a head split around each attention, so every rank attends
  over the whole sequence for heads/N heads; the heads must divide by N. diffusers' `native` backend (SDPA).
- ring: each rank keeps its queries and attends to every rank's keys and values in turn, merging the partial
  results by their log-sum-exp; any head count. It needs an attention op that returns the log-sum-exp: on a GPU
  diffusers' `_native_cudnn` (bf16/fp16 only; its backward cannot run under gradient checkpointing: both refused
  before loading, `check_gpu_ring`; not run here, where no GPU is); on a CPU ft's own (below, torch's CPU
  flash-attention kernel and its backward), registered for the `_native_math` backend, which diffusers does not run
  under context parallelism itself.

The mesh is the training mesh's ("ring", "ulysses") sub-mesh (parallel.py): one of the two has size N, the other
1, as diffusers' ContextParallelConfig wants both names. ft sets the config up itself instead of calling
`ModelMixin.enable_parallelism`, which computes its device as `rank % torch.accelerator.device_count()` (a division
by zero on a CPU) and builds no mesh of ours; what it does besides (the config handed to every attention
processor, the plan's hooks) is done the same way here.
"""

from __future__ import annotations

from typing import Any

from ft.common.errors import UserError
from ft.pipelines.memory import CP_MODES, cp_degrees, default_cp_mode

RING_GPU_BACKEND = "_native_cudnn"
RING_CPU_BACKEND = "_native_math"  # ft registers its ring-capable CPU op under this name
ULYSSES_BACKEND = "native"


def check_cp_layout(cp_degree: int, mode: str, num_heads: int, sequence_lengths: dict[str, int],
                    family: str, modes: tuple[str, ...] = CP_MODES, modes_why: str = "") -> None:
    """Refuse, before any weight loads, a split that cannot work; the message names the degrees that would."""
    if cp_degree == 1:
        return
    if mode not in modes:
        raise UserError(f"--cp-mode {mode}: {family} splits only with {' or '.join(modes)} attention: {modes_why}. "
                        f"Use --cp-mode {modes[0]}.")
    if mode == "ulysses" and num_heads % cp_degree:
        fits = [n for n in range(2, num_heads + 1) if num_heads % n == 0]
        ring = ", or --cp-mode ring (any head count)" if "ring" in modes else ""
        raise UserError(f"--cp-mode ulysses --cp-degree {cp_degree}: Ulysses attention gives each rank "
                        f"heads / {cp_degree} of {family}'s {num_heads} attention heads, which do not divide; use "
                        f"--cp-degree {' or '.join(map(str, fits)) or '1'}{ring}.")
    for bucket, tokens in sequence_lengths.items():
        if tokens % cp_degree:
            fits = cp_degrees(mode, num_heads, {bucket: tokens}, most=8)
            degrees = (f"use --cp-degree {' or '.join(map(str, fits))}" if fits
                       else f"no --cp-degree from 2 to 8 splits it under {mode}")
            fix = (f"or change that row's num_frames, height or width (--validation-dataset-file) so its token count "
                   f"divides by {cp_degree}" if "of --validation-dataset-file" in bucket
                   else f"or precompute buckets whose token count divides by {cp_degree}")
            raise UserError(f"--cp-degree {cp_degree}: bucket {bucket} is {tokens} per sample, which do not "
                            f"split into {cp_degree} equal parts; {degrees}, {fix}.")


def check_cp_family(spec: Any, cp_degree: int, mode: str) -> None:
    """Refuse a family that has no context-parallel plan, or whose plan does not take `mode` (`ft train` and `ft
    estimate` alike)."""
    if spec.context_parallel is None:
        from ft.pipelines.registry import SPECS

        have = ", ".join(s.display_name for s in SPECS.values() if s.context_parallel is not None)
        raise UserError(f"--cp-degree {cp_degree}: ft has no context-parallel plan for {spec.display_name} yet "
                        f"(families with one: {have}); train it with --cp-degree 1 and data parallelism "
                        "(--dp-shards shards the weights).")
    if mode not in spec.cp_modes:
        raise UserError(f"--cp-mode {mode}: {spec.display_name} splits only with {' or '.join(spec.cp_modes)} "
                        f"attention: {spec.cp_modes_why}. Use --cp-mode {spec.cp_modes[0]}.")


def check_context_parallel(cfg: Any, spec: Any, transformer_config: dict, sets: list[Any],
                           validation_sizes: list[tuple[int, int, int]] = (), device: str = "cpu") -> str:
    """The cp mode of the run (--cp-mode, or the default for the family's head count), after refusing what cannot
    split: a family without a plan, heads that Ulysses cannot divide, a bucket (or a validation video, which the cp
    group generates together) whose sequences do not divide, and what ring attention's GPU op cannot do."""
    heads = int(transformer_config.get("num_attention_heads") or 1)
    mode = cfg.cp_mode or default_cp_mode(heads, cfg.cp_degree, spec.cp_modes)
    if cfg.cp_degree == 1:
        return mode
    check_cp_family(spec, cfg.cp_degree, mode)
    if cfg.layerwise_upcasting_modules or cfg.offload_blocks:
        flag = "--layerwise-upcasting-modules" if cfg.layerwise_upcasting_modules else "--offload-blocks"
        raise UserError(f"{flag} fits one GPU; --cp-degree {cfg.cp_degree} runs several processes: leave {flag} "
                        "out and let --cp-degree split the activations (and --dp-shards the weights).")
    from ft.common.shards import bucket_name, parse_bucket

    lengths = {}
    for s in sets:
        vae_config = s.manifest.encoders.get("vae", {}).get("config", {})
        text_length = int((s.manifest.shapes.get("prompt_embeds") or [0])[0])
        sizes = [(bucket, parse_bucket(bucket)) for bucket in s.manifest.training_histogram()]
        sizes += [(f"{bucket_name(*size)} of --validation-dataset-file", size) for size in validation_sizes]
        for name, size in sizes:
            for what, tokens in spec.cp_sequences(size, vae_config, transformer_config, text_length).items():
                lengths[f"{name} ({what})"] = tokens
    check_cp_layout(cfg.cp_degree, mode, heads, lengths, spec.display_name, spec.cp_modes, spec.cp_modes_why)
    if mode == "ring" and device.startswith("cuda"):
        check_gpu_ring(cfg)
    return mode


def check_gpu_ring(cfg: Any) -> None:
    """Ring attention on a GPU runs diffusers' cuDNN op (RING_GPU_BACKEND): half precision only, and its backward
    reads the saved tensors once per ring step, which gradient checkpointing's recomputation refuses."""
    fix = "use --cp-mode ulysses (a --cp-degree that divides the heads)"
    if cfg.gradient_checkpointing:
        raise UserError(f"--cp-mode ring with --gradient-checkpointing on a GPU: diffusers' ring backward (cuDNN "
                        f"attention) unpacks the saved tensors at every ring step, which checkpointing allows once; "
                        f"{fix}, or train without --gradient-checkpointing.")
    from ft.common.dtypes import parse_dtype

    if str(parse_dtype(cfg.transformer_dtype, "--transformer-dtype")) == "torch.float32":
        raise UserError(f"--cp-mode ring on a GPU attends with cuDNN, in bf16 or fp16 only, and --transformer-dtype "
                        f"fp32 computes in fp32; {fix}, or train in bf16.")


def attention_backend(mode: str, device: str) -> str:
    """The diffusers attention backend `mode` runs on `device` (module docstring)."""
    if mode == "ulysses":
        return ULYSSES_BACKEND
    if device.startswith("cuda"):
        return RING_GPU_BACKEND
    register_cpu_ring_backend()
    return RING_CPU_BACKEND


def enable_context_parallel(transformer: Any, cp_mesh: Any, mode: str, device: str, plan: dict[str, Any]) -> None:
    """Split `transformer`'s sequence over `cp_mesh` (dims "ring", "ulysses") as `plan` (ModelSpec.cp_plan) says,
    with `mode` attention."""
    import warnings

    import torch
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    # diffusers 0.42's gathers call a torch function torch has renamed: one warning per rank per gather otherwise
    warnings.filterwarnings("ignore", message=".*all_gather_tensor.* is deprecated", category=FutureWarning)
    degree = cp_mesh.size()
    transformer.set_attention_backend(attention_backend(mode, device))
    cp = ContextParallelConfig(ring_degree=degree if mode == "ring" else 1,
                               ulysses_degree=degree if mode == "ulysses" else 1, mesh=cp_mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device(device), mesh=cp_mesh)
    transformer._parallel_config = config
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(transformer, cp, plan)


# ------------------------------------------------------------------- ring attention's CPU op (log-sum-exp)

def _cpu_forward_op(ctx: Any, query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                    return_lse: bool = False, _save_ctx: bool = True, _parallel_config: Any = None) -> Any:
    """Attention of (B, S, H, D) tensors with its log-sum-exp (B, S, H): torch's CPU flash-attention kernel."""
    import torch

    q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale = attn_mask, dropout_p, is_causal, scale
    return (out, lse) if return_lse else out


def _cpu_backward_op(ctx: Any, grad_out: Any, *args: Any, query: Any = None, key: Any = None, value: Any = None,
                     out: Any = None, lse: Any = None, **kwargs: Any) -> Any:
    """The gradients of one key/value chunk's attention given the merged output and log-sum-exp (the ring's
    backward passes each chunk in turn)."""
    import torch

    given = (query, key, value, out, lse)
    if any(x is None for x in given):  # Ulysses: this chunk is the forward's; the ring hands every tensor in
        # (ctx.saved_tensors is read once per backward: gradient checkpointing refuses a second unpacking)
        query, key, value, out, lse = (s if x is None else x for s, x in zip(ctx.saved_tensors, given, strict=True))
    g, q, k, v, o = (x.transpose(1, 2).contiguous() for x in (grad_out, query, key, value, out))
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g.to(q.dtype), q, k, v, o.to(q.dtype), lse.transpose(1, 2).contiguous().float(), ctx.dropout_p,
        ctx.is_causal, attn_mask=ctx.attn_mask, scale=ctx.scale)
    return tuple(x.transpose(1, 2).contiguous() for x in grads)


_registered = False


def register_cpu_ring_backend() -> None:
    """Register ft's CPU attention for `_native_math`: plain SDPA (math kernel) without context parallelism, as
    diffusers' own; ring or Ulysses attention over torch's CPU flash kernel (which returns the log-sum-exp) with it.
    """
    global _registered
    if _registered:
        return
    import torch
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        _templated_context_parallel_attention,
    )

    name = AttentionBackendName(RING_CPU_BACKEND)
    constraints = _AttentionBackendRegistry._constraints.get(name)

    def cpu_attention(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                      is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                      return_lse: bool = False, _parallel_config: Any = None) -> Any:
        if _parallel_config is not None:
            return _templated_context_parallel_attention(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                forward_op=_cpu_forward_op, backward_op=_cpu_backward_op, _parallel_config=_parallel_config)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                                   is_causal=is_causal, scale=scale)
        return out.permute(0, 2, 1, 3)

    _AttentionBackendRegistry.register(name, constraints=constraints, supports_context_parallel=True)(cpu_attention)
    _registered = True

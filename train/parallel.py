"""Data parallelism for `ft train`: the degrees, the device mesh, and how the transformer is wrapped.

`--dp-degree R` replicas x `--dp-shards S` FSDP shards = the world (torchrun, srun or accelerate launch); -1
(the default of both) is what the world leaves, and with neither given every process is a replica. The layouts,
all from torch.distributed (as torchtitan composes them):
- one process: the transformer on its device;
- DDP (S = 1): composable `replicate` (the module stays itself, so `transformer.config` is where the families read
  it), gradients all-reduced in backward;
- FSDP2 (R = 1): `fully_shard` on every transformer block of the family's block lists (ModelSpec.block_lists),
  then on the root; parameters, gradients and optimizer state are sharded, a block is gathered for its forward
  and backward;
- HSDP (R, S > 1): the same on a 2-D mesh ("replicate", "shard"): sharded within a group, replicated across.
- context parallelism (`--cp-degree C`, context_parallel.py): each sample's sequence split over C processes. The
  mesh is then 4-D ("replicate", "shard", "ring", "ulysses"), one of the last two of size C; the processes of one
  cp group hold one sample's parts, so their gradients must be summed. As torchtitan does, the cp ranks join the
  data-parallel dimension that reduces gradients: FSDP2 shards over "shard" x cp flattened ("shard_cp": the
  weights are split C times further, and one reduce-scatter sums the cp parts and averages the replicas), DDP
  replicates over "replicate" x cp flattened ("replicate_cp"). Both average over their group, so the trainer
  scales the loss it backpropagates by C (`Layout.cp`): the mean over a cp group of its parts is then their sum.
The weights are loaded on the CPU and sharded block by block onto the device, so no rank holds the whole
transformer on its device. Gradients are reduced in fp32 (MixedPrecisionPolicy.reduce_dtype); with
`--master-dtype fp32` the all-gathered weights are cast to `--transformer-dtype` for compute (the inputs are not:
autocast casts them where one process does).

`export_state` gathers the trainable weights (full state dict, CPU) on rank 0 for the exported LoRA or
transformer, written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ft.common.errors import UserError
from ft.pipelines.base import transformer_blocks
from ft.train.dist import World

UNSET = -1


@dataclass(frozen=True)
class Layout:
    """Replicas x shards x context-parallel degree = the world."""

    replicas: int = 1
    shards: int = 1
    cp: int = 1

    @property
    def world(self) -> int:
        return self.replicas * self.shards * self.cp

    @property
    def dp_world(self) -> int:
        """The processes that read distinct samples (a cp group reads one stream)."""
        return self.replicas * self.shards

    def dp_rank(self, rank: int) -> int:
        """Which part of each batch `rank` reads: the cp dimension is the mesh's last, so a cp group is
        `cp` consecutive ranks."""
        return rank // self.cp

    @property
    def name(self) -> str:
        cp = f" x context parallel over {self.cp}" if self.cp > 1 else ""
        if self.dp_world == 1:
            return "one process" if self.cp == 1 else f"context parallel over {self.cp} processes"
        if self.shards == 1:
            return f"DDP over {self.replicas} replicas{cp}"
        if self.replicas == 1:
            return f"FSDP2 over {self.shards} shards{cp}"
        return f"HSDP: {self.replicas} replicas x {self.shards} shards{cp}"

    def as_dict(self) -> dict[str, int]:
        return {"world_size": self.world, "dp_degree": self.replicas, "dp_shards": self.shards, "cp_degree": self.cp}


def resolve_layout(dp_degree: int, dp_shards: int, world: World, cp_degree: int = 1) -> Layout:
    """The degrees from the flags and the world size; a clear error (the same on every rank) when they do not
    multiply to it."""
    if world.size % cp_degree:
        started = (f"{world.launcher} started {world.size} processes" if world.size > 1 else
                   "ft was started as one process: launch it with `torchrun --nproc_per_node N --no-python ft train "
                   "...` (or srun)")
        raise UserError(f"--cp-degree {cp_degree} splits each sample over {cp_degree} processes, but {started}; "
                        f"start a multiple of {cp_degree} (data-parallel degrees x --cp-degree).")
    n = world.size // cp_degree
    for name, value in (("--dp-degree", dp_degree), ("--dp-shards", dp_shards)):
        if value != UNSET and value < 1:
            raise UserError(f"{name} must be a positive number of processes (or -1: what the world leaves), got "
                            f"{value}.")
    replicas, shards = dp_degree, dp_shards
    if replicas == UNSET and shards == UNSET:
        replicas, shards = n, 1
    elif replicas == UNSET:
        replicas = n // shards if n % shards == 0 else 0
    elif shards == UNSET:
        shards = n // replicas if n % replicas == 0 else 0
    if replicas * shards != n or replicas < 1 or shards < 1:
        flags = (("--dp-degree", dp_degree), ("--dp-shards", dp_shards), ("--cp-degree", cp_degree))
        given = " x ".join(f"{flag} {v}" for flag, v in flags if v != UNSET and (flag != "--cp-degree" or v > 1))
        how = ("started as one process: launch with `torchrun --nproc_per_node N --no-python ft train ...` (or "
               "srun) to use several" if world.size == 1 else f"{world.launcher} started {world.size} processes")
        raise UserError(f"{given} asks for a world of {max(1, dp_degree) * max(1, dp_shards) * cp_degree} "
                        f"processes, but {how}. Replicas x shards x --cp-degree must equal the number of processes.")
    return Layout(replicas, shards, cp_degree)


def build_mesh(layout: Layout, device: str, cp_mode: str = "ring") -> tuple[Any, Any]:
    """The device mesh of a world of several processes: ("replicate", "shard"), or with context parallelism
    ("replicate", "shard", "ring", "ulysses"); and the mesh DDP or FSDP2 reduces gradients over: the data-parallel
    dims, each with the cp ranks folded in (module docstring). (None, None) for one process. The flattened meshes
    are kept as `_flatten` returns them: torch deprecates slicing a flattened dim from the root mesh."""
    if layout.world == 1:
        return None, None
    from torch.distributed.device_mesh import init_device_mesh

    kind = device.split(":")[0]
    if layout.cp > 1:
        ring, ulysses = (layout.cp, 1) if cp_mode == "ring" else (1, layout.cp)
        mesh = init_device_mesh(kind, (layout.replicas, layout.shards, ring, ulysses),
                                mesh_dim_names=("replicate", "shard", "ring", "ulysses"))
        shard_cp = mesh["shard", "ring", "ulysses"]._flatten("shard_cp")
        replicate_cp = mesh["replicate", "ring", "ulysses"]._flatten("replicate_cp")
        if layout.shards == 1:
            return mesh, replicate_cp
        if layout.replicas == 1:
            return mesh, shard_cp
        return mesh, mesh["replicate", "shard_cp"]  # HSDP: a 2-D mesh torch slices only from the root
    if layout.shards == 1:
        mesh = init_device_mesh(kind, (layout.replicas,), mesh_dim_names=("replicate",))
    elif layout.replicas == 1:
        mesh = init_device_mesh(kind, (layout.shards,), mesh_dim_names=("shard",))
    else:
        mesh = init_device_mesh(kind, (layout.replicas, layout.shards), mesh_dim_names=("replicate", "shard"))
    return mesh, mesh


def cp_mesh(mesh: Any) -> Any:
    """The ("ring", "ulysses") sub-mesh a cp group attends over (diffusers' ContextParallelConfig wants both)."""
    return mesh["ring", "ulysses"]


def parallelize(transformer: Any, layout: Layout, mesh: Any, device: str, block_lists: tuple[str, ...],
                compute_dtype: Any = None) -> Any:
    """Wrap `transformer` (on the CPU, LoRA already added) for `layout` and put it on `device`; `mesh` is the one
    gradients are reduced over (build_mesh's second)."""
    import torch

    if layout.world == 1:
        return transformer.to(device)
    if layout.shards == 1:
        from torch.distributed._composable.replicate import replicate

        transformer.to(device)
        kwargs: dict[str, Any] = {"device_mesh": mesh}
        if device.startswith("cuda"):
            kwargs["device_ids"] = [torch.device(device).index]
        return replicate(transformer, **kwargs)
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # diffusers' transformers return their output as a view (`(output,)[0]`); the loss only reads it, out of
    # place, so FSDP2's warning about in-place ops on a view does not apply
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    dp_mesh = mesh  # 1-D ("shard",) for FSDP2, 2-D ("replicate", "shard") for HSDP
    # the forward runs under autocast (trainer.py), as in one process: FSDP must not cast the fp32 inputs (the
    # timesteps, the rotary tables handed to each block) to bf16 at every module boundary
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    blocks = transformer_blocks(transformer, block_lists)
    for i, block in enumerate(blocks):
        # the last block's weights are needed again at once by backward: keep them gathered (torchtitan)
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(transformer, mesh=dp_mesh, mp_policy=policy)
    return transformer.to(device)  # buffers (rotary tables) and any parameter FSDP left on the CPU


def set_gradient_sync(transformer: Any, layout: Layout, sync: bool) -> None:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an optimizer step."""
    if layout.world > 1:
        transformer.set_requires_gradient_sync(sync)


def trainable_parameters(transformer: Any) -> list[Any]:
    """The parameters the optimizer updates, taken after wrapping (`fully_shard` makes new DTensor objects)."""
    return [p for p in transformer.parameters() if p.requires_grad]


def clip_grad_norm(params: list[Any], max_norm: float) -> Any:
    """The global gradient norm (over every rank's shards), clipped to `max_norm` (0: not clipped)."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def export_state(transformer: Any, trainable_only: bool) -> dict[str, Any]:
    """The weights (the trainable ones, or all with the buffers) as full tensors on the CPU, on rank 0: every rank
    calls this (it gathers); the others get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(transformer, options=options)

"""Activations off the GPU (`ft train --activation-offload`, musubi-tuner's `--gradient_checkpointing_cpu_offload`):
with gradient checkpointing, what each checkpointed transformer block keeps for its backward lives in pinned CPU
memory and is copied back when the backward recomputes that block.

What is kept, and so what moves: torch's non-reentrant checkpoint (diffusers' `enable_gradient_checkpointing`,
`use_reentrant=False`) saves a block's inputs for the backward (hidden states, and the text states, timestep
embedding and rotary tables the block takes), and nothing of what the block computes: its own saved-tensor hooks
replace those with handles that the recompute fills. ft runs each checkpointed block call under torch's
`torch.autograd.graph.save_on_cpu` (the checkpointing function handed to diffusers), so exactly those inputs are
packed to the CPU; the inner checkpoint hooks still take what the block computes. That is musubi-tuner's design
(each block's input moved to the CPU, moved back before its recompute), done by torch's own hooks instead of a
wrapper around each block's forward. With L blocks the GPU then keeps no block's input at all, instead of L of
them (2 bytes per token per hidden unit each, in bf16): at 75k tokens x 5120 (Wan 14B, 81x720x1280) that is
0.77 GB per block, 31 GB for its 40 blocks. The GPU still holds one block's recompute and the input copied back
for it (what `ft estimate --activation-offload` counts).

On a GPU the copies go to pinned memory without a stream sync (save_on_cpu's non-blocking copy into a pinned
buffer) and come back non-blocking on the compute stream; there is no prefetch, so each block's backward waits
for its input's copy: by arithmetic, not measured (no GPU was at hand), 0.77 GB over PCIe at ~25 GB/s is ~30 ms,
against about a second of recompute and backward for a Wan 14B block at 75k tokens (~5e14 flops). torch's pinned
allocator rounds each allocation up to a power of two by default (a 0.77 GB input takes 1 GiB): with
`PYTORCH_CUDA_ALLOC_CONF=pinned_max_round_threshold_mb:64` it allocates large ones exact (`ft estimate` gives both
numbers; not yet tried on a GPU). On a CPU there is nothing to pin and save_on_cpu keeps the tensor as it is:
training is unchanged, bitwise.

A tensor that several blocks take (the timestep embedding, the rotary tables, and with per-token timesteps, as
Wan 2.2 TI2V's (B, S, 6, D) `timestep_proj`, a tensor 6x a block's hidden states) is packed once per micro-batch:
each block's checkpoint saves it again, and without sharing its CPU copy such a tensor would take 6x the pinned
memory of a block input in every one of the L blocks. A saved tensor is the one already packed when it has the
same storage, offset, shape, stride, dtype and `_version` (unchanged since) and that packed tensor is still alive
(a weak reference to it: its storage cannot have been freed and reused); the cache is emptied at each micro-batch
(`reset`, which the trainer calls before each forward), and holds the CPU copies only weakly, so they go when the
backward frees the graph.

Why refuse it without `--gradient-checkpointing` rather than turn checkpointing on: musubi-tuner takes its flag
as an argument of `enable_gradient_checkpointing`, which it calls only under `--gradient_checkpointing`, so a
musubi command line that offloads always has both, and one without the second offloads nothing there. Turning
recomputation on silently would slow a run by about a third that did not ask for it; offloading every activation
without checkpointing (another technique) would copy about (16 + 4r)/2 times more per block each step. The
refusal names the flag to add, as `--offload-blocks`' does.

It combines with everything a checkpointed run takes: LoRA and full finetune (the saved inputs are activations,
never weights), DDP and FSDP2 (their hooks run inside the checkpointed call, on the block's parameters), fp8
storage and `--offload-blocks` (the same: they act on weights, inside the block), compiled blocks (the compiled
block runs under the checkpoint's hooks, as without offload).
"""

from __future__ import annotations

import weakref
from typing import Any

from ft.common.errors import UserError


def check_args(activation_offload: bool, gradient_checkpointing: bool) -> None:
    """`--activation-offload`, checked before any weight loads."""
    if activation_offload and not gradient_checkpointing:
        raise UserError("--activation-offload needs --gradient-checkpointing: it moves to the CPU what each "
                        "checkpointed block keeps for its backward (the block's input), as musubi-tuner's "
                        "--gradient_checkpointing_cpu_offload does only with --gradient_checkpointing. Add "
                        "--gradient-checkpointing.")


class ActivationOffload:
    """torch's save_on_cpu around each checkpointed block call (pinned memory on a GPU). `checkpoint` is the
    function diffusers' `enable_gradient_checkpointing` takes. It counts what it packs and unpacks (`packed_bytes`,
    `packed`, `shared` (saves that reused a copy packed already), `unpacked`, the devices the packed copies live on),
    for the run's log, the tests and bench/."""

    def __init__(self, device: str):
        import torch

        self.pin = torch.device(device).type == "cuda"
        hooks = torch.autograd.graph.save_on_cpu(pin_memory=self.pin)
        self._pack, self._unpack = hooks.pack_hook, hooks.unpack_hook
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.reset()

    def reset(self) -> None:
        """Start counting afresh, and forget what was packed (the trainer calls it before each micro-batch)."""
        self.packed = self.unpacked = self.shared = 0
        self.packed_bytes = 0
        self.devices: set[str] = set()
        self._copies: dict[tuple, tuple[weakref.ref, str, weakref.ref]] = {}

    @staticmethod
    def _identity(tensor: Any) -> tuple:
        """What makes two saved tensors the same data: storage, offset, shape, stride, dtype, device, version."""
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
                tensor.dtype, tensor.device, tensor._version)

    def pack(self, tensor: Any) -> Any:
        key = self._identity(tensor)
        found = self._copies.get(key)
        if found is not None:
            original, device, copy = found[0](), found[1], found[2]()
            if original is not None and copy is not None:  # packed already in this micro-batch: share its copy
                self.shared += 1
                return device, copy
        device, copy = packed = self._pack(tensor)
        self._copies[key] = (weakref.ref(tensor), device, weakref.ref(copy))
        self.packed += 1
        self.packed_bytes += copy.numel() * copy.element_size()
        self.devices.add(f"{copy.device.type}{' (pinned)' if copy.is_pinned() else ''}")
        return packed

    def unpack(self, packed: Any) -> Any:
        self.unpacked += 1
        return self._unpack(packed)

    def summary(self) -> str:
        """What the last micro-batch packed, for the run's log."""
        return (f"--activation-offload: {self.packed_bytes / 1e9:.3f} GB of the checkpointed blocks' inputs "
                f"({self.packed} tensors) kept in {', '.join(sorted(self.devices))} memory per micro-batch, copied "
                "back for the backward")

    def checkpoint(self, module: Any, *args: Any) -> Any:
        """A block's call, checkpointed as diffusers' default does, its saved inputs packed to the CPU."""
        import torch.utils.checkpoint

        with self.hooks:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def enable(transformer: Any, device: str, offload: bool) -> ActivationOffload | None:
    """Gradient checkpointing on `transformer`'s blocks, with the offload when `offload`; returns it."""
    found = ActivationOffload(device) if offload else None
    transformer.enable_gradient_checkpointing(found.checkpoint if found else None)
    return found

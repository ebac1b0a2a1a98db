"""Offloading for small GPUs (`ft train --offload-blocks N`): the frozen weights of the last N transformer blocks
of the family's block lists (ModelSpec.block_lists) live in pinned CPU memory, and each block's weights are
copied to the GPU on a side stream just before its forward and again before its backward, while the block before
it computes. musubi-tuner's `--blocks_to_swap` is what users know; this is its H2D-only mode for a frozen base
(musubi-tuner modules/custom_offloading_utils.py): the CPU copy is the master and never changes, so nothing is
copied back.

How it fits autograd: a block's hooks point its parameters at a fresh GPU copy for the forward and back at the CPU
master after it. Autograd keeps what the backward needs alive by itself, so with `--gradient-checkpointing` (each
block keeps only its input) the GPU copy is freed after the forward, and the backward's recompute of the block
(which runs its forward again, hooks included) brings it in again and holds it until that block's backward is
done. Without checkpointing every block's copy stays referenced until its backward, so nothing would leave the
GPU: `--offload-blocks` needs `--gradient-checkpointing`. The copy that arrives while block i computes is the
next one in the direction of the pass (i + 1 in the forward, i - 1 in the backward's recompute), so at most
IN_FLIGHT blocks of the N are on the GPU at once; `ft estimate` counts them resident.

What the libraries lacked (why this is not one of them):
- diffusers' group offloading (`apply_group_offloading`) hooks the forward only: with `use_stream=True` each group
  is onloaded by the previous group's prefetch in the FORWARD order, so the backward's recompute (reverse order)
  meets blocks nobody prefetched; without a stream it is synchronous (no overlap). It also offloads the whole
  model, not N blocks.
- FSDP2's CPUOffloadPolicy (`fully_shard(..., offload_policy=CPUOffloadPolicy())` per block, so that only N
  blocks offload) handles the backward, but needs a process group even in one process, and it swaps each
  parameter between its sharded DTensor and the gathered tensor around forward and backward, while diffusers'
  layerwise casting (fp8 storage, train/fp8.py) swaps the same parameters' data between fp8 and bf16 around each
  layer: the reason ft already refuses fp8 storage under FSDP2 (FP8_SEVERAL_PROCESSES in train/preflight.py), and
  HunyuanVideo on 24 GB needs fp8 AND offloading. (Read from the code, not tried: no GPU was at hand.)
Only frozen parameters are offloaded (the LoRA adapters stay on the GPU, where the optimizer updates them); a full
finetune is refused. On a CPU the mechanism runs as it does on a GPU (the hooks swap in a copy of each block's
weights for its forward) without streams: it costs a copy and saves nothing, and training is unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ft.common.errors import UserError

IN_FLIGHT = 2  # offloaded blocks on the GPU at once: the one computing and the one arriving


def check_args(offload_blocks: int, training_type: str, gradient_checkpointing: bool) -> None:
    """`--offload-blocks`, checked before any weight loads."""
    if offload_blocks < 0:
        raise UserError(f"--offload-blocks must be 0 (off) or a number of transformer blocks, got {offload_blocks}.")
    if not offload_blocks:
        return
    if training_type == "full-finetune":
        raise UserError("--offload-blocks keeps FROZEN weights on the CPU (the copy there never changes); a full "
                        "finetune updates every weight on the GPU each step. Train a LoRA, or shard a full finetune "
                        "over several GPUs with --dp-shards.")
    if not gradient_checkpointing:
        raise UserError("--offload-blocks needs --gradient-checkpointing: without it each block's backward keeps its "
                        "weights' GPU copy from its forward until the backward reaches it, so the offloaded blocks "
                        "would all be on the GPU at the peak and nothing would be saved.")


def offloaded_indices(num_blocks: int, offload_blocks: int) -> list[int]:
    """Which blocks are offloaded: the last N (as musubi-tuner does; `ft estimate` counts the same ones)."""
    if offload_blocks > num_blocks:
        raise UserError(f"--offload-blocks {offload_blocks}: this transformer has {num_blocks} blocks in its block "
                        f"lists; pass at most {num_blocks}.")
    return list(range(num_blocks - offload_blocks, num_blocks))


class BlockOffloader:
    """Installs the hooks on `blocks` (in execution order) and places `transformer` on `device`: the offloaded
    blocks' frozen weights stay on the CPU (pinned), everything else goes to the device. `loads` counts the
    copies made (a test and the benchmark read it)."""

    def __init__(self, transformer: Any, blocks: list[Any], offload_blocks: int, device: str):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.blocks = blocks
        self.offloaded = set(offloaded_indices(len(blocks), offload_blocks))
        self.masters: dict[int, list[tuple[Any, Any]]] = {}
        owned = set()
        for i in sorted(self.offloaded):
            pairs = []
            for p in blocks[i].parameters():
                if p.requires_grad:  # an adapter: trained on the device
                    continue
                master = p.data.pin_memory() if self.cuda else p.data
                p.data = master
                pairs.append((p, master))
                owned.add(id(p))
            self.masters[i] = pairs
        for p in transformer.parameters():
            if id(p) not in owned:
                p.data = p.data.to(self.device)
        for module in transformer.modules():
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = b.to(self.device)
        self.ready: dict[int, tuple[list[Any], Any]] = {}  # block -> (device copies, event that they arrived)
        self.swapped: int | None = None  # the block whose parameters point at device copies now
        self.last = -1
        self.forward = True
        self.loads = 0
        self.handles = []
        for i, block in enumerate(blocks):  # eager under a compiled block (--compile-modules): they move tensors
            self.handles.append(block.register_forward_pre_hook(torch.compiler.disable(partial(self._before, i))))
            self.handles.append(block.register_forward_hook(torch.compiler.disable(partial(self._after, i))))

    def offloaded_bytes(self) -> int:
        """Bytes of the offloaded weights: what stays in CPU memory, off the device, but for IN_FLIGHT blocks."""
        return sum(m.numel() * m.element_size() for pairs in self.masters.values() for _, m in pairs)

    def _load(self, i: int) -> None:
        """Start copying block i's weights to the device (on the side stream on a GPU)."""
        import torch

        if i not in self.offloaded or i in self.ready:
            return
        self.loads += 1
        if not self.cuda:
            self.ready[i] = ([m.clone() for _, m in self.masters[i]], None)
            return
        with torch.cuda.stream(self.stream):
            copies = [m.to(self.device, non_blocking=True) for _, m in self.masters[i]]
            event = self.stream.record_event()
        self.ready[i] = (copies, event)

    def _before(self, i: int, module: Any, args: Any) -> None:
        import torch

        # the backward's recompute runs the blocks in reverse: a block at or before the last one run
        self.forward = i > self.last or i == 0
        self.last = i
        self._restore()
        if i in self.offloaded:
            self._load(i)  # not prefetched (the first block of a pass): copied now
            copies, event = self.ready.pop(i)
            if self.cuda:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for c in copies:
                    c.record_stream(current)  # allocated on the side stream, read on this one
            for (p, _), c in zip(self.masters[i], copies, strict=True):
                p.data = c
            self.swapped = i
        ahead = i + 1 if self.forward else i - 1
        if 0 <= ahead < len(self.blocks):
            self._load(ahead)

    def _after(self, i: int, module: Any, args: Any, output: Any) -> None:
        import torch

        if i not in self.offloaded:
            return
        if self.forward and i == len(self.blocks) - 1 and torch.is_grad_enabled():
            # the backward recomputes this block first, at once: keep its copy for it
            self.ready[i] = ([p.data for p, _ in self.masters[i]], None if not self.cuda else
                             torch.cuda.current_stream(self.device).record_event())
        self._restore()

    def _restore(self) -> None:
        """Point the swapped-in block's parameters back at their CPU masters: its device copy lives on only where
        autograd holds it. The forward does this after each block; the backward's recompute may stop before a
        block's end (torch.utils.checkpoint's early stop) and skip that hook, so the next block's start does it."""
        if self.swapped is not None:
            for p, master in self.masters[self.swapped]:
                p.data = master
            self.swapped = None

    def on_device(self) -> set[int]:
        """The offloaded blocks that have a device copy in the offloader's hands (at most IN_FLIGHT)."""
        return set(self.ready) | ({self.swapped} if self.swapped is not None else set())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


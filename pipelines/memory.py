"""Memory arithmetic from configs alone, shared by `ft estimate` (training) and the bound on validation rows
(generating one video).

- `video_tokens` and `activation_bytes`: the transformer's tokens for a latent grid, and the activations it keeps
  (see cli/estimate.py's docstring for the model: (16 + 4 r) bytes per token per hidden unit in bf16 per
  block, after Korthikanti et al. 2022);
- `generation_bytes`: about what generating one frames x height x width video holds at its peak, with the same
  model: one transformer block's activations at once (inference keeps none for backward), for the conditional
  and unconditional batch of classifier-free guidance, plus the VAE decoder's full-resolution feature maps (two
  live at once, in bf16, with its first block's channels) and the decoded video in fp32. It is an estimate, not a
  measurement; it grows with the pixel count, which is what matters: a validation row of 32768x32768 needs
  terabytes, and is refused before training starts instead of crashing at its first validation
  (common/shards/prompts.py `resolve_sizes`, called by precompute and at train start).
- `GPU_SIZES_GIB`, `FIT_HEADROOM`: the cards `ft estimate` fits a run against, and the share of each kept free.
- `ActivationModel`: what one GPU and the CPU hold of a training step's activations under context parallelism
  (`--cp-degree N`, `--cp-mode`) and `--activation-offload`:
  - context parallelism splits the video tokens N ways in every block (each rank's part of the sequence); the
    text tokens stay whole on every rank (Wan's plan replicates them for its cross-attention; a joint text+video
    sequence is counted the same way, which overcounts a plan that splits the text too by at most the text's
    share); the weights, gradients and optimizer state are replicated over the cp ranks with `--dp-shards 1`
    (DDP), and sharded over them with `--dp-shards S > 1` (FSDP2 over S x N ranks, train/parallel.py). The
    attention adds its own buffers, held while one block's attention runs (counted at the backward's peak, on
    top of the block being recomputed), as diffusers 0.42.1's attention_dispatch.py allocates them:
    ring (TemplatedRingAttention) all-gathers every peer's K and V at once (2 x tokens x hidden in bf16, the
    whole sequence: this does not shrink with N) plus its local K/V concatenation, and in the backward fp32
    accumulators for the local q, k and v gradients and the fp32 K/V gradient block sent and received;
    Ulysses (TemplatedUlyssesAttention) all-to-alls q, k and v (a sent and a received copy of each, the local
    size) and the output (two more);
  - activation offload (with checkpointing) moves every block's input to pinned CPU memory; the GPU keeps one
    block's recompute and that block's input copied back for it (train/activation_offload.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BF16 = 2
FP32 = 4
GIB = 2 ** 30
GPU_SIZES_GIB = (24, 48, 80)
FIT_HEADROOM = 0.1  # of a card's memory, not usable by the tensors counted here
CFG_BATCH = 2  # classifier-free guidance runs the conditional and unconditional prompt as one batch
CP_MODES = ("ring", "ulysses")
MAX_CP_DEGREE = 16  # the largest context-parallel degree `ft estimate` proposes (two nodes of 8 GPUs)
# torch's CachingHostAllocator (ATen/core/CachingHostAllocator.h) rounds a pinned allocation up to a power of two
# unless it is above this threshold (default: none is): set, the offloaded block inputs are allocated exact
PINNED_EXACT = "PYTORCH_CUDA_ALLOC_CONF=pinned_max_round_threshold_mb:64"


def video_tokens(transformer_config: dict, grid: tuple[int, int, int, int]) -> int:
    """The transformer's video tokens for a latent grid (channels, frames, height, width), after patching."""
    _, t, h, w = grid
    p, p_t = transformer_config.get("patch_size") or 1, transformer_config.get("patch_size_t") or 1
    if isinstance(p, (list, tuple)):  # (t, h, w) in one entry (Wan)
        p_t, p_h, p_w = p
    else:
        p_h = p_w = p
    return math.ceil(t / p_t) * (h // p_h) * (w // p_w)


def activation_bytes(layers: int, hidden: int, tokens: int, batch: int, mlp_ratio: float, checkpointing: bool
                     ) -> float:
    """The activations a transformer keeps for backward, in bf16 (see cli/estimate.py's docstring)."""
    per_block = (16 + 4 * mlp_ratio) * tokens * batch * hidden
    if checkpointing:
        return layers * BF16 * tokens * batch * hidden + per_block
    return layers * per_block


def pinned_allocation(nbytes: float) -> int:
    """What torch's pinned host allocator takes for `nbytes` by default: the next power of two."""
    return 1 << max(0, math.ceil(math.log2(max(1.0, nbytes))))


def default_cp_mode(heads: int, degree: int, modes: tuple[str, ...] = CP_MODES) -> str:
    """The context-parallel mode `ft train` and `ft estimate` take without --cp-mode: Ulysses where the degree
    divides the head count (each rank attends with heads/N heads over the whole sequence: buffers of the local
    size, one all-to-all each way) or the family's plan takes no other (`ModelSpec.cp_modes`), else ring (any
    head count)."""
    return "ulysses" if heads % degree == 0 or "ring" not in modes else "ring"


def cp_problem(degree: int, mode: str, heads: int, sequences: dict[str, int]) -> str | None:
    """Why `degree` ranks cannot split one sample's `sequences` (name -> tokens, `ModelSpec.cp_sequences`) under
    `mode` with `heads` heads (None: they can): diffusers splits each sequence into equal parts, and Ulysses gives
    each rank heads/N heads."""
    if degree == 1:
        return None
    for what, tokens in sequences.items():
        if tokens % degree:
            return f"its {tokens} {what} do not split into {degree} equal parts"
    if mode == "ulysses" and heads % degree:
        return f"its {heads} attention heads do not split {degree} ways under Ulysses"
    return None


def cp_degrees(mode: str, heads: int, sequences: dict[str, int], most: int = MAX_CP_DEGREE) -> list[int]:
    """The context-parallel degrees from 2 to `most` that split these sequences under `mode`."""
    return [n for n in range(2, most + 1) if cp_problem(n, mode, heads, sequences) is None]


@dataclass(frozen=True)
class ActivationModel:
    """A transformer's shape as the activation arithmetic needs it (see the module docstring)."""

    layers: int
    hidden: int
    mlp_ratio: float
    heads: int
    batch: int
    cp_modes: tuple[str, ...] = CP_MODES  # the attention modes the family's context-parallel plan takes

    def attention_buffers(self, tokens: int, degree: int, mode: str) -> float:
        """Bytes of the context-parallel attention's own buffers on one rank, for a sequence of `tokens`."""
        if degree == 1:
            return 0.0
        whole, local = tokens * self.batch * self.hidden, tokens / degree * self.batch * self.hidden
        if mode == "ring":  # every peer's K and V gathered, the local K/V concatenated, fp32 gradient buffers
            return 2 * whole * BF16 + 2 * local * BF16 + (3 + 2 * 2) * local * FP32
        return (2 * 3 + 2) * local * BF16  # Ulysses: q, k, v sent and received; the output's two

    def bytes(self, video_tokens: int, text_tokens: int, checkpointing: bool, degree: int = 1, mode: str = "ring",
              offload: bool = False) -> tuple[float, float]:
        """(bytes on each GPU, bytes in pinned CPU memory) of one micro-batch's activations."""
        local = video_tokens // degree + text_tokens
        attention = self.attention_buffers(video_tokens + text_tokens, degree, mode)
        if not offload:
            return activation_bytes(self.layers, self.hidden, local, self.batch, self.mlp_ratio,
                                    checkpointing) + attention, 0.0
        assert checkpointing, "--activation-offload needs checkpointing (train/activation_offload.py)"
        block_input = BF16 * local * self.batch * self.hidden
        recompute = activation_bytes(1, self.hidden, local, self.batch, self.mlp_ratio, checkpointing=False)
        return recompute + block_input + attention, self.layers * block_input


def hidden_and_mlp_ratio(transformer_config: dict) -> tuple[int, float]:
    """The transformer's hidden size, and its MLP's width over it: a config's mlp_ratio (HunyuanVideo), or its
    ffn_dim over the hidden size (Wan), else 4."""
    hidden = int(transformer_config.get("num_attention_heads", 1)) * int(transformer_config.get("attention_head_dim",
                                                                                                 1))
    return hidden, float(transformer_config.get("mlp_ratio") or transformer_config.get("ffn_dim", 4 * hidden) / hidden)


def decoder_channels(vae_config: dict) -> int:
    """The VAE decoder's channels at full resolution (its widest feature maps in pixels)."""
    channels = vae_config.get("decoder_block_out_channels") or vae_config.get("block_out_channels")
    if channels:
        return int(channels[0])
    return int(vae_config.get("base_dim") or 128)  # Wan's VAE


def generation_bytes(size: tuple[int, int, int], compression: tuple[int, int], vae_config: dict,
                     transformer_config: dict, text_tokens: int) -> float:
    """About the peak memory of generating one video of frames x height x width (see the module docstring);
    `compression` is the VAE's (temporal, spatial) factor."""
    frames, height, width = size
    temporal, spatial = compression
    grid = (1, (frames - 1) // temporal + 1, height // spatial, width // spatial)
    tokens = video_tokens(transformer_config, grid) + text_tokens
    hidden, mlp_ratio = hidden_and_mlp_ratio(transformer_config)
    transformer = activation_bytes(1, hidden, tokens, CFG_BATCH, mlp_ratio, checkpointing=False)
    pixels = frames * height * width
    vae = pixels * (2 * decoder_channels(vae_config) * BF16 + 3 * 4)
    return transformer + vae


def largest_gpu() -> tuple[float, str]:
    """The memory of the largest card `ft estimate` fits runs against, less its headroom, and how to say it."""
    gib = max(GPU_SIZES_GIB)
    return (1 - FIT_HEADROOM) * gib * GIB, f"the {gib} GiB of the largest GPU `ft estimate` knows (less " \
                                           f"{FIT_HEADROOM:.0%} headroom)"


def device_memory(device: Any) -> tuple[float, str]:
    """What one process may hold on `device`: a GPU's memory, or the machine's for a CPU, less the headroom."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        where = f"{device} ({total / GIB:.0f} GiB)"
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = f"this machine's memory ({total / GIB:.0f} GiB; training on the CPU)"
    return (1 - FIT_HEADROOM) * total, f"{where}, less {FIT_HEADROOM:.0%} headroom"


def check_generation_memory(size: tuple[int, int, int], compression: tuple[int, int], vae_config: dict,
                            transformer_config: dict, text_tokens: int, memory: tuple[float, str]) -> str | None:
    """Why one video of `size` cannot be generated within `memory` (bytes, and what they are), or None."""
    need = generation_bytes(size, compression, vae_config, transformer_config, text_tokens)
    if need <= memory[0]:
        return None
    return (f"generating it needs about {need / GIB:,.1f} GiB (one transformer block's activations with guidance, the "
            f"VAE's decoding and the video; the arithmetic of `ft estimate`), more than {memory[1]}")

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
"""

from __future__ import annotations

import math
from typing import Any

BF16 = 2
GIB = 2 ** 30
GPU_SIZES_GIB = (24, 48, 80)
FIT_HEADROOM = 0.1  # of a card's memory, not usable by the tensors counted here
CFG_BATCH = 2  # classifier-free guidance runs the conditional and unconditional prompt as one batch


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

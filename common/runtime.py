"""Small runtime helpers both stages use: choosing the device, seeding, glibc's allocator settings, a bounded
prefetching map."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .errors import UserError

T = TypeVar("T")
R = TypeVar("R")


def pick_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. An explicit name is checked."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible to this process; use --device cpu.")
    return name


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# glibc's malloc starts with a 128 KiB mmap threshold and raises it (and its trim threshold, at twice the mmap one)
# only as large blocks are freed. A training step frees and reallocates the same activation sizes every step: before
# the thresholds settle, each step's blocks went back to the kernel and returned as fresh zeroed pages (ft's medium
# CogVideoX step: ~4,000-8,000 minor page faults per step, each unmapping flushing the other OpenMP thread's TLB).
# Pinning them at the ceiling glibc's own rule reaches (32 MiB, and 64 MiB to trim) keeps those blocks in the heap
# from the first step: 0-100 faults per step (from 4,000-9,000), and the step went from 0.92x finetrainers' speed to
# 1.10x (bench/results/peer_medium_malloc.md). Allocations above 32 MiB still map and unmap as before, so
# long-lived memory is returned as it was.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h


def steady_malloc() -> bool:
    """Pin glibc's mmap and trim thresholds (above) for this process; True when they were set. Does nothing when the
    C library is not glibc, or when the user chose allocator settings (GLIBC_TUNABLES, MALLOC_*_ variables, a
    preloaded allocator), which are theirs to keep."""
    import ctypes
    import os
    import platform

    if platform.libc_ver()[0] != "glibc" or os.environ.get("LD_PRELOAD") or os.environ.get("GLIBC_TUNABLES") or any(
            k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None,
                 inline: Callable[[T], bool] | None = None) -> Iterator[R]:
    """`map(fn, items)` in order, computed by `workers` threads at most `ahead` items in advance. Items `inline`
    accepts (work too small for a thread: handing each to a pool thread cost planning 5x its CPU at 30k cache
    hits) are computed by the caller's thread when their turn comes."""
    if workers <= 0:
        yield from map(fn, items)
        return
    ahead = ahead or workers * 2
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R] | tuple[T]] = deque()
        for item in items:
            pending.append((item,) if inline is not None and inline(item) else pool.submit(fn, item))
            if len(pending) >= ahead:
                done = pending.popleft()
                yield fn(done[0]) if isinstance(done, tuple) else done.result()
        while pending:
            done = pending.popleft()
            yield fn(done[0]) if isinstance(done, tuple) else done.result()

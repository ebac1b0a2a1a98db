"""Small runtime helpers both stages use: choosing the device, seeding, a bounded prefetching map."""

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


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None) -> Iterator[R]:
    """`map(fn, items)` in order, computed by `workers` threads at most `ahead` items in advance."""
    if workers <= 0:
        yield from map(fn, items)
        return
    ahead = ahead or workers * 2
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

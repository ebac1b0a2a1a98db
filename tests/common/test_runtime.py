"""common/runtime.py's steady_malloc: the allocator keeps a step's freed blocks instead of faulting them back in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# a "step" as a training loop makes one: the forward keeps 24 activations of 1 MiB for the backward, which frees them
# all at the end (the heap's top then holds 24 MiB free, over glibc's own trim threshold of 2 MiB). Through libc's
# malloc directly, so no other allocation sits between the blocks.
PROBE = """
import ctypes, json, resource, sys
from ft.common.runtime import steady_malloc
pinned = steady_malloc() if sys.argv[1] == "pin" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():
    blocks = [libc.malloc(1 << 20) for _ in range(24)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in reversed(blocks):
        libc.free(block)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"pinned": pinned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str, env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_steady_malloc_keeps_freed_blocks():
    plain, pinned = probe("plain"), probe("pin")
    assert pinned["pinned"] is True
    # 20 steps of 24 MiB: without it every step faults its blocks in again (6,144 pages); with it they stay in the heap
    assert plain["faults"] > 20 * 1000, plain
    assert pinned["faults"] < 200, pinned


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_steady_malloc_leaves_the_users_settings():
    assert probe("pin", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["pinned"] is False
    assert probe("pin", {"MALLOC_ARENA_MAX": "2"})["pinned"] is False

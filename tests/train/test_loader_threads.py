"""The reader thread and torch's intra-op threads: batches are stacked without starting an OpenMP thread team in the
reader thread (a second team makes GNU OpenMP stop busy-waiting in every team, which left a third of a core idle
in each training step on a 2-core CPU), and the stacked batches are bitwise what torch.stack makes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ft.common.shards import stack_tensors

# well above ATen's grain size (32768 elements): torch.stack of these runs as an OpenMP parallel region
BIG = (226, 512)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_stack_tensors_is_bitwise_torch_stack(dtype):
    g = torch.Generator().manual_seed(0)
    for shape in [BIG, (3, 1, 4, 4), ()]:
        tensors = [(torch.randn(shape, generator=g) * 10).to(dtype) for _ in range(3)]
        stacked, expected = stack_tensors(tensors), torch.stack(tensors)
        assert stacked.dtype == expected.dtype and stacked.shape == expected.shape
        assert stacked.is_contiguous()
        assert torch.equal(stacked.view(torch.uint8), expected.view(torch.uint8))


def test_a_single_sample_batch_is_a_copy_not_a_view_of_the_shard_bytes():
    source = torch.zeros(4, 4)
    batch = stack_tensors([source])
    source += 1
    assert torch.equal(batch[0], torch.zeros(4, 4))


READER_AND_CONTROL = """
import os, threading, time, torch
from ft.common.shards import Sample
from ft.train.loader import background, collate

def os_threads():
    return len(os.listdir("/proc/self/task"))

torch.ones(226, 512).clone()  # the main thread's own team exists before counting
samples = [Sample("k0", {"cond": {"prompt_embeds": torch.ones(226, 512)}}, {})]

def stream():
    while True:
        yield collate(samples)

before = os_threads()
reader = background(stream(), size=2)
seen = [(next(reader), os_threads())[1] for _ in range(6)]
reader.close()
print("reader", max(seen) - before)
for _ in range(100):  # the reader's OS thread ends a moment after join() returns
    if os_threads() == before:
        break
    time.sleep(0.02)

started, done = threading.Event(), threading.Event()

def control():  # what collate did: torch.stack of a batch of one
    torch.stack([samples[0].tensors["cond"]["prompt_embeds"]])
    started.set()
    done.wait()

before = os_threads()
threading.Thread(target=control, daemon=True).start()
started.wait()
print("control", os_threads() - before)
done.set()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="counts the OS threads of a process (Linux), with 2+ intra-op threads")
def test_the_reader_thread_starts_no_openmp_team():
    """Reading batches of big tensors in the background adds one OS thread (the reader), not an OpenMP team of
    its own; the control (torch.stack in a thread, what collate did) shows that the count can tell. In a fresh
    process: a team outlives the thread that started it."""
    out = subprocess.run([sys.executable, "-c", READER_AND_CONTROL], capture_output=True, text=True, check=True,
                         timeout=300).stdout.split()
    counts = dict(zip(out[::2], map(int, out[1::2]), strict=True))
    assert counts["control"] >= 2, f"torch.stack in a thread started no team here ({counts}): the check is moot"
    assert counts["reader"] == 1, counts

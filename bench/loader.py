"""How fast training can read cached latents: ft's shard reader against its ceiling and the usual alternatives.

    python bench/loader.py [--samples 200] [--bucket 49x480x720] [--repeats 3]

Writes the same samples (CogVideoX shapes: latent mean + logvar [16, F/4+1, H/8, W/8] and T5 embeddings
[226, 4096], bf16) as tar shards and as one torch.save file per sample into a temp folder, then reads each back
from the page cache (best of --repeats) and prints a table, also written to bench/results/loader.md:
- `cat` of the shard files to /dev/null: the ceiling, what reading the bytes costs with no parsing at all;
- ft `iter_shard`, unverified (every pass after the first) and verified as `ft train`'s first pass does it
  (the xxh3-128 digest the manifest records), and the alternatives measured for that first pass: sha256 in the
  reading thread (what it did before), sha256 in a second thread overlapped with reading and the consumer;
- webdataset + safetensors.torch.load: a plain WebDataset pipeline over the same shards;
- torch.load per sample file: how finetrainers caches precomputed latents.
The ratio columns compare each row with `cat` and with the unverified ft reader; the target for the verified
first pass is at least half the unverified rate.
"""

from __future__ import annotations

import argparse
import hashlib
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ft.common.shards import ShardInfo, ShardWriter, _tar_members, iter_shard, parse_bucket, tensors_from_bytes

VERIFIED_TARGET = 0.5  # the verified first pass reads at least half as fast as the unverified passes


def make_sample(frames: int, height: int, width: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    return {"latents": {"mean": torch.randn(shape, generator=g).bfloat16(),
                        "logvar": torch.randn(shape, generator=g).bfloat16()},
            "cond": {"prompt_embeds": torch.randn(226, 4096, generator=g).bfloat16()}}


class ThreadedSha256:
    """sha256 fed from a second thread, so hashing overlaps reading and the consumer (hashlib releases the GIL
    on large buffers). Small buffers (tar headers, which the reader reuses) are copied before they are queued."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (buf := self.queue.get()) is not None:
            self.sha.update(buf)

    def update(self, view: memoryview) -> None:
        self.queue.put(bytes(view) if len(view) < 1 << 16 else view)

    def hexdigest(self) -> str:
        self.queue.put(None)
        self.thread.join()
        return self.sha.hexdigest()


def best_of(repeats: int, fn: Callable[[], int]) -> tuple[float, int]:
    """The fastest of `repeats` runs (the machine may be shared): (seconds, samples read)."""
    best, n = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - start)
    return best, n


def readers(folder: Path, shards: list[ShardInfo], pt_files: list[Path]) -> dict[str, Callable[[], int]]:
    """Each way of reading the samples, as a function returning how many it read."""
    paths = [folder / s.name for s in shards]

    def cat() -> int:
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
        return sum(s.samples for s in shards)

    def ft(verify: bool, sha256: bool = False) -> int:
        n = 0
        for s in shards:
            kwargs = {"expected_sha256": s.sha256} if sha256 else {"verify": s if verify else None}
            for item in iter_shard(folder / s.name, **kwargs):
                n += item.tensors["latents"]["mean"].numel() > 0
        return n

    def ft_threaded_sha256() -> int:
        n = 0
        for s in shards:
            hasher = ThreadedSha256()
            with open(folder / s.name, "rb", buffering=0) as f:
                for name, buf in _tar_members(f, hasher, folder / s.name):  # type: ignore[arg-type]
                    if name.endswith(".latents.safetensors"):
                        n += tensors_from_bytes(buf)["mean"].numel() > 0
                    elif name.endswith(".cond.safetensors"):
                        tensors_from_bytes(buf)
                while chunk := f.read(1 << 20):
                    hasher.update(memoryview(chunk))
            assert hasher.hexdigest() == s.sha256, s.name
        return n

    def webdataset() -> int:
        import webdataset as wds
        from safetensors.torch import load

        n = 0
        for item in wds.WebDataset([str(p) for p in paths], shardshuffle=False):
            latents, cond = load(item["latents.safetensors"]), load(item["cond.safetensors"])
            n += latents["mean"].numel() > 0 and cond["prompt_embeds"].numel() > 0
        return n

    def torch_load() -> int:
        return sum(torch.load(p)["mean"].numel() > 0 for p in pt_files)

    return {
        "`cat` shards > /dev/null (ceiling)": cat,
        "ft iter_shard, unverified (passes after the first)": lambda: ft(False),
        "ft iter_shard + xxh3-128 verify (first pass, now)": lambda: ft(True),
        "ft iter_shard + sha256 verify (first pass, before)": lambda: ft(False, sha256=True),
        "ft + sha256 in a second thread (measured, not taken)": ft_threaded_sha256,
        "webdataset + safetensors.load": webdataset,
        "torch.load per sample file (finetrainers' cache)": torch_load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--bucket", default="49x480x720")
    parser.add_argument("--repeats", type=int, default=3, help="take the best of this many reads of each kind")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/loader.md")
    args = parser.parse_args()
    frames, height, width = parse_bucket(args.bucket)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writer = ShardWriter(root / "shards", max_samples=64)
        (root / "pt").mkdir()
        sample = make_sample(frames, height, width, 0)
        pt_files = []
        for i in range(args.samples):
            key = f"{i:08d}"
            writer.write(key, sample, {"bucket": [frames, height, width]})
            pt_files.append(root / "pt" / f"{key}.pt")
            torch.save({**sample["latents"], **sample["cond"]}, pt_files[-1])
        writer.finish_shard()
        total_bytes = sum(s.bytes for s in writer.completed)
        ways = readers(root / "shards", writer.completed, pt_files)
        for fn in ways.values():  # warm the page cache (and the imports)
            fn()
        rows = {name: best_of(args.repeats, fn) for name, fn in ways.items()}
    per_sample = total_bytes / args.samples
    rate = {name: n / seconds for name, (seconds, n) in rows.items()}
    ceiling, unverified = rate["`cat` shards > /dev/null (ceiling)"], rate[list(rate)[1]]
    lines = [f"{args.samples} samples of {args.bucket}, {per_sample / 1e6:.2f} MB each, read from the page cache "
             f"(best of {args.repeats})", "",
             "| reader | samples/s | GB/s | of `cat` | of unverified ft |", "|---|---|---|---|---|"]
    for name, (_, n) in rows.items():
        assert n == args.samples, (name, n)
        lines.append(f"| {name} | {rate[name]:.0f} | {rate[name] * per_sample / 1e9:.2f} | "
                     f"{rate[name] / ceiling:.0%} | {rate[name] / unverified:.0%} |")
    verified = rate[list(rate)[2]] / unverified
    lines += ["", f"verified first pass at {verified:.0%} of the unverified rate: target >= {VERIFIED_TARGET:.0%} "
                  f"{'met' if verified >= VERIFIED_TARGET else 'NOT met'}"]
    body = "\n".join(lines)
    if args.no_save:
        print(body)
    else:
        from report import save_result

        save_result("loader", body)


if __name__ == "__main__":
    main()

"""How fast training can read cached latents: ft's shard reader against the usual alternatives.

    python bench/loader.py [--samples 200] [--bucket 49x480x720]

Writes the same samples (CogVideoX shapes: latent mean + logvar [16, F/4+1, H/8, W/8] and T5 embeddings
[226, 4096], bf16) three ways into a temp folder, then reads each back once from the page cache and prints a table:
- ft: `iter_shard` over tar shards (zero-copy safetensors views), with and without sha256 verification;
- webdataset + safetensors.torch.load: a plain WebDataset pipeline over the same shards;
- torch.load per sample file: how finetrainers caches precomputed latents.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ft.common.shards import ShardWriter, iter_shard


def make_sample(frames: int, height: int, width: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    return {"latents": {"mean": torch.randn(shape, generator=g).bfloat16(),
                        "logvar": torch.randn(shape, generator=g).bfloat16()},
            "cond": {"prompt_embeds": torch.randn(226, 4096, generator=g).bfloat16()}}


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--bucket", default="49x480x720")
    args = parser.parse_args()
    frames, height, width = (int(x) for x in args.bucket.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writer = ShardWriter(root / "shards", max_samples=64)
        (root / "pt").mkdir()
        sample = make_sample(frames, height, width, 0)
        for i in range(args.samples):
            key = f"{i:08d}"
            writer.write(key, sample, {"bucket": [frames, height, width]})
            torch.save({**sample["latents"], **sample["cond"]}, root / "pt" / f"{key}.pt")
        writer.finish_shard()
        shards = writer.completed
        total_bytes = sum(s.bytes for s in shards)

        def read_ft(verify: bool) -> int:
            n = 0
            for s in shards:
                for item in iter_shard(root / "shards" / s.name, s.sha256 if verify else None):
                    n += item.tensors["latents"]["mean"].numel() > 0
            return n

        def read_webdataset() -> int:
            import webdataset as wds
            from safetensors.torch import load

            urls = [str(root / "shards" / s.name) for s in shards]
            n = 0
            for item in wds.WebDataset(urls, shardshuffle=False):
                latents, cond = load(item["latents.safetensors"]), load(item["cond.safetensors"])
                n += latents["mean"].numel() > 0 and cond["prompt_embeds"].numel() > 0
            return n

        def read_torch_load() -> int:
            return sum(torch.load(p)["mean"].numel() > 0 for p in sorted((root / "pt").iterdir()))

        read_ft(False)  # warm the page cache
        read_torch_load()
        rows = [("ft iter_shard (zero-copy)", timed(lambda: read_ft(False))),
                ("ft iter_shard + sha256 verify", timed(lambda: read_ft(True))),
                ("webdataset + safetensors.load", timed(read_webdataset)),
                ("torch.load per sample file", timed(read_torch_load))]
    per_sample = total_bytes / args.samples
    print(f"{args.samples} samples of {args.bucket}, {per_sample / 1e6:.2f} MB each, read from the page cache\n")
    print("| reader | samples/s | GB/s |\n|---|---|---|")
    for name, (seconds, n) in rows:
        assert n == args.samples, (name, n)
        print(f"| {name} | {n / seconds:.0f} | {n * per_sample / seconds / 1e9:.2f} |")


if __name__ == "__main__":
    main()

"""`ft train`'s data start-up at 1k to 10M samples, on sets that hold only the shards the start-up reads.

    python bench/train_startup_scale.py [--samples 1000,100000,1000000,10000000] [--work DIR] [--no-save]

A 10M-sample set written in full is about 36 GB and 20 minutes on a 2-core machine (bench/precompute_scale.py
writes and merges them); the start-up reads only the set's manifest, its index (`set_index.bin`, mapped), its
training view's key file (digested once per start, `set_index.source_id`) and the first shards in the pass's order.
So this writes exactly that: the manifest of ceil(N / 256) shards of 256 samples (one job's names, the synthetic
keys of bench/synthetic_set.py, one bucket), the training view's `active_keys.txt` (N keys), the index built
straight from those rows (`build_set_index(shard_columns=...)`: checked once, at the first size when it is small,
to be byte for byte what the build from the shards' `.idx` files writes), and, of the shards, only the first
`REAL_SHARDS` of epoch 0's order (and those about each measured resume point) as real shards (bench/
synthetic_set.py's stamped copies, with their true digests); every other shard is an empty file of the same name,
which the start-up never opens (it fails loudly if it does).

Then bench/precompute_scale.py's `ft train` data start-up (a new process, after its imports: open the set, map its
index, plan the first epoch, read the first batch: wall and CPU seconds, what it added to its peak RSS, and private
(anonymous) and file-backed (the index's mapped pages, shared through the page cache) RSS at the first batch), in
one process and in 2 at once (rank 0 and 1 of 2), and a resume at the middle and at the last step of the pass
(the position a checkpoint saves: the pass's stream replayed up to it). The growth rows give the ratio between
successive sizes. Each set is deleted once measured.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precompute_scale import ratio, train_startup  # noqa: E402
from synthetic_set import BUCKET, PER_SHARD, ShardTemplate, _write_real, _write_stamped, sample_key  # noqa: E402

from ft.common.shards import ACTIVE_KEYS_NAME, INDEX_NAME, Manifest, ShardInfo  # noqa: E402
from ft.common.shards.set_index_build import build_set_index  # noqa: E402
from ft.train.plan import mix_seed  # noqa: E402

REAL_SHARDS = 6  # the first shards of epoch 0's order written for real: the first batch of rank 0 or 1 of 2 is in them
CHECK_UP_TO = 20_000  # the index check writes every shard: only at the first size, and only a small one
REAL_BEFORE = 40  # and those before and after each resume point: a sample stays in the buffer of 256 a while


def resumes(n: int) -> list[int]:
    """The steps a resume is measured at: the middle and the last of epoch 0 (one bucket, --batch-size 1, one
    process: a step a sample)."""
    return [n // 2, n - 1]
BUCKET_NAME = "x".join(map(str, BUCKET))


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def digests(first: int, count: int) -> np.ndarray:
    """Samples first..first+count-1's keys as (count, 16) digests (the bytes their hex spells)."""
    raw = b"".join(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()
                   for i in range(first, first + count))
    return np.frombuffer(raw, np.uint8).reshape(count, 16)


def make_set(folder: Path, n: int, check: bool = False) -> None:
    """The set of n samples as the start-up sees it (the module docstring): manifest, view, index, first shards."""
    folder.mkdir(parents=True)
    count = -(-n // PER_SHARD)
    sizes = [min(PER_SHARD, n - i * PER_SHARD) for i in range(count)]
    order = sorted(shard_name(i) for i in range(count))
    random.Random(mix_seed(0, 0, "shards")).shuffle(order)  # train/plan.py's shard order of seed 0, epoch 0
    around = [0, *(max(0, (step + 1) // PER_SHARD - REAL_BEFORE) for step in resumes(n))]
    real = {int(name[6:12]) for start in around for name in order[start: start + REAL_BEFORE + REAL_SHARDS]}
    template_dir = folder / "template"
    template_dir.mkdir()
    keys = [sample_key(i) for i in range(PER_SHARD)]
    template = ShardTemplate(template_dir, _write_real(template_dir, "shard", 0, keys, None).name, keys)
    spans = np.array(template.spans, np.int64)
    infos = []
    for i in range(count):
        keys = [sample_key(j) for j in range(i * PER_SHARD, i * PER_SHARD + sizes[i])]
        if i in real and sizes[i] == PER_SHARD:
            infos.append(_write_stamped(folder, shard_name(i), template, keys))
        elif i in real:
            infos.append(_write_real(folder, "shard", i, keys, None))
        else:
            (folder / shard_name(i)).touch()
            infos.append(ShardInfo(shard_name(i), sizes[i], len(template.data), "0" * 64, {BUCKET_NAME: sizes[i]},
                                   "0" * 32))
    shutil.rmtree(template_dir)
    with open(folder / ACTIVE_KEYS_NAME, "w") as f:
        for start in range(0, n, 1 << 16):
            f.write("".join(sample_key(i) + "\n" for i in range(start, min(n, start + (1 << 16)))))
    manifest = Manifest("cogvideox", {}, "f", {}, {"latent_channels": 4}, shards=infos, complete=True,
                        active={"keys_file": ACTIVE_KEYS_NAME, "samples": n, "buckets": {BUCKET_NAME: n}})
    manifest.save(folder)

    def columns():
        for i, size in enumerate(sizes):
            keys = digests(i * PER_SHARD, size)
            yield {"key": keys, "video_key": keys, "text_key": keys, "image_key": np.zeros_like(keys),
                   "bucket": np.zeros(size, np.int64), "begin": spans[:size, 0], "end": spans[:size, 1]}

    build_set_index(folder, manifest, folder / INDEX_NAME, shard_columns=columns())
    if check:  # the same bytes as the index built from the `.idx` files (every shard written for real)
        full = folder.with_name(folder.name + "-check")
        full.mkdir()
        for i in range(count):
            _write_real(full, "shard", i, [sample_key(j) for j in range(i * PER_SHARD, i * PER_SHARD + sizes[i])],
                        None)
        shutil.copy(folder / ACTIVE_KEYS_NAME, full)
        build_set_index(full, manifest, full / "from-idx.bin")
        build_set_index(full, manifest, full / "from-columns.bin", shard_columns=columns())
        same = (full / "from-idx.bin").read_bytes() == (full / "from-columns.bin").read_bytes()
        shutil.rmtree(full)
        assert same, "the index built from columns differs from the one built from the .idx files"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="1000,100000,1000000,10000000")
    parser.add_argument("--work", default=None, help="folder for the sets (default: a temporary one in /tmp)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.samples.split(",") if x]
    rows = [f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores", "",
            "| samples | data start-up: wall / CPU | + peak RSS | + private / file-backed at the first batch | "
            "2 processes: wall / CPU (slowest) | + peak RSS (each, most) | + private / file-backed (most) | "
            "resume mid-pass: wall / CPU, + peak | resume at the last step: wall / CPU, + peak |",
            "|---|---|---|---|---|---|---|---|---|"]
    found = []
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ft-bench-startup-", dir=args.work) as tmp:
        for i, n in enumerate(sizes):
            folder = Path(tmp) / f"set-{n}"
            make_set(folder, n, check=i == 0 and n <= CHECK_UP_TO)
            one, two = train_startup(folder), train_startup(folder, world=2)
            mid, last = (train_startup(folder, taken=step) for step in resumes(n))
            found.append((n, one))
            rows.append(f"| {n:,} | {one['wall']:.2f} / {one['cpu']:.2f} s | {one['peak']:.1f} MB | "
                        f"{one['anon']:.1f} / {one['file']:.1f} MB | {two['wall']:.2f} / {two['cpu']:.2f} s | "
                        f"{two['peak']:.1f} MB | {two['anon']:.1f} / {two['file']:.1f} MB | "
                        f"{mid['wall']:.2f} / {mid['cpu']:.2f} s, {mid['peak']:.1f} MB | "
                        f"{last['wall']:.2f} / {last['cpu']:.2f} s, {last['peak']:.1f} MB |")
            shutil.rmtree(folder)
    for (a, ra), (b, rb) in zip(found, found[1:], strict=False):
        rows.append(f"| growth {a:,} -> {b:,} ({b // a}x) | {ratio(rb['wall'], ra['wall'])} / "
                    f"{ratio(rb['cpu'], ra['cpu'])} | {ratio(rb['peak'], ra['peak'])} | | | | | | |")
    rows.append(f"load average after: {os.getloadavg()[0]:.2f}")
    table = "\n".join(rows)
    if args.no_save:
        print(table)
        return
    from report import save_result

    save_result("train_startup_scale", table)


if __name__ == "__main__":
    main()

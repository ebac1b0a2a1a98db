"""Synthetic shard sets of up to ten million tiny samples, written as N precompute jobs write them, fast.

`ShardWriter` costs about 0.6-1.2 ms a sample here (safetensors serialisation, tarfile's header building), which
would make 10M samples take hours. Every synthetic sample has the same tensors and differs only in its key, so a
full shard differs from another only where the keys are written: member names, the JSON's half keys, and each tar
header's checksum. This writes shard 0 of each job with ft's own `ShardWriter`, then every further full shard by
copying it with numpy, writing each sample's key at the places shard 0 has its own and recomputing the header
checksums, and checks once that the copy is byte for byte what `ShardWriter` writes for those keys (the shard and
its `.idx`). Each shard is hashed (sha256, xxh3-128), renamed into place after its `.idx`, and appended to its job's
journal, as `ShardWriter` and `ft precompute` do; a job's last, partial shard is written by `ShardWriter` itself.
Each job also leaves what a real one leaves for the merge: its keys, one warning per sample, and its media cache
file (one entry per input file, about 265 bytes, as planning writes them).

    from synthetic_set import write_jobs
    write_jobs(folder, samples=1_000_000, num_jobs=4)   # then precompute.merge.finalize(folder)
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from ft.common.shards import JOBS_DIR, JobState, ShardInfo, ShardWriter, append_journal, new_hasher, write_atomic
from ft.common.shards.manifest import input_summary
from ft.common.shards.reader import index_header, index_path

PER_SHARD = 256
BUCKET = [9, 32, 32]
WARNING = {"reason": "caption of 300 tokens is cut to --max-sequence-length 226", "kind": "caption-truncated"}


def sample_key(i: int) -> str:
    """Sample i's key: 32 hex characters spread over the key space as sha256 keys are."""
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest()


def _tensors():
    import torch

    latents = {"mean": torch.zeros(4, 1, 2, 2, dtype=torch.bfloat16), "logvar": torch.zeros(4, 1, 2, 2)}
    return {"latents": latents, "cond": {"prompt_embeds": torch.zeros(4, 8, dtype=torch.bfloat16)}}


def _meta(key: str) -> dict:
    return {"bucket": BUCKET, "video_key": key, "text_key": key, "caption": "c"}


def _write_real(folder: Path, prefix: str, start: int, keys: list[str], on_shard) -> ShardInfo:
    writer = ShardWriter(folder, prefix=prefix, start_index=start, max_samples=len(keys), on_shard=on_shard)
    tensors = _tensors()
    for key in keys:
        writer.write(key, tensors, _meta(key))
    writer.finish_shard()
    return writer.completed[-1]


class ShardTemplate:
    """Shard 0's bytes and where its keys and headers are, to stamp other keys into."""

    def __init__(self, folder: Path, name: str, keys: list[str]):
        self.data = np.fromfile(folder / name, np.uint8)
        self.keys = keys
        with tarfile.open(folder / name) as tar:
            self.headers = np.array([m.offset for m in tar.getmembers()], np.int64)
        raw = self.data.tobytes()
        spots = []  # (sample, offset) of every copy of a sample's key
        for j, key in enumerate(keys):
            at = raw.find(key.encode())
            while at != -1:
                spots.append((j, at))
                at = raw.find(key.encode(), at + 1)
        self.sample = np.array([s for s, _ in spots], np.int64)
        self.offset = np.array([o for _, o in spots], np.int64)
        lines = index_path(folder / name).read_text().splitlines()[1:]
        self.spans = [tuple(json.loads(line)[4:6]) for line in lines]

    def stamp(self, keys: list[str]) -> bytes:
        data = self.data.copy()
        new = np.frombuffer("".join(keys).encode(), np.uint8).reshape(len(keys), 32)
        data[self.offset[:, None] + np.arange(32)] = new[self.sample]
        heads = data[self.headers[:, None] + np.arange(512)].astype(np.int64)
        heads[:, 148:156] = ord(" ")
        digits = np.char.encode(np.char.mod("%06o", heads.sum(axis=1)), "ascii")
        checksum = np.frombuffer(b"".join(d + b"\0 " for d in digits.tolist()), np.uint8).reshape(-1, 8)
        data[self.headers[:, None] + np.arange(148, 156)] = checksum
        return data.tobytes()

    def index_lines(self, keys: list[str]) -> str:
        return "".join(f'["{k}","{k}","{k}","{BUCKET[0]}x{BUCKET[1]}x{BUCKET[2]}",{b},{e}]\n'
                       for k, (b, e) in zip(keys, self.spans, strict=True))


def _write_stamped(folder: Path, name: str, template: ShardTemplate, keys: list[str]) -> ShardInfo:
    data = template.stamp(keys)
    sha, xxh = hashlib.sha256(data), new_hasher("xxh3_128")
    xxh.update(data)
    info = ShardInfo(name, len(keys), len(data), sha.hexdigest(), {"x".join(map(str, BUCKET)): len(keys)},
                     xxh.hexdigest())
    tmp = folder / (name + ".tmp")
    tmp.write_bytes(data)
    idx = index_path(folder / name)
    idx_tmp = idx.with_name(idx.name + ".tmp")
    idx_tmp.write_text(json.dumps(index_header(info), separators=(",", ":")) + "\n" + template.index_lines(keys))
    os.replace(idx_tmp, idx)
    os.replace(tmp, folder / name)
    return info


def write_job(folder: Path, index: int, num_jobs: int, first: int, count: int, check: bool = True) -> None:
    """Job `index` of `num_jobs`: samples first..first+count-1, its state, journal, keys and warnings files."""
    state = JobState(index, num_jobs, "bench", "host", os.getpid(), "now",
                     header={"model_family": "cogvideox", "encoders": {}, "encoder_fingerprint": "f", "encoding": {},
                             "shapes": {"latent_channels": 4}, "empty_caption": {}})
    prefix = "shard" if num_jobs == 1 else f"shard-j{index:04d}"
    with open(folder / state.file(".active.txt.tmp"), "w") as keys_file, \
            open(folder / state.file(".warnings.jsonl.tmp"), "w") as warnings_file:
        for start in range(first, first + count, 1 << 16):
            keys = [sample_key(i) for i in range(start, min(start + (1 << 16), first + count))]
            keys_file.write("".join(k + "\n" for k in keys))
            warnings_file.write("".join(json.dumps({"path": f"videos/clip_{i:08d}.mp4", **WARNING}) + "\n"
                                        for i in range(start, start + len(keys))))
    cache = folder / "cache"
    cache.mkdir(exist_ok=True)
    with open(cache / f"media-{state.stem}.jsonl", "w") as media:  # what planning caches of each input file
        for start in range(first, first + count, 1 << 16):
            media.write("".join(json.dumps(
                {"path": f"/data/videos/clip_{i:08d}.mp4", "stat": [4_000_000 + i, 1_700_000_000_000_000_000 + i, i],
                 "probe_version": 2, "decoder": "decord", "frames": 49, "fps": 24.0, "height": 480, "width": 720,
                 "sha256": hashlib.sha256(i.to_bytes(8, "little")).hexdigest(), "timestamps": None, "notes": []},
                separators=(",", ":")) + "\n" for i in range(start, min(start + (1 << 16), first + count))))
    os.replace(folder / state.file(".active.txt.tmp"), folder / state.file(".active.txt"))
    os.replace(folder / state.file(".warnings.jsonl.tmp"), folder / state.file(".warnings.jsonl"))
    state.active = {"file": state.file(".active.txt"), "samples": count, "buckets": {"x".join(map(str, BUCKET)): count}}
    state.inputs = {"warnings": {**input_summary([state.file(".warnings.jsonl")], []), "count": count,
                                 "kinds": {WARNING["kind"]: count}}}
    state.save(folder)

    def record(info: ShardInfo) -> None:
        append_journal(folder, state, info)

    template = None
    for shard, start in enumerate(range(first, first + count, PER_SHARD)):
        keys = [sample_key(i) for i in range(start, min(start + PER_SHARD, first + count))]
        if template is None or len(keys) < PER_SHARD:
            info = _write_real(folder, prefix, shard, keys, record)
            if template is None and len(keys) == PER_SHARD:
                template = ShardTemplate(folder, info.name, keys)
            continue
        name = f"{prefix}-{shard:06d}.tar"
        info = _write_stamped(folder, name, template, keys)
        if check:  # once per job: the stamped shard is what ShardWriter writes for these keys
            real = folder / "check"
            real.mkdir(exist_ok=True)
            made = _write_real(real, prefix, shard, keys, None)
            assert (real / name).read_bytes() == (folder / name).read_bytes(), "stamped shard differs"
            assert made == info, (made, info)
            assert index_path(real / name).read_text() == index_path(folder / name).read_text()
            for p in real.iterdir():
                p.unlink()
            real.rmdir()
            check = False
        record(info)
    state.complete = True
    state.save(folder)


def write_jobs(folder: Path, samples: int, num_jobs: int = 4) -> None:
    """The set as `num_jobs` finished precompute jobs leave it, not merged yet."""
    (folder / JOBS_DIR).mkdir(parents=True)
    per = -(-samples // num_jobs)
    for j in range(num_jobs):
        first = j * per
        write_job(folder, j, num_jobs, first, max(0, min(per, samples - first)))
    write_atomic(folder / JOBS_DIR / "bench.txt", f"{samples} synthetic samples, {num_jobs} jobs\n")

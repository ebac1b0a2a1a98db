"""Shards never unpickle, and reading a shard set writes nothing: a planted pickle payload (a `.pth` or `.pyd`
member, or pickle bytes under a `.safetensors` name), safetensors headers that point outside their bytes, and
member names that leave the shard are all refused, and the payload's code never runs."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import pytest
import torch

from ft.cli.inspect_shards import describe
from ft.common.shards import (
    Manifest,
    ShardCorruptError,
    ShardInfo,
    ShardWriter,
    file_digest,
    iter_shard,
    tensors_from_bytes,
    tensors_to_bytes,
)
from ft.common.shards.set_index import INDEX_NAME


class Payload:
    """Unpickling this creates `marker`: if the file exists, code from the shard ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def make_shard(folder: Path, extra: list[tuple[str, bytes]]) -> Path:
    """A shard with one whole sample `good`, then the members in `extra` (as a hand-made or hostile tar could)."""
    writer = ShardWriter(folder)
    writer.write("good", {"latents": {"mean": torch.ones(2, 2)}, "cond": {"prompt_embeds": torch.zeros(3)}},
                 {"bucket": [1, 8, 8]})
    info = writer.finish_shard()
    path = folder / info.name
    with tarfile.open(path, "a") as tar:
        for name, data in extra:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def every_file(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def read_every_way(path: Path) -> None:
    """Read the shard as training and `ft inspect --verify` would; each must raise ShardCorruptError."""
    from ft.train.loader import DataStream, ShardSet

    with pytest.raises(ShardCorruptError):
        list(iter_shard(path))
    manifest = Manifest("cogvideox", {}, "", {}, {}, [ShardInfo(path.name, 2, path.stat().st_size,
                                                                file_digest(path), {"1x8x8": 2})])
    manifest.complete = True
    manifest.save(path.parent)
    with pytest.raises(ShardCorruptError):
        stream = DataStream([ShardSet(path.parent)], seed=0, batch_size=1).batches()
        for _ in range(4):  # a whole pass: the good sample, then the planted one
            next(stream)
    with pytest.raises(ShardCorruptError):
        describe(str(path.parent), verify=True)


@pytest.mark.parametrize("member", ["bad.latents.pth", "bad.cond.pyd", "bad.latents.pickle", "bad.pt"])
def test_a_pickle_member_is_refused_and_never_runs(tmp_path, member):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    path = make_shard(tmp_path / "shards", [(member, payload), ("bad.json", b'{"bucket": [1, 8, 8]}')])
    with pytest.raises(ShardCorruptError, match=f"{member} is neither .json nor .safetensors.*never hold pickles"):
        list(iter_shard(path))
    read_every_way(path)
    assert not marker.exists()


def test_pickle_bytes_under_a_safetensors_name_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"mean": Payload(marker)}, buf)  # what a torch.load of this member would execute
    path = make_shard(tmp_path / "shards", [("bad.latents.safetensors", buf.getvalue()),
                                            ("bad.json", b'{"bucket": [1, 8, 8]}')])
    with pytest.raises(ShardCorruptError, match="bad.latents.safetensors is damaged"):
        list(iter_shard(path))
    read_every_way(path)
    assert not marker.exists()


def forged(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize(("header", "data", "why"), [
    ({"x": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, b"\0" * 16, "do not fit"),  # past the end
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [-64, -48]}}, b"\0" * 16, "do not fit"),  # into the header
    ({"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, b"\0" * 16, "do not fit"),  # shape vs bytes
    ({"x": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),  # an object dtype
    ({"x": [1, 2]}, b"", "unknown dtype"),
])
def test_forged_safetensors_headers_are_refused(tmp_path, header, data, why):
    with pytest.raises(ValueError, match=why):
        tensors_from_bytes(bytearray(forged(header, data)))
    path = make_shard(tmp_path / "shards", [("bad.latents.safetensors", forged(header, data)),
                                            ("bad.json", b'{"bucket": [1, 8, 8]}')])
    with pytest.raises(ShardCorruptError, match="bad.latents.safetensors is damaged"):
        list(iter_shard(path))


def test_a_header_longer_than_its_member_is_refused():
    with pytest.raises(ValueError, match="header claims"):
        tensors_from_bytes(bytearray(struct.pack("<Q", 1 << 40) + b"{}"))


def test_a_genuine_member_still_reads():
    tensors = tensors_from_bytes(bytearray(tensors_to_bytes({"a": torch.arange(6.0).reshape(2, 3)})))
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("name", ["../../escape.json", "/tmp/ft-absolute-escape.json"])
def test_reading_never_writes_outside_the_shard_set(tmp_path, name):
    path = make_shard(tmp_path / "shards", [(name, b'{"bucket": [1, 8, 8]}')])
    before = every_file(tmp_path)
    with pytest.raises(ShardCorruptError, match="leaving the shard"):
        list(iter_shard(path))
    read_every_way(path)
    # the manifest, and the set's index that training saves beside it (common/shards/set_index.py)
    assert every_file(tmp_path) - before <= {str(tmp_path / "shards" / n) for n in ("manifest.json", INDEX_NAME)}
    assert not os.path.exists("/tmp/ft-absolute-escape.json")

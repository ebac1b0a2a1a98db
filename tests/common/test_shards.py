"""The shard contract: ShardWriter/iter_shard round trip, rotation, sha256 checks, WebDataset compatibility,
the manifest."""

from __future__ import annotations

import ctypes
import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import torch

from ft.common.errors import UserError
from ft.common.shards import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    ShardCorruptError,
    ShardInfo,
    ShardWriter,
    bucket_name,
    file_digest,
    index_path,
    iter_shard,
    load_manifest,
    open_shard_set,
    read_index_file,
    rows_from_headers,
    sample_key,
    shard_keys,
    shard_rows,
    tensors_from_bytes,
    tensors_to_bytes,
)

BUCKETS = [(9, 32, 32), (17, 32, 48), (9, 32, 32), (1, 32, 32), (9, 32, 32)]


def _sample(i: int) -> tuple[str, dict[str, dict[str, torch.Tensor]], dict]:
    g = torch.Generator().manual_seed(i)
    latents = {
        "mean": torch.randn(4, 3, 4, 4, generator=g).to(torch.bfloat16),
        "logvar": torch.randn(4, 3, 4, 4, generator=g),
    }
    cond = {
        "prompt_embeds": torch.randn(7, 16, generator=g).to(torch.bfloat16),
        "prompt_ids": torch.randint(0, 50_000, (7,), generator=g, dtype=torch.int64),
        "pooled": torch.randn(16, generator=g, dtype=torch.float32),
        "mask": torch.tensor([True] * 5 + [False] * 2),
    }
    meta = {"caption": f"clip number {i} ünïcode", "source": f"videos/clip_{i:03d}.mp4", "fps": 8.0,
            "frame_indices": list(range(9)), "bucket": list(BUCKETS[i % len(BUCKETS)]), "model_family": "toy"}
    key = sample_key({"source": meta["source"], "i": i})
    return key, {"latents": latents, "cond": cond}, meta


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        # bitwise: compare the raw bytes
        assert got[name].contiguous().view(torch.uint8).equal(t.contiguous().view(torch.uint8)), name


def _write(folder: Path, n: int, **kw) -> tuple[ShardWriter, list]:
    writer = ShardWriter(folder, **kw)
    samples = [_sample(i) for i in range(n)]
    for key, tensors, meta in samples:
        writer.write(key, tensors, meta)
    writer.finish_shard()
    return writer, samples


@pytest.fixture
def one_shard(tmp_path: Path) -> tuple[Path, ShardInfo, list]:
    writer, samples = _write(tmp_path / "shards", 3)
    assert len(writer.completed) == 1
    info = writer.completed[0]
    return tmp_path / "shards" / info.name, info, samples


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_bitwise(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, samples = one_shard
    got = list(iter_shard(path, info.sha256))
    assert [s.key for s in got] == [k for k, _, _ in samples]
    for s, (key, tensors, meta) in zip(got, samples, strict=True):
        assert s.key == key and s.meta == meta
        assert set(s.tensors) == {"latents", "cond"}
        _assert_same_tensors(s.tensors["latents"], tensors["latents"])
        _assert_same_tensors(s.tensors["cond"], tensors["cond"])


def test_round_trip_without_sha(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, _, samples = one_shard
    got = list(iter_shard(path))
    assert len(got) == len(samples)
    _assert_same_tensors(got[2].tensors["cond"], samples[2][1]["cond"])


def test_sample_with_one_group_and_empty_tensor(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path)
    tensors = {"latents": {"mean": torch.arange(6, dtype=torch.float32).view(2, 3), "empty": torch.zeros(0, 5)}}
    writer.write("k0", tensors, {"bucket": [1, 8, 8]})
    info = writer.finish_shard()
    assert info is not None
    (s,) = list(iter_shard(tmp_path / info.name, info.sha256))
    assert set(s.tensors) == {"latents"}
    _assert_same_tensors(s.tensors["latents"], tensors["latents"])


def test_shard_file_layout(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, samples = one_shard
    assert path.name == "shard-000000.tar" and info.name == path.name
    with tarfile.open(path) as tar:
        names = tar.getnames()
        members = tar.getmembers()
    expected = []
    for key, _, _ in samples:
        expected += [f"{key}.latents.safetensors", f"{key}.cond.safetensors", f"{key}.json"]
    assert names == expected
    assert all(m.mtime == 0 and m.mode == 0o644 for m in members)


def test_shard_info(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, _ = one_shard
    assert info.samples == 3
    assert info.bytes == path.stat().st_size
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_digest(path)
    assert info.buckets == {"17x32x48": 1, "9x32x32": 2}


def test_rotation_by_max_samples(tmp_path: Path) -> None:
    seen: list[ShardInfo] = []
    writer, samples = _write(tmp_path, 5, max_samples=2, prefix="part", start_index=7, on_shard=seen.append)
    assert [s.name for s in writer.completed] == ["part-000007.tar", "part-000008.tar", "part-000009.tar"]
    assert [s.samples for s in writer.completed] == [2, 2, 1]
    assert seen == writer.completed
    assert [s.buckets for s in writer.completed] == [
        {"17x32x48": 1, "9x32x32": 1}, {"1x32x32": 1, "9x32x32": 1}, {"9x32x32": 1}]
    assert sorted(p.name for p in tmp_path.glob("*.tar*")) == [s.name for s in writer.completed]  # no *.tmp left
    assert sorted(p.name for p in tmp_path.glob("*.idx")) == [f"part-00000{i}.idx" for i in (7, 8, 9)]
    keys_in_order = []
    for info in writer.completed:
        path = tmp_path / info.name
        assert info.bytes == path.stat().st_size
        assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        keys_in_order += [s.key for s in iter_shard(path, info.sha256)]
    assert keys_in_order == [k for k, _, _ in samples]
    assert writer.index == 10


def test_rotation_by_max_bytes_with_large_samples(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_bytes=100_000)
    for i in range(5):  # 64 KB of tensor data each: the second sample takes a shard past 100 KB
        writer.write(f"k{i}", {"latents": {"x": torch.full((16_000,), float(i))}}, {"bucket": [1, 8, 8]})
    writer.finish_shard()
    assert [s.samples for s in writer.completed] == [2, 2, 1]
    for info in writer.completed:
        assert info.bytes == (tmp_path / info.name).stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


def test_rotation_by_max_bytes_counts_buffered_bytes(tmp_path: Path) -> None:
    writer, _ = _write(tmp_path, 3, max_bytes=1)  # every sample alone is over the limit
    assert [s.samples for s in writer.completed] == [1, 1, 1]


def test_shard_is_a_tmp_file_until_finished(tmp_path: Path) -> None:
    calls: list[ShardInfo] = []
    writer = ShardWriter(tmp_path, max_samples=10, on_shard=calls.append)
    key, tensors, meta = _sample(0)
    writer.write(key, tensors, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar.tmp"]
    assert calls == []
    info = writer.finish_shard()
    assert calls == [info]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.idx", "shard-000000.tar"]
    assert writer.finish_shard() is None  # nothing open: no empty shard, no second callback
    assert calls == [info]


# ---------------------------------------------------------------------------------------------- integrity


def test_wrong_sha_raises_after_reading(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, _, samples = one_shard
    got = []
    with pytest.raises(ShardCorruptError, match="sha256 does not match") as e:
        for s in iter_shard(path, "0" * 64):
            got.append(s.key)
    assert got == [k for k, _, _ in samples]  # every sample came out before the check failed
    assert isinstance(e.value, UserError)
    assert path.name in str(e.value)


def test_shard_corrupt_error_is_a_user_error() -> None:
    assert issubclass(ShardCorruptError, UserError)


def _data_offset(path: Path, member_name: str) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        m = tar.getmember(member_name)
        return m.offset_data, m.size


def test_corrupted_tensor_byte_is_caught_by_sha(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, samples = one_shard
    key = samples[1][0]
    offset, size = _data_offset(path, f"{key}.latents.safetensors")
    data = bytearray(path.read_bytes())
    data[offset + size - 10] ^= 0xFF  # a byte of tensor data (the header is at the start of the member)
    path.write_bytes(bytes(data))
    # without a sha the damage goes unseen: the tar is intact, a tensor value is wrong
    got = list(iter_shard(path))
    assert len(got) == 3
    with pytest.raises(AssertionError):
        _assert_same_tensors(got[1].tensors["latents"], samples[1][1]["latents"])
    _assert_same_tensors(got[1].tensors["cond"], samples[1][1]["cond"])
    with pytest.raises(ShardCorruptError, match="sha256 does not match"):
        list(iter_shard(path, info.sha256))


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_byte_in_the_middle_is_caught_by_sha(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, _ = one_shard
    _flip_middle_byte(path)
    with pytest.raises(ShardCorruptError):
        list(iter_shard(path, info.sha256))


def test_corrupted_member_header_is_caught_by_sha(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, samples = one_shard
    key = samples[2][0]
    with tarfile.open(path) as tar:
        header_offset = tar.getmember(f"{key}.latents.safetensors").offset
    data = bytearray(path.read_bytes())
    data[header_offset + 3] ^= 0x20  # a letter of the member name: the header checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError):
        list(iter_shard(path, info.sha256))


def test_corrupted_json_member_is_a_shard_corrupt_error(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, samples = one_shard
    offset, _ = _data_offset(path, f"{samples[0][0]}.json")
    data = bytearray(path.read_bytes())
    assert data[offset : offset + 1] == b"{"
    data[offset] = ord("#")
    path.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError):
        list(iter_shard(path, info.sha256))


def test_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardCorruptError, match="bad.tar"):
        list(iter_shard(path))


def test_the_reader_verifies_the_xxh3_digest_the_writer_records(one_shard: tuple[Path, ShardInfo, list]) -> None:
    import xxhash

    path, info, samples = one_shard
    assert info.xxh3_128 == xxhash.xxh3_128(path.read_bytes()).hexdigest() == file_digest(path, algorithm="xxh3_128")
    assert info.check() == ("xxh3_128", info.xxh3_128)
    assert [s.key for s in iter_shard(path, verify=info)] == [k for k, _, _ in samples]
    _flip_middle_byte(path)
    with pytest.raises(ShardCorruptError, match="xxh3_128 does not match"):
        list(iter_shard(path, verify=info))


def test_a_manifest_entry_without_xxh3_is_verified_by_sha256(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, _ = one_shard
    entry = {k: v for k, v in vars(info).items() if k != "xxh3_128"}  # as manifests before xxh3 was recorded
    old = ShardInfo.from_json(entry)
    assert old.check() == ("sha256", info.sha256)
    assert len(list(iter_shard(path, verify=old))) == 3
    _flip_middle_byte(path)
    with pytest.raises(ShardCorruptError, match="sha256 does not match"):
        list(iter_shard(path, verify=old))


def test_truncated_shard_is_caught_by_sha(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, _ = one_shard
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardCorruptError):
        list(iter_shard(path, info.sha256))


# ---------------------------------------------------------------------------------------------- plain readers


def test_plain_webdataset_reads_the_shard(one_shard: tuple[Path, ShardInfo, list]) -> None:
    import safetensors.torch
    import webdataset as wds

    path, _, samples = one_shard
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert len(got) == len(samples)
    for s, (key, tensors, meta) in zip(got, samples, strict=True):
        assert {"__key__", "json", "latents.safetensors", "cond.safetensors"} <= set(s)
        assert not {k for k in s if not k.startswith("__")} - {"json", "latents.safetensors", "cond.safetensors"}
        assert s["__key__"] == key
        assert json.loads(s["json"]) == meta
        _assert_same_tensors(safetensors.torch.load(s["latents.safetensors"]), tensors["latents"])
        _assert_same_tensors(safetensors.torch.load(s["cond.safetensors"]), tensors["cond"])


def test_shard_keys(tmp_path: Path) -> None:
    writer, samples = _write(tmp_path, 4, max_samples=3)
    assert shard_keys(tmp_path / writer.completed[0].name) == {k for k, _, _ in samples[:3]}
    assert shard_keys(tmp_path / writer.completed[1].name) == {samples[3][0]}


# ---------------------------------------------------------------------------------------------- tensors <-> bytes


def test_tensors_from_bytes_are_views_of_the_buffer() -> None:
    original = {"a": torch.arange(10, dtype=torch.float32), "b": torch.arange(6, dtype=torch.int64).view(2, 3)}
    buf = bytearray(tensors_to_bytes(original))
    views = tensors_from_bytes(buf)
    _assert_same_tensors(views, original)
    start = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for t in views.values():
        assert start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + len(buf)
    # writing through a view changes the buffer: the bytes re-parse to the new value
    views["b"][1, 2] = 12345
    assert tensors_from_bytes(buf)["b"][1, 2].item() == 12345
    # and changing the buffer changes the view
    offset = views["a"].data_ptr() - start
    buf[offset : offset + 4] = torch.tensor([99.5], dtype=torch.float32).view(torch.uint8).numpy().tobytes()
    assert views["a"][0].item() == 99.5


def test_tensors_from_bytes_matches_safetensors() -> None:
    import safetensors.torch

    original = {"x": torch.randn(3, 5).to(torch.bfloat16), "m": torch.tensor([True, False]),
                "h": torch.randn(4).half(), "i": torch.tensor([1, -2], dtype=torch.int32)}
    blob = tensors_to_bytes(original)
    _assert_same_tensors(tensors_from_bytes(bytearray(blob)), safetensors.torch.load(blob))
    _assert_same_tensors(tensors_from_bytes(bytearray(blob)), original)


def test_tensors_to_bytes_makes_contiguous_copies() -> None:
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()  # not contiguous
    back = tensors_from_bytes(bytearray(tensors_to_bytes({"t": t})))["t"]
    assert back.shape == (4, 3) and back.equal(t)


# ---------------------------------------------------------------------------------------------- sample keys


def test_sample_key_is_stable() -> None:
    parts = {"source": "videos/a.mp4", "bucket": [9, 32, 32], "encoder": {"vae": "x", "text": "y"}, "stride": 1}
    key = sample_key(parts)
    assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)
    assert sample_key(dict(reversed(list(parts.items())))) == key  # key order does not matter
    assert sample_key(json.loads(json.dumps(parts))) == key
    assert sample_key({**parts, "encoder": {"text": "y", "vae": "x"}}) == key
    # a pinned value: the key must not change between versions or reruns could not reuse shards
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    assert key == hashlib.sha256(blob).hexdigest()[:32]


@pytest.mark.parametrize("change", [
    {"source": "videos/b.mp4"}, {"bucket": [9, 32, 48]}, {"encoder": {"vae": "x", "text": "z"}}, {"stride": 2},
    {"extra": None},
])
def test_sample_key_changes_with_any_part(change: dict) -> None:
    parts = {"source": "videos/a.mp4", "bucket": [9, 32, 32], "encoder": {"vae": "x", "text": "y"}, "stride": 1}
    assert sample_key({**parts, **change}) != sample_key(parts)


def test_bucket_name() -> None:
    assert bucket_name(49, 480, 720) == "49x480x720"


# ---------------------------------------------------------------------------------------------- manifest


def _manifest(shards: list[ShardInfo]) -> Manifest:
    return Manifest(model_family="toy", encoders={"vae": "toy-vae", "text": "toy-t5"}, encoder_fingerprint="abc123",
                    encoding={"frame_sampling": "head", "stride": 1}, shapes={"latents": {"mean": [4, 3, 4, 4]}},
                    shards=shards,
                    inputs={"rejected": {"files": ["rejected.jsonl"], "count": 1, "kinds": {"not-media": 1}}})


def test_manifest_round_trip(tmp_path: Path) -> None:
    writer, _ = _write(tmp_path, 5, max_samples=2)
    m = _manifest(list(writer.completed))
    path = m.save(tmp_path)
    assert path == tmp_path / MANIFEST_NAME
    assert not list(tmp_path.glob("*.json.tmp"))
    assert m.updated  # stamped on save
    loaded = load_manifest(tmp_path)
    assert loaded == m
    assert all(isinstance(s, ShardInfo) for s in loaded.shards)
    assert loaded.schema_version == SCHEMA_VERSION
    assert loaded.num_samples == 5
    assert loaded.num_bytes == sum((tmp_path / s.name).stat().st_size for s in loaded.shards)
    assert loaded.bucket_histogram() == {"17x32x48": 1, "1x32x32": 1, "9x32x32": 3}
    assert list(loaded.bucket_histogram()) == sorted(loaded.bucket_histogram())


def test_rejects_live_in_their_own_file_and_older_manifests_keep_theirs_inline(tmp_path: Path) -> None:
    record = {"path": "videos/bad.mp4", "reason": "not a readable video", "kind": "not-media"}
    _manifest([]).save(tmp_path)
    (tmp_path / "rejected.jsonl").write_text(json.dumps(record) + "\n")
    loaded = load_manifest(tmp_path)
    assert "videos/bad.mp4" not in (tmp_path / MANIFEST_NAME).read_text()
    assert loaded.rejected == [record] and loaded.input_count("rejected") == 1 and loaded.warnings == []
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    del data["inputs"]
    data["rejected"] = [record]  # as ft wrote it before rejected.jsonl
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    (tmp_path / "rejected.jsonl").unlink()
    old = load_manifest(tmp_path)
    assert old.rejected == [record] and old.input_count("rejected") == 1


def test_manifest_ignores_unknown_keys(tmp_path: Path) -> None:
    _manifest([]).save(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    data["from_the_future"] = 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert load_manifest(tmp_path).model_family == "toy"


def test_manifest_ignores_unknown_keys_of_a_shard_entry(tmp_path: Path) -> None:
    writer, _ = _write(tmp_path, 1)
    _manifest(list(writer.completed)).save(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    data["shards"][0]["digest_of_the_future"] = "x"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert load_manifest(tmp_path).shards == writer.completed


def test_manifest_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such shard folder"):
        load_manifest(tmp_path / "nowhere")


def test_manifest_load_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"has no {MANIFEST_NAME}"):
        load_manifest(tmp_path)


def test_manifest_load_wrong_schema(tmp_path: Path) -> None:
    _manifest([]).save(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"schema version {SCHEMA_VERSION + 1}"):
        load_manifest(tmp_path)
    del data["schema_version"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(UserError, match="schema version None"):
        load_manifest(tmp_path)


def test_manifest_load_bad_json(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_open_shard_set(tmp_path: Path) -> None:
    writer, _ = _write(tmp_path, 5, max_samples=2)
    _manifest(list(writer.completed)).save(tmp_path)
    manifest, paths = open_shard_set(tmp_path)
    assert paths == [tmp_path / s.name for s in writer.completed]
    assert manifest.num_samples == 5
    (tmp_path / writer.completed[1].name).unlink()
    with pytest.raises(UserError) as e:
        open_shard_set(tmp_path)
    assert writer.completed[1].name in str(e.value) and "1 shard(s)" in str(e.value)


def test_open_shard_set_without_shards(tmp_path: Path) -> None:
    _manifest([]).save(tmp_path)
    with pytest.raises(UserError, match="holds no samples"):
        open_shard_set(tmp_path)


# ---------------------------------------------------------------------------------------------- index files


def test_the_index_file_says_what_the_tar_headers_say(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, samples = one_shard
    rows = read_index_file(path, info)
    assert rows is not None and rows == [r._replace(begin=rows[i].begin, end=rows[i].end)
                                         for i, r in enumerate(rows_from_headers(path))]
    assert [r.key for r in rows] == [k for k, _, _ in samples]
    assert [r.bucket for r in rows] == [bucket_name(*m["bucket"]) for _, _, m in samples]
    data = path.read_bytes()
    for row in rows:  # each span holds exactly the sample's three members, its JSON last
        span = data[row.begin:row.end]
        assert span[:100].rstrip(b"\0").decode() == f"{row.key}.latents.safetensors"
        assert f"{row.key}.json".encode() in span and f"{row.key}.cond".encode() in span
    assert rows[-1].end <= info.bytes and rows[0].begin == 0


def test_a_stale_or_damaged_index_is_ignored_for_the_tar_headers(one_shard: tuple[Path, ShardInfo, list]) -> None:
    path, info, samples = one_shard
    other = ShardInfo(info.name, info.samples, info.bytes, "0" * 64, info.buckets, info.xxh3_128)
    assert read_index_file(path, other) is None  # written for other bytes
    index_path(path).write_text("not json\n")
    assert read_index_file(path, info) is None
    assert [r.key for r in shard_rows(path, info)] == [k for k, _, _ in samples]  # from the headers
    index_path(path).unlink()
    assert [r.key for r in shard_rows(path, info)] == [k for k, _, _ in samples]

"""The up-front plan in columns (precompute/plan_table.py, planning.JobPlan.up_front): duplicates found by sorting
16-byte digests, the keys held as sorted runs, and a rerun planned a few items at a time that finds, records and
writes what one planned in a single chunk does."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from ft.common.errors import UserError
from ft.common.shards import load_manifest
from ft.precompute.job_items import JobItems
from ft.precompute.plan_table import KeySet, PlanColumns, as_keys, first_rows, hex_keys, sort_keys
from ft.precompute.planning import JobPlan
from ft.precompute.policy import RecordList, Rejected
from ft.precompute.rejects import summarize_inputs
from helpers import BUCKETS, FP32, run_cli, shard_tensors


def _keys(n: int, seed: int = 0) -> np.ndarray:
    return as_keys(np.random.default_rng(seed).bytes(16 * n)[i * 16: i * 16 + 16] for i in range(n))


def test_first_rows_names_the_lowest_row_of_each_repeated_key():
    keys = _keys(50)
    repeated = np.concatenate([keys, keys[[3, 7, 3]]])
    rows = np.arange(len(repeated)) * 2  # rows need not be positions
    firsts = first_rows(repeated, rows)
    assert firsts[:50].tolist() == rows[:50].tolist()
    assert firsts[50:].tolist() == [6, 14, 6]
    # two keys sharing their first 8 bytes are told apart by the last 8
    twin = as_keys([keys[0].tobytes()[:8] + bytes(8), keys[0].tobytes()[:8] + b"\1" * 8, keys[0].tobytes()[:8] +
                    bytes(8)])
    assert first_rows(twin, np.arange(3)).tolist() == [0, 1, 0]


def test_keys_sort_as_their_bytes_and_print_as_hex():
    keys = _keys(200, seed=1)
    ordered = keys[sort_keys(keys)]
    assert [k.tobytes() for k in ordered] == sorted(k.tobytes() for k in keys)
    assert hex_keys(keys[:2]) == [keys[0].tobytes().hex(), keys[1].tobytes().hex()]


def test_a_keyset_added_in_batches_answers_as_a_set_does():
    keys = _keys(1000, seed=2)
    held = KeySet()
    for start in range(0, 700, 64):
        held.add(keys[start: min(start + 64, 700)])
    held.add(keys[:10])  # again: held once
    assert len(held) == 700 and len(held.runs) <= 5
    assert held.mask(keys).tolist() == [True] * 700 + [False] * 300
    assert keys[5].tobytes() in held and keys[900].tobytes() not in held
    near = as_keys([keys[0].tobytes()[:8] + bytes(8)])  # shares the first 8 bytes with a held key only
    assert not held.mask(near).any()


def test_plan_columns_count_samples_per_bucket():
    class Sample:
        def __init__(self, key: bytes, bucket: tuple[int, int, int]):
            self.key_bytes = self.video_key_bytes = self.text_key_bytes = key
            self.image_key_bytes, self.bucket = b"", bucket

    columns = PlanColumns(8)
    keys = [k.tobytes() for k in _keys(5, seed=3)]
    columns.add([0, 2], [Sample(keys[0], (9, 32, 32)), Sample(keys[1], (1, 32, 32))])
    columns.add([5, 6, 9], [Sample(k, (9, 32, 32)) for k in keys[2:]])
    table = columns.table()
    assert table.rows.tolist() == [0, 2, 5, 6, 9] and hex_keys(table.key) == [k.hex() for k in keys]
    assert table.image_key.tobytes() == bytes(16 * 5)
    assert table.counts() == {"1x32x32": 1, "9x32x32": 4}
    assert table.counts(np.array([False, True, False, False, True])) == {"1x32x32": 1, "9x32x32": 1}
    assert len(table.select(table.rows > 4)) == 3


def _records(out, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_a_rerun_planned_a_few_items_at_a_time_finds_and_writes_what_one_chunk_does(tiny_cog, shapes_data, tmp_path,
                                                                                     monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    videos = (data / "videos.txt").read_text().splitlines()
    captions = (data / "prompts.txt").read_text().splitlines()
    first = [f"{v}\n" for v in videos[:4]], [f"{c}\n" for c in captions[:4]]
    shutil.copy(data / videos[1], data / "videos" / "copy.mp4")  # the same bytes under another name
    extra = [(videos[0], captions[0]), ("videos/copy.mp4", captions[1]), ("videos/missing.mp4", "gone"),
             (videos[2], ""), (videos[0], captions[0]), (videos[5], "a second caption")]
    outs = {}
    for chunk in (JobItems.chunk, 3):
        out = tmp_path / f"out-{chunk}"
        (data / "videos.txt").write_text("".join(first[0]))  # a first run of four clips, then the whole table
        (data / "prompts.txt").write_text("".join(first[1]))
        argv = ["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", data, "--out",
                out, *BUCKETS, "--shard-samples", "3"]
        run_cli(argv)
        (data / "videos.txt").write_text("".join(f"{v}\n" for v in videos + [v for v, _ in extra]))
        (data / "prompts.txt").write_text("".join(f"{c}\n" for c in captions + [c for _, c in extra]))
        monkeypatch.setattr(JobItems, "chunk", chunk)
        manifest = run_cli(argv)
        monkeypatch.undo()
        outs[chunk] = (manifest, out)
    (whole, whole_out), (chunked, chunked_out) = outs.values()
    for name in ("rejected.jsonl", "warnings.jsonl"):
        assert _records(chunked_out, name) == _records(whole_out, name)
    warnings = _records(chunked_out, "warnings.jsonl")
    # repeated rows, then long captions, then repeated samples: the order one pass over every item gives
    assert [(os.path.basename(w["path"]), w["kind"]) for w in warnings if "truncated" not in w["kind"]] == [
        (os.path.basename(videos[0]), "duplicate"), (os.path.basename(videos[0]), "duplicate"),
        ("copy.mp4", "duplicate")]
    assert warnings[1]["reason"].startswith("videos.txt/prompts.txt line 15 repeats videos.txt/prompts.txt line 1 ")
    assert f"as {data / videos[1]};" in warnings[-1]["reason"]
    assert [r["kind"] for r in _records(chunked_out, "rejected.jsonl")] == ["empty-caption", "missing"]
    assert chunked.active == whole.active and chunked.active["samples"] == len(videos) + 1
    assert load_manifest(chunked_out).active_keys(chunked_out) == load_manifest(whole_out).active_keys(whole_out)
    # the same samples with the same bytes (in another order: the encode loop batches each chunk's samples)
    assert shard_tensors(chunked_out) == shard_tensors(whole_out)




def test_a_record_list_keeps_its_order_with_most_records_in_a_file(monkeypatch):
    monkeypatch.setattr(RecordList, "KEEP", 3)
    records = RecordList(Rejected(f"clip{i}.mp4", "caption cut", "caption-truncated") for i in range(10))
    records += [Rejected("a.mp4", "gone", "missing")]
    assert len(records) == 11 and records._spilled > 0
    assert records[-1] == Rejected("a.mp4", "gone", "missing") and records[-1:] == [records[-1]]
    reading = iter(records)
    next(reading)
    records.append(Rejected("b.mp4", "gone", "missing"))  # an append while a reading is under way
    assert [r.path for r in records] == [f"clip{i}.mp4" for i in range(10)] + ["a.mp4", "b.mp4"]
    assert summarize_inputs((r.to_dict() for r in records), []).splitlines()[0] == "rejected: 12"


@pytest.mark.parametrize("when", ["survey", "up_front"])
def test_a_dataset_changed_while_a_rerun_reads_it_again_is_refused_not_misread(when, tiny_cog, shapes_data, tmp_path,
                                                                               monkeypatch):
    """A rerun reads a large dataset several times (the survey, the plan, the rows the encode loop plans again);
    a row inserted meanwhile (a pipeline still writing the table) shifts every row after it. That must stop the
    run with one message naming the dataset, not plan one version against another's rows (a crash, rows dropped
    as repeats they are not, good files rejected as changed); run again, the set is the new dataset's."""
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    videos = (data / "videos.txt").read_text().splitlines()
    captions = (data / "prompts.txt").read_text().splitlines()
    out = tmp_path / "out"
    argv = ["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", data, "--out", out,
            *BUCKETS, "--shard-samples", "3"]
    (data / "videos.txt").write_text("".join(f"{v}\n" for v in videos[:4]))
    (data / "prompts.txt").write_text("".join(f"{c}\n" for c in captions[:4]))
    run_cli(argv)
    (data / "videos.txt").write_text("".join(f"{v}\n" for v in videos))
    (data / "prompts.txt").write_text("".join(f"{c}\n" for c in captions))

    def insert_a_row() -> None:  # another writer puts a row at the top of both lists
        (data / "videos.txt").write_text("".join(f"{v}\n" for v in [videos[5], *videos]))
        (data / "prompts.txt").write_text("".join(f"{c}\n" for c in ["an inserted caption", *captions]))

    owner = JobItems if when == "survey" else JobPlan
    real = getattr(owner, when)

    def then_insert(self, *args):
        result = real(self, *args)
        insert_a_row()
        return result

    monkeypatch.setattr(JobItems, "chunk", 3)
    monkeypatch.setattr(owner, when, then_insert)
    with pytest.raises(UserError, match=f"--dataset {data}: .*changed while this run was reading it.*run the same "
                                        "command again"):
        run_cli(argv)
    monkeypatch.setattr(owner, when, real)
    manifest = run_cli(argv)
    assert not [r for r in _records(out, "rejected.jsonl") if r["kind"] == "changed"]
    fresh = tmp_path / "fresh"
    run_cli([*argv[:argv.index("--out") + 1], fresh, *BUCKETS, "--shard-samples", "3"])
    assert manifest.active == load_manifest(fresh).active
    assert load_manifest(out).active_keys(out) == load_manifest(fresh).active_keys(fresh)

"""common/shards/prompts.py, the validation file: finetrainers' formats and columns, a clear error for each bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft.common.errors import UserError
from ft.common.shards.prompts import ValidationPrompt, default_size, read_validation_file, resolve_sizes
from ft.pipelines.registry import get_spec

ROWS = [{"caption": "a red circle", "image_path": None, "video_path": None, "num_inference_steps": 2, "height": 32,
         "width": 64, "num_frames": 9},
        {"caption": "a blue square", "seed": 3, "guidance_scale": 1.5, "frame_rate": 12}]
COG_VAE = {"block_out_channels": [8, 8, 8, 8]}
COG_TRANSFORMER = {"patch_size": 2}


def write(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa

    suffix = path.suffix
    columns = list(dict.fromkeys(k for r in rows for k in r))
    full = [{c: r.get(c) for c in columns} for r in rows]  # pyarrow takes the columns from the first row
    if suffix == ".json":
        path.write_text(json.dumps({"data": rows}))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".csv":
        lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(full), path)
    elif suffix == ".arrow":  # the IPC stream format `datasets` writes; the file format is read too
        table = pa.Table.from_pylist(full)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", ".arrow"])
def test_every_format_reads_the_same_prompts(tmp_path, suffix):
    prompts = read_validation_file(write(tmp_path / f"validation{suffix}", ROWS))
    assert prompts == [
        ValidationPrompt("a red circle", 0, height=32, width=64, num_frames=9, num_inference_steps=2),
        ValidationPrompt("a blue square", 1, seed=3, guidance_scale=1.5, frame_rate=12.0)]


def test_arrow_file_format_and_a_plain_json_list(tmp_path):
    import pyarrow as pa

    table = pa.Table.from_pylist([{"caption": "x"}])
    with pa.OSFile(str(tmp_path / "v.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert [p.caption for p in read_validation_file(tmp_path / "v.arrow")] == ["x"]
    (tmp_path / "v.json").write_text(json.dumps([{"caption": "y", "num_frames": 9.0}]))
    assert read_validation_file(tmp_path / "v.json")[0].num_frames == 9


def test_an_arrow_dataset_file_is_read_by_precompute_readers(tmp_path):
    from ft.precompute.datasets import load_dataset

    write(tmp_path / "metadata.arrow", [{"video": "a.mp4", "caption": "one"}])
    (item,) = load_dataset(tmp_path)
    assert item.path == tmp_path / "a.mp4" and item.caption == "one"


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "x"}], "unknown column.*'prompt'"),
    ([{"num_frames": 9}], "has no 'caption' column"),
    ([{"caption": ""}], "the caption is empty"),
    ([{"caption": "x", "image_path": "cat.png"}], "image_path 'cat.png': no such file .*beside"),
    ([{"caption": "x", "video_path": 3}], "video_path 3 is not a path"),
    ([{"caption": "x", "num_frames": 9.5}], "num_frames 9.5 is not a whole number"),
    ([{"caption": "x", "height": -32}], "height must be above 0"),
    ([{"caption": "x", "guidance_scale": "lots"}], "guidance_scale 'lots' is not a number"),
    ([], "has no rows"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, rows, message):
    path = write(tmp_path / "validation.json", rows)
    with pytest.raises(UserError, match=message) as error:
        read_validation_file(path)
    assert str(path) in str(error.value)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json could not be read as json"):
        read_validation_file(tmp_path / "bad.json")
    with pytest.raises(UserError, match="no such file"):
        read_validation_file(tmp_path / "missing.json")
    with pytest.raises(UserError, match="is a folder; give the validation file itself"):
        read_validation_file(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    with pytest.raises(UserError, match="is .csv, .json, .jsonl, .parquet or .arrow"):
        read_validation_file(tmp_path / "prompts.txt")


def test_sizes_default_to_the_first_video_bucket_and_follow_the_familys_rules(tmp_path):
    spec = get_spec("cogvideox")
    assert default_size([[1, 32, 32], [9, 32, 64]]) == (9, 32, 64)
    prompts = read_validation_file(write(tmp_path / "v.json", ROWS))
    resolved = resolve_sizes(prompts, "v.json", spec, COG_VAE, COG_TRANSFORMER, (9, 32, 32))
    assert [p.size for p in resolved] == [(9, 32, 64), (9, 32, 32)]
    bad = read_validation_file(write(tmp_path / "bad.json", [{"caption": "x", "num_frames": 10}]))
    with pytest.raises(UserError, match=r"bad.json row 1: num_frames 10.*4k\+1 frames"):
        resolve_sizes(bad, tmp_path / "bad.json", spec, COG_VAE, COG_TRANSFORMER, (9, 32, 32))
    cfg = read_validation_file(write(tmp_path / "cfg.json", [{"caption": "x", "true_cfg_scale": 4}]))
    with pytest.raises(UserError, match="true_cfg_scale: CogVideoX's pipeline has no true CFG"):
        resolve_sizes(cfg, "cfg.json", spec, COG_VAE, COG_TRANSFORMER, (9, 32, 32))
    hunyuan = get_spec("hunyuan_video")
    assert resolve_sizes(cfg, "cfg.json", hunyuan, {}, {}, (9, 32, 32))[0].true_cfg_scale == 4.0


def test_an_ltx_row_it_cannot_generate_gets_advice_that_works(tmp_path):
    spec = get_spec("ltx_video")
    parts = spec.tiny_components(0)
    vae, transformer = dict(parts["vae"].config), dict(parts["transformer"].config)
    sized = read_validation_file(write(tmp_path / "sized.json", [{"caption": "x", "height": 32, "width": 48}]))
    with pytest.raises(UserError) as error:  # the default size (32x64) can be generated: leaving it out works
        resolve_sizes(sized, "sized.json", spec, vae, transformer, (9, 32, 64))
    message = str(error.value)
    assert "the nearest it takes: height 32, width 64" in message and "--height" not in message
    assert "or leave them out to generate at 9x32x64" in message
    assert resolve_sizes(read_validation_file(write(tmp_path / "plain.json", [{"caption": "x"}])), "plain.json", spec,
                         vae, transformer, (9, 32, 64))[0].size == (9, 32, 64)
    plain = read_validation_file(write(tmp_path / "plain.json", [{"caption": "x"}]))
    with pytest.raises(UserError) as error:  # the default itself cannot: the row needs a size, not "leave it out"
        resolve_sizes(plain, "plain.json", spec, vae, transformer, (9, 32, 48))
    message = str(error.value)
    assert "leave them out" not in message and "without them the row takes the set's first video bucket, 9x32x48" \
        in message
    fixed = read_validation_file(write(tmp_path / "fixed.json", [{"caption": "x", "height": 32, "width": 64}]))
    assert resolve_sizes(fixed, "fixed.json", spec, vae, transformer, (9, 32, 48))[0].size == (9, 32, 64)


def test_condition_columns_are_found_beside_the_file_and_checked_against_the_run(tmp_path):
    from ft.common.shards.prompts import check_condition_rows
    from ft.pipelines.image import ImageConditioning

    (tmp_path / "first.png").write_bytes(b"png")
    path = write(tmp_path / "validation.json", [{"caption": "x", "image_path": "first.png"}])
    (prompt,) = read_validation_file(path)
    assert prompt.image_path == str((tmp_path / "first.png").resolve())
    i2v = ImageConditioning("channel-concat", ("diffusers", "WanImageToVideoPipeline"))
    flf2v = ImageConditioning("channel-concat", ("diffusers", "WanImageToVideoPipeline"), ("first", "last"))
    check_condition_rows([prompt], path, i2v)
    with pytest.raises(UserError, match="row 1: .*this run is text-to-video"):
        check_condition_rows([prompt], path, None)
    with pytest.raises(UserError, match="row 1: a first-last-frame model also needs the last frame"):
        check_condition_rows([prompt], path, flf2v)
    assert prompt.frame_sources(("first",)) == [(prompt.image_path, "first")]
    (tmp_path / "stills").mkdir()
    path = write(tmp_path / "validation.json", [{"caption": "x", "image_path": "stills"}])
    with pytest.raises(UserError, match="row 1: image_path 'stills' is a folder .*give the file itself"):
        read_validation_file(path)

"""Every dataset layout reads into the same `DatasetItem` list; bad layouts raise a `UserError` naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from ft.cli.synthetic import LAYOUTS, make_shapes_dataset
from ft.common.errors import UserError
from ft.common.tables import read_table
from ft.precompute.datasets import DatasetItem, iter_dataset, load_dataset

NUM_CLIPS, NUM_IMAGES = 3, 1


def _make(folder: Path, layout: str) -> Path:
    return make_shapes_dataset(folder, num_clips=NUM_CLIPS, frames=5, layout=layout, num_images=NUM_IMAGES, seed=3)


def _relative(items: list[DatasetItem], root: Path) -> list[tuple[str, str]]:
    return [(item.path.relative_to(root).as_posix(), item.caption) for item in items]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """What every layout must give: the (relative path, caption) pairs as the generator wrote them."""
    root = _make(tmp_path_factory.mktemp("ref"), "list")
    paths = (root / "videos.txt").read_text().splitlines()
    captions = (root / "prompts.txt").read_text().splitlines()
    return list(zip(paths, captions, strict=True))


def test_reference_dataset_has_clips_and_an_image(reference: list[tuple[str, str]]) -> None:
    assert len(reference) == NUM_CLIPS + NUM_IMAGES
    assert [p.rsplit(".", 1)[1] for p, _ in reference] == ["mp4"] * NUM_CLIPS + ["png"] * NUM_IMAGES
    assert all(c.startswith("a ") and c.endswith("on a dark background") for _, c in reference)
    assert all(" moving " in c for _, c in reference[:NUM_CLIPS])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_items(tmp_path: Path, layout: str, reference: list[tuple[str, str]]) -> None:
    root = _make(tmp_path / "data", layout)
    items = load_dataset(root)
    assert all(isinstance(i, DatasetItem) for i in items)
    assert _relative(items, root) == reference
    assert all(i.path.is_file() for i in items)
    # str and Path are both accepted
    assert load_dataset(str(root)) == items


@pytest.mark.parametrize("layout", ["csv", "jsonl", "json", "parquet"])
def test_metadata_file_itself_as_dataset(tmp_path: Path, layout: str, reference: list[tuple[str, str]]) -> None:
    root = _make(tmp_path / "data", layout)
    table = root / f"metadata.{layout}"
    assert table.is_file()
    items = load_dataset(table)
    assert items == load_dataset(root)
    assert _relative(items, root) == reference


def test_table_paths_are_relative_to_the_table_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    table = tmp_path / "sub" / "any_name.jsonl"
    table.write_text(json.dumps({"path": "a/b.mp4", "text": "  hello  "}) + "\n")
    assert load_dataset(table) == [DatasetItem(tmp_path / "sub" / "a" / "b.mp4", "hello")]


def test_dataset_file_of_unsupported_type(tmp_path: Path) -> None:
    f = tmp_path / "clips.txt"
    f.write_text("a.mp4\n")
    with pytest.raises(UserError, match="clips.txt"):
        load_dataset(f)


def _write_clip_desc_csv(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"clip": "v/one.mp4", "desc": "first clip"}, {"clip": "v/two.mp4", "desc": "second clip"}]
    pacsv.write_csv(pa.Table.from_pylist(rows), root / "metadata.csv")
    return root / "metadata.csv"


def test_explicit_column_names(tmp_path: Path) -> None:
    table = _write_clip_desc_csv(tmp_path / "data")
    expected = [DatasetItem(tmp_path / "data" / "v" / "one.mp4", "first clip"),
                DatasetItem(tmp_path / "data" / "v" / "two.mp4", "second clip")]
    assert load_dataset(tmp_path / "data", video_column="clip", caption_column="desc") == expected
    assert load_dataset(table, video_column="clip", caption_column="desc") == expected


def test_unrecognised_columns_are_listed(tmp_path: Path) -> None:
    _write_clip_desc_csv(tmp_path / "data")
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path / "data")
    msg = str(e.value)
    assert "metadata.csv" in msg and "clip" in msg and "desc" in msg and "--video-column" in msg


def test_no_caption_column_lists_columns(tmp_path: Path) -> None:
    rows = [{"video": "a.mp4", "label": "x", "score": 1}]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "metadata.json" in msg and "video, label, score" in msg and "--caption-column" in msg


def test_explicit_column_that_is_absent(tmp_path: Path) -> None:
    _write_clip_desc_csv(tmp_path / "data")
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path / "data", video_column="clip", caption_column="caption")
    msg = str(e.value)
    assert "metadata.csv" in msg and "'caption'" in msg and "clip, desc" in msg


def test_list_layout_with_other_txt_names(tmp_path: Path) -> None:
    (tmp_path / "files.txt").write_text("a.mp4\nb.png\n")
    (tmp_path / "captions.txt").write_text("cap a\n\ncap b\n")  # blank lines are skipped
    items = load_dataset(tmp_path, video_column="files.txt", caption_column="captions.txt")
    assert items == [DatasetItem(tmp_path / "a.mp4", "cap a"), DatasetItem(tmp_path / "b.png", "cap b")]


def test_json_wrapped_in_a_single_key_object(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text(json.dumps({"data": [{"file_name": "x.mp4", "prompt": "p"}]}))
    assert load_dataset(tmp_path) == [DatasetItem(tmp_path / "x.mp4", "p")]


def test_column_names_match_case_insensitively(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"Video": "x.mp4", "Caption": "c"}) + "\n")
    assert load_dataset(tmp_path) == [DatasetItem(tmp_path / "x.mp4", "c")]


def test_read_table_rows(tmp_path: Path) -> None:
    table = _write_clip_desc_csv(tmp_path)
    assert read_table(table) == [{"clip": "v/one.mp4", "desc": "first clip"},
                                 {"clip": "v/two.mp4", "desc": "second clip"}]


# ---------------------------------------------------------------------------------------------- errors


def test_missing_dataset_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="nope"):
        load_dataset(missing)


def test_videos_txt_without_prompts_txt(tmp_path: Path) -> None:
    (tmp_path / "videos.txt").write_text("a.mp4\n")
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path)
    assert "videos.txt" in str(e.value) and "prompts.txt" in str(e.value)


def test_prompts_txt_without_videos_txt(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("a caption\n")
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path)
    assert "videos.txt" in str(e.value) and "prompts.txt" in str(e.value)


def test_line_count_mismatch(tmp_path: Path) -> None:
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\nc.mp4\n")
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "videos.txt has 3 lines" in msg and "prompts.txt has 2" in msg


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        load_dataset(tmp_path / "empty")


def test_folder_of_uncaptioned_media_finds_no_dataset(tmp_path: Path) -> None:
    root = _make(tmp_path / "data", "sidecar")
    for caption in root.rglob("*.txt"):
        caption.unlink()
    with pytest.raises(UserError, match="found no dataset"):
        load_dataset(root)


def test_sidecar_media_without_caption(tmp_path: Path) -> None:
    root = _make(tmp_path / "data", "sidecar")
    (root / "videos" / "clip_001.txt").unlink()
    with pytest.raises(UserError) as e:
        load_dataset(root)
    msg = str(e.value)
    assert "clip_001.mp4" in msg and "clip_001.txt" in msg and "1 media files" in msg


def test_table_with_no_rows(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(UserError, match="metadata.jsonl has no rows"):
        load_dataset(tmp_path)


def test_table_row_with_empty_path_is_an_item_with_a_problem_not_an_abort(tmp_path: Path) -> None:
    rows = [{"video": "a.mp4", "caption": "ok"}, {"video": "", "caption": "no path"}, {"video": None, "caption": "x"}]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    good, empty, none = load_dataset(tmp_path)
    assert good == DatasetItem(tmp_path / "a.mp4", "ok") and not good.problem
    assert empty.problem == "metadata.json row 2 has an empty 'video' cell" and empty.problem_kind == "empty-cell"
    assert none.problem.startswith("metadata.json row 3") and none.path == tmp_path / "metadata.json"


def test_unparseable_table(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(UserError, match="metadata.json could not be read"):
        load_dataset(tmp_path)


def test_json_that_is_not_a_list(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(UserError, match="list of objects"):
        load_dataset(tmp_path)


def test_csv_with_quoted_commas_and_excel_bom(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_bytes(
        b'\xef\xbb\xbfvideo,caption\na.mp4,"a cat, then a dog"\nb.mp4,"she said ""hi"""\n')
    assert load_dataset(tmp_path) == [DatasetItem(tmp_path / "a.mp4", "a cat, then a dog"),
                                      DatasetItem(tmp_path / "b.mp4", 'she said "hi"')]


def test_csv_captions_are_kept_as_written(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("video,caption\na.mp4,007\nb.mp4,1984\n")
    assert [i.caption for i in load_dataset(tmp_path)] == ["007", "1984"]


@pytest.mark.parametrize(("media", "captions"), [("video.txt", "prompt.txt"), ("images.txt", "captions.txt"),
                                                 ("videos.txt", "caption.txt")])
def test_finetrainers_list_file_names(tmp_path: Path, media: str, captions: str) -> None:
    (tmp_path / media).write_text("a.mp4\nb.mp4\n")
    (tmp_path / captions).write_text("one\ntwo\n")
    items = load_dataset(tmp_path)
    assert [(i.path.name, i.caption) for i in items] == [("a.mp4", "one"), ("b.mp4", "two")]


def test_two_caption_lists_are_an_error_naming_both(tmp_path: Path) -> None:
    (tmp_path / "videos.txt").write_text("a.mp4\n")
    (tmp_path / "prompt.txt").write_text("one\n")
    (tmp_path / "captions.txt").write_text("one\n")
    with pytest.raises(UserError, match="prompt.txt and captions.txt: more than one caption list"):
        load_dataset(tmp_path)


def test_a_folder_of_webdataset_tars_is_read_as_finetrainers_reads_it(tmp_path: Path) -> None:
    import io
    import tarfile

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "part-0.tar", "w") as tar:
        add(tar, "clip1.mp4", b"video bytes 1")
        add(tar, "clip1.long_caption", b"a long one")
        add(tar, "clip1.caption", b"b'a cat'")
        add(tar, "clip2.mp4", b"video bytes 2")
        add(tar, "clip2.txt", b"a dog\n")
        add(tar, "clip3.json", b"{}")  # no media: skipped, as finetrainers skips it
    items = load_dataset(tmp_path / "data")
    assert [(i.path.name, i.caption) for i in items] == [("clip1.mp4", "a cat"), ("clip2.mp4", "a dog")]
    assert items[0].path.read_bytes() == b"video bytes 1"
    # a sample without the caption column is one bad item, not a failed run
    only = load_dataset(tmp_path / "data", caption_column="long_caption")
    assert only[0].caption == "a long one" and only[0].extracted
    assert "sample 'clip2' has no caption column; ft looks for long_caption" in only[1].problem


def test_a_webdataset_tar_cannot_write_outside_and_bad_captions_are_items(tmp_path):
    import io
    import tarfile

    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "evil.tar", "w") as tar:
        for name, data in [("../../escaped.mp4", b"x"), ("../../escaped.txt", b"a cat"), ("/tmp/abs.mp4", b"x"),
                           ("/tmp/abs.txt", b"a dog"), ("latin.mp4", b"x"), ("latin.txt", b"caf\xe9")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = load_dataset(tmp_path / "data")
    assert not (tmp_path / "escaped.mp4").exists() and not list(tmp_path.parent.glob("escaped.mp4"))
    kinds = sorted(i.problem_kind for i in items)
    assert kinds == ["caption-not-utf8", "outside-dataset", "outside-dataset"], [i.problem for i in items]


def test_metadata_rows_of_the_wrong_shape_or_type_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('\ufeff{"file_name": "x.mp4", "caption": "a cat"}\n'
                                      '{"file_name": "y.mp4", "caption": ["a", "list"]}\n')
    items = load_dataset(tmp_path / "a.jsonl")  # a BOM is fine
    assert items[0].caption == "a cat" and not items[0].problem
    assert "'caption' cell is list" in items[1].problem
    (tmp_path / "b.jsonl").write_text('{"file_name": "x.mp4", "caption": "a"}\n"not an object"\n')
    with pytest.raises(UserError, match="row 2 is str"):
        load_dataset(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"file_name": "x.mp4", "caption": "a"}\n{"broken\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        load_dataset(tmp_path / "c.jsonl")


def test_an_id_token_does_not_hide_an_empty_caption():
    from ft.precompute.dataset_config import apply_caption_options

    items = apply_caption_options([DatasetItem(Path("a.mp4"), ""), DatasetItem(Path("b.mp4"), "a dog")], "sks", False)
    assert [i.caption for i in items] == ["", "sks a dog"]


def test_ft_shards_inside_the_dataset_folder_are_not_a_webdataset(tmp_path):
    data = make_shapes_dataset(tmp_path / "data", num_clips=2, frames=5, sizes=((32, 32),), layout="sidecar",
                               seed=0)
    (data / "shards").mkdir()
    (data / "shards" / "manifest.json").write_text("{}")
    (data / "shards" / "shard-000000.tar").write_bytes(b"")
    assert len(load_dataset(data)) == 2  # the sidecar layout, not "its tars hold no samples"


def _chunked(dataset: Path, chunk: int, streamed: bool = True) -> list[DatasetItem]:
    """The items of `iter_dataset`, joined; `streamed`: the layout is read in lists of up to `chunk` (the list
    layout and tables; the others come as one list)."""
    parts = list(iter_dataset(dataset, chunk=chunk))
    assert all(0 < len(part) <= chunk for part in parts) if streamed else len(parts) == 1
    return [item for part in parts for item in part]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_items_a_chunk_at_a_time(tmp_path: Path, layout: str) -> None:
    root = _make(tmp_path / "data", layout)
    items = load_dataset(root)
    for chunk in (1, 3, 100):
        assert _chunked(root, chunk, layout != "sidecar") == items
        assert [i.source for i in _chunked(root, chunk, layout != "sidecar")] == [i.source for i in items]


def test_bad_rows_and_an_arrow_table_give_the_same_items_a_chunk_at_a_time(tmp_path: Path) -> None:
    rows = [{"file_name": "x.mp4", "caption": "a cat"}, {"file_name": "", "caption": "no path"},
            {"file_name": "y.mp4", "caption": None}, {"file_name": "z.mp4", "caption": " a dog "}]
    with pa.ipc.new_file(str(tmp_path / "metadata.arrow"), pa.Table.from_pylist(rows).schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows), max_chunksize=3)
    items = load_dataset(tmp_path / "metadata.arrow")
    assert [i.source for i in items] == [f"metadata.arrow row {n}" for n in range(1, 5)]
    assert "row 2 has an empty 'file_name' cell" in items[1].problem
    for chunk in (1, 2, 5):
        assert _chunked(tmp_path / "metadata.arrow", chunk) == items
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "videos.txt").write_bytes(b"a.mp4\r\n\nc\xff.mp4\n\nd.mp4\n\n")
    (lists / "prompts.txt").write_bytes(b"one\n\nthree\nno path\ncaf\xe9\n")
    items = load_dataset(lists)
    assert [i.problem_kind for i in items] == ["", "bad-path", "empty-cell", "caption-not-utf8"]
    for chunk in (1, 2, 10):
        assert _chunked(lists, chunk) == items
    (lists / "prompts.txt").write_bytes(b"one\n\nthree\n")  # unequal: paired after the blank lines, read whole
    with pytest.raises(UserError, match="must pair up"):
        _chunked(lists, 2)

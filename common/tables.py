"""Tables users hand ft: a dataset's metadata file (stage 1) and a validation file (both stages) are read by the
one reader here, in csv, json (a list of objects, or an object with a `data` list), jsonl, parquet or arrow (file
or stream format). `iter_table` gives the rows a batch at a time (a table of ten million rows is read in flat
memory; a .json file, one document, is read whole); `read_table` is all of them in one list."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

TABLE_BATCH = 1 << 16  # rows per batch of `iter_table`


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a .csv, .json (a list of objects), .jsonl, .parquet or .arrow table, as dicts."""
    return [row for batch in iter_table(path) for row in batch]


def iter_table(path: Path, batch: int = TABLE_BATCH) -> Iterator[list[Any]]:
    """The rows of `read_table`, in order, up to `batch` at a time; the same errors (a UserError naming the file),
    raised when the reading reaches them."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json", ".jsonl", ".parquet", ".arrow"):
        raise UserError(f"{path}: unsupported table type {suffix!r}; use csv, json, jsonl, parquet or arrow.")
    try:
        yield from _batches(path, suffix, batch)
    except UserError:
        raise
    except Exception as e:  # pyarrow / json / csv parse errors
        raise UserError(f"{path} could not be read as {suffix[1:]}: {e}") from e


def _batches(path: Path, suffix: str, batch: int) -> Iterator[list[Any]]:
    if suffix == ".csv":  # the csv module keeps every value a string: a caption "007" stays "007"
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            yield from _grouped(csv.DictReader(f), batch)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for part in pq.ParquetFile(path).iter_batches(batch_size=batch):
            yield part.to_pylist()
    elif suffix == ".arrow":
        yield from _arrow_batches(path, batch)
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            yield from _grouped(_jsonl_rows(path, f), batch)
    else:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        if isinstance(data, dict):  # {"data": [...]} (finetrainers' field) or a single-list wrapper
            lists = [v for v in data.values() if isinstance(v, list)]
            data = data["data"] if isinstance(data.get("data"), list) else lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise UserError(f"{path}: a JSON dataset must be a list of objects, one per sample.")
        for start in range(0, len(data), batch):
            yield data[start: start + batch]


def _grouped(rows: Any, batch: int) -> Iterator[list[Any]]:
    group = []
    for row in rows:
        group.append(row)
        if len(group) == batch:
            yield group
            group = []
    if group:
        yield group


def _jsonl_rows(path: Path, lines: Any) -> Iterator[Any]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as e:
                raise UserError(f"{path} line {number} is not JSON ({e}); fix or remove that line.") from e


def _arrow_batches(path: Path, batch: int) -> Iterator[list[Any]]:
    """An .arrow file (the file format, else the stream format), its record batches cut to `batch` rows."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            parts: Any = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            parts = pa.ipc.open_stream(source)
        for part in parts:
            for start in range(0, part.num_rows, batch):
                yield part.slice(start, batch).to_pylist()

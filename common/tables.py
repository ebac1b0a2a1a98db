"""Tables users hand ft: a dataset's metadata file (stage 1) and a validation file (both stages) are read by the
one reader here, in csv, json (a list of objects, or an object with a `data` list), jsonl, parquet or arrow (file
or stream format)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .errors import UserError


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a .csv, .json (a list of objects), .jsonl, .parquet or .arrow table, as dicts."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":  # the csv module keeps every value a string: a caption "007" stays "007"
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".arrow":
            import pyarrow as pa

            with pa.memory_map(str(path)) as source:
                try:
                    return pa.ipc.open_file(source).read_all().to_pylist()
                except pa.ArrowInvalid:
                    source.seek(0)
                    return pa.ipc.open_stream(source).read_all().to_pylist()
        if suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise UserError(f"{path} line {number} is not JSON ({e}); fix or remove that line.") from e
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):  # {"data": [...]} (finetrainers' field) or a single-list wrapper
                lists = [v for v in data.values() if isinstance(v, list)]
                data = data["data"] if isinstance(data.get("data"), list) else lists[0] if len(lists) == 1 else None
            if not isinstance(data, list):
                raise UserError(f"{path}: a JSON dataset must be a list of objects, one per sample.")
            return data
    except UserError:
        raise
    except Exception as e:  # pyarrow / json parse errors
        raise UserError(f"{path} could not be read as {suffix[1:]}: {e}") from e
    raise UserError(f"{path}: unsupported table type {suffix!r}; use csv, json, jsonl, parquet or arrow.")

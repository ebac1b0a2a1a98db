"""The data policy: one rule for every bad item, shared by `ft precompute` and `ft check-data`.

A bad item is rejected with a reason and a kind, recorded in the manifest (`rejected`), named in the end-of-run
summary (grouped by kind, the first few of each), and the run goes on (`--on-error skip`, the default); with
`--on-error fail` the first rejection ends the run before anything is encoded. Items kept with a note (a caption
cut at the text length, a duplicate row dropped) are `warnings`, summarized the same way.

Kinds: missing, zero-byte, not-media, truncated, decode-failed (frames failing mid-file), too-short, too-small
(the bucket would enlarge it more than --max-upscale), no-bucket (the model takes no bucket it fits),
caption-not-utf8, empty-caption (unless --allow-empty-captions), empty-cell, outside-dataset (unless
--allow-outside-paths), changed (a file changed after a rerun planned it, before it was encoded); warnings:
caption-truncated, duplicate, caption-unknown-tokens (mostly <unk>), alpha-composited (transparency flattened on
white), variable-frame-rate (fps measured from timestamps).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ft.common.errors import UserError
from ft.precompute.rejects import summarize_inputs

from .datasets import DatasetItem, outside_folder

UNKNOWN_SHARE = 0.5  # a caption with more than this share of unknown tokens is noted


@dataclass(slots=True)
class Rejected:
    """An input that was not used (or, as a warning, used with a note): where it is, why, and its kind (slots: a
    rerun can hold one per item, a caption cut to the text length on each)."""

    path: str
    reason: str
    kind: str = "not-media"

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason, "kind": self.kind}


class RecordList:
    """Records (`Rejected`) in the order they were added, most of them in a temporary file: a rerun whose every
    caption is cut to the text length notes each row, and a million records held as objects cost 170 MB. The
    last few stay in memory; iterating reads the file, then those. Appends, `+=`, `len`, iteration and the last
    records (`records[-1]`, `records[-n:]`) work as on a list."""

    KEEP = 4096  # records held in memory before they go to the file

    def __init__(self, records: Iterable[Rejected] = ()):
        self._file: IO[str] | None = None
        self._spilled = 0
        self._tail: list[Rejected] = []
        self.extend(records)

    def append(self, record: Rejected) -> None:
        self._tail.append(record)
        if len(self._tail) > self.KEEP:
            self._spill()

    def extend(self, records: Iterable[Rejected]) -> None:
        for record in records:
            self.append(record)

    def __iadd__(self, records: Iterable[Rejected]) -> RecordList:
        self.extend(records)
        return self

    def __len__(self) -> int:
        return self._spilled + len(self._tail)

    def __iter__(self) -> Iterator[Rejected]:
        tail = list(self._tail)
        if self._file is not None:  # (an append meanwhile writes at the end: `_spill` seeks there)
            self._file.seek(0)
            for _, line in zip(range(self._spilled), self._file, strict=False):
                yield Rejected(**json.loads(line))
        yield from tail

    def __getitem__(self, at: Any) -> Any:
        """The last records only (`records[-1]`, `records[-1:]`): the ones held in memory."""
        start = at.start if isinstance(at, slice) else at
        assert isinstance(start, int) and -len(self._tail) <= start < 0, at
        return self._tail[at]

    def _spill(self) -> None:
        """Every record but the last to the file (the last stays: `records[-1:]` after an append)."""
        if self._file is None:
            self._file = tempfile.TemporaryFile("w+", encoding="utf-8")
        self._file.seek(0, 2)
        self._file.write("".join(json.dumps(r.to_dict()) + "\n" for r in self._tail[:-1]))
        self._spilled += len(self._tail) - 1
        self._tail = self._tail[-1:]


def screen_item(item: DatasetItem, root: Path, allow_empty_captions: bool, allow_outside_paths: bool
                ) -> Rejected | None:
    """Why an item is rejected without decoding (a problem found while reading, a path outside the dataset
    folder, an empty caption), or None."""
    where = str(item.path)
    if item.problem:
        return Rejected(where, item.problem, item.problem_kind or "empty-cell")
    if not allow_outside_paths and not item.extracted and outside_folder(item.path, root):
        return Rejected(where, f"outside the dataset folder {root} (from {item.source}); move it in, or pass "
                               "--allow-outside-paths", "outside-dataset")
    if not item.caption and not allow_empty_captions:
        return Rejected(where, f"empty caption ({item.source}); write one, or pass --allow-empty-captions",
                        "empty-caption")
    return None


def repeated_row(item: DatasetItem, first_source: str) -> Rejected:
    """The warning for a row with the same file and caption as an earlier one (whose source is `first_source`)."""
    return Rejected(str(item.path), f"{item.source} repeats {first_source} (same file and caption); trained once",
                    "duplicate")


def screen_items(items: list[DatasetItem], root: Path, allow_empty_captions: bool, allow_outside_paths: bool
                 ) -> tuple[list[DatasetItem], list[Rejected], list[Rejected]]:
    """Sort out what needs no decoding: problems found while reading, empty captions, paths outside the dataset
    folder, duplicate rows. Returns (items to plan, rejected, warnings)."""
    keep: list[DatasetItem] = []
    rejected: list[Rejected] = []
    warnings: list[Rejected] = []
    first_seen: dict[tuple[str, str], DatasetItem] = {}
    for item in items:
        problem = screen_item(item, root, allow_empty_captions, allow_outside_paths)
        if problem is not None:
            rejected.append(problem)
            continue
        ident = (str(item.path.absolute()), item.caption)
        if ident in first_seen:
            warnings.append(repeated_row(item, first_seen[ident].source))
            continue
        first_seen[ident] = item
        keep.append(item)
    return keep, rejected, warnings


def long_caption_warnings(paths: list[str], token_counts: list[int], seq_len: int) -> list[Rejected]:
    """Captions longer than the text length: kept and cut to it, one warning each (its reason shared by the
    captions of the same length)."""
    reasons: dict[int, str] = {}
    return [Rejected(path, reasons.get(n) or reasons.setdefault(
                n, f"caption of {n} tokens is cut to --max-sequence-length {seq_len}"), "caption-truncated")
            for path, n in zip(paths, token_counts, strict=True) if n > seq_len]


def unknown_token_warnings(paths: list[str], captions: list[str], stats: list[tuple[int, int, int]],
                           share: float = UNKNOWN_SHARE) -> list[Rejected]:
    """Captions the tokenizer turns mostly into its unknown token (CJK or emoji for T5's vocabulary): kept, one
    warning each with the counts, since the model would learn from `<unk>`s rather than the words. `stats` are
    `ModelSpec.caption_token_stats`: (tokens, unknown tokens, characters they stand for)."""
    out = []
    for path, caption, (_, unknown, chars) in zip(paths, captions, stats, strict=True):
        if not unknown:  # most captions: their characters need no counting
            continue
        visible = sum(1 for c in caption if not c.isspace())
        if chars > share * visible:
            out.append(Rejected(path, f"{chars} of the caption's {visible} characters are unknown to the tokenizer "
                                      f"({unknown} <unk> token{'s' if unknown > 1 else ''}): its vocabulary lacks "
                                      "them (T5's has no CJK or emoji), so the model sees mostly <unk>; translate "
                                      "or rewrite the caption", "caption-unknown-tokens"))
    return out


def enforce_on_error(on_error: str, rejected: list[Rejected] | RecordList, where: str) -> None:
    """With --on-error fail, any rejection ends the run here, with the summary."""
    if on_error == "fail" and rejected:
        summary = summarize_inputs((r.to_dict() for r in rejected), [])
        raise UserError(f"--on-error fail: {len(rejected)} bad input(s) in {where}:\n{summary}\n"
                        "Fix them (see `ft check-data`), or rerun with --on-error skip to leave them out.")

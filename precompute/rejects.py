"""The kinds of bad input the data policy names, and the summary of rejected and noted inputs.

`ft precompute` and `ft check-data` print it at the end of a run; `ft inspect` prints it from a manifest's
`rejected` and `warnings` records ({"path", "reason", "kind"}; records of older manifests have no kind).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

# the order the summary lists kinds in, with a heading for each
KIND_TITLES = {
    "missing": "file not found", "zero-byte": "zero-byte file", "not-media": "not a video or image",
    "truncated": "truncated or damaged file", "decode-failed": "frames failing to decode mid-file",
    "too-short": "too short for every bucket", "too-small": "too small (would be upscaled beyond --max-upscale)",
    "no-bucket": "no bucket the model takes", "caption-not-utf8": "caption file not UTF-8",
    "bad-path": "path line not UTF-8", "empty-caption": "empty caption (--allow-empty-captions keeps them)",
    "empty-cell": "empty cell or blank line for the media path",
    "outside-dataset": "outside the dataset folder (--allow-outside-paths accepts them)",
    "changed": "changed between planning and encoding: run the job again",
    "caption-truncated": "caption longer than the text length: kept, cut to it",
    "duplicate": "duplicate row: dropped, the first kept",
    "caption-unknown-tokens": "caption mostly unknown to the tokenizer (<unk>): kept",
    "alpha-composited": "transparent image: composited on white",
    "variable-frame-rate": "variable frame rate: fps measured from the timestamps",
}


def summarize_inputs(rejected: Iterable[dict[str, Any]], warnings: Iterable[dict[str, Any]], first: int = 3) -> str:
    """The end-of-run summary: counts by kind, with the first few items of each and their reasons. The records are
    read once, keeping only those first few (`ft inspect` of a million notes)."""
    lines = []
    for title, records in (("rejected", rejected), ("kept with a note", warnings)):
        counts: Counter[str] = Counter()
        shown: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            kind = r.get("kind") or "not-media"
            counts[kind] += 1
            if len(shown[kind]) < first:
                shown[kind].append(r)
        if not counts:
            continue
        lines.append(f"{title}: {counts.total()}")
        order = list(KIND_TITLES) + sorted(set(counts) - set(KIND_TITLES))
        for kind in (k for k in order if k in counts):
            lines.append(f"  {counts[kind]:5d}  {KIND_TITLES.get(kind, kind)}")
            for d in shown[kind]:
                lines.append(f"         {d['path']}: {d['reason']}")
            if counts[kind] > first:
                lines.append(f"         ... and {counts[kind] - first} more")
    return "\n".join(lines)

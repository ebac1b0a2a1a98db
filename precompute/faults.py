"""What `ft precompute` says when the disk fills (or turns read-only) while it writes shards.

Shards are written to `<name>.tar.tmp` and renamed when whole, and the manifest is saved after each one, so a
fault mid-run loses only the shard being written: `ShardWriter.discard` removes it (freeing its space), the
manifest saved after the last whole shard stands, and a rerun of the same command encodes only what is missing.
The message names --out and the fault, what was kept, how much more space the rest needs (from the bytes per
sample written so far) against what is free, and the command that goes on.
"""

from __future__ import annotations

import errno
from pathlib import Path

from ft.common.faults import bytes_text, describe, fix, free_bytes
from ft.common.shards import MANIFEST_NAME, ShardInfo


def disk_fault_message(fault: OSError, out: Path, completed: list[ShardInfo], partial: tuple[int, int] | None,
                       to_write: int, resume_command: str) -> str:
    """The one message for a write fault during encoding. `completed`: this run's whole shards; `partial`:
    (bytes, samples) of the shard that was being written and is now removed; `to_write`: the samples this run
    set out to write (rejections taken off)."""
    kept = sum(s.samples for s in completed)
    written = sum(s.bytes for s in completed)
    lines = [f"--out {out}: {describe(fault)}; precompute stopped."]
    lines.append(f"Kept: {kept} new samples in {len(completed)} whole shard(s) ({bytes_text(written)}), listed in "
                 f"{out / MANIFEST_NAME}" + (f"; the shard being written ({partial[1]} samples) was removed"
                                             if partial else "") + ". Nothing else was lost.")
    samples = kept + (partial[1] if partial else 0)
    size = written + (partial[0] if partial else 0)
    left = max(0, to_write - kept)
    if fault.errno in (errno.ENOSPC, errno.EDQUOT) and samples:
        per_sample = size / samples
        free = free_bytes(out)
        lines.append(f"Needed: about {bytes_text(per_sample * left)} more for the {left} samples left "
                     f"({bytes_text(per_sample)} per sample)" + (f"; {bytes_text(free)} is free there" if free
                                                                   is not None else "") + ".")
    elif left:
        lines.append(f"Left: {left} samples.")
    how = f"`{resume_command}`" if resume_command else "the same command"
    lines.append(f"To go on: {fix(fault)}, then run the same command again (or {how}); it encodes only what is "
                 "missing. To move to another disk, copy --out there first, so nothing is encoded twice.")
    return "\n".join(lines)

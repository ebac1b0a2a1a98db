"""Environment faults (a full disk, a read-only or vanished folder, no permission) as one message each.

A fault of the machine is not a bug in ft and not a mistake in the flags, but the user still needs one line that
names the path, says what happened and what to do, and says what was kept. This module gives:
- `check_writable(folder, flag)`: called before work begins (`ft precompute --out`, `ft generate --out`,
  `ft check-data --report`): it writes and removes a one-byte probe file in the folder (or the nearest existing
  parent of one not made yet), so a read-only,
  full or forbidden folder is refused before any model loads or any sample is generated;
- `environment_fault(exc)`: the OSError of an environment fault inside an exception, also when a library wrapped
  it (torch.distributed.checkpoint raises CheckpointException, a BaseException holding each rank's error);
- `describe(err)` and `fault_message(err, what)`: "no space left on the device (...)" with the fix for that errno;
- `bytes_text(n)`: sizes in the messages.
`ft.cli.main.main` turns any fault that reaches it into a UserError-style line (exit status 2); commands that
can say more (what was kept, how to go on) catch it first: precompute keeps its whole shards and says how much
space the rest needs; training stops with its last checkpoint usable and names it.

Tests make real faults: a tmpfs mounted read-only or tiny (`mount -t tmpfs -o size=...`), remounted read-only
between two steps of a run stopped with `FT_TEST_KILL_AT=<point> FT_TEST_KILL_SIGNAL=STOP` (ft.common.shards.
kill_point). No fault is injected by code.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from .errors import UserError

# errno -> what it means for the user, and what to do about it
FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free space there, or use a folder on a larger disk"),
    errno.EDQUOT: ("over the disk quota", "free space within your quota, or use another disk"),
    errno.EROFS: ("on a read-only filesystem", "remount it writable, or use a folder on a writable disk"),
    errno.EACCES: ("not writable: permission denied", "fix its permissions, or use a folder you can write to"),
    errno.EPERM: ("not writable: operation not permitted", "fix its permissions, or use a folder you can write to"),
    errno.ENOENT: ("gone: the folder vanished while ft was writing", "check the disk is mounted, then run again"),
    errno.EIO: ("an I/O error on the device", "check the disk (dmesg), then run again"),
}


def environment_fault(exc: BaseException | None) -> OSError | None:
    """The OSError with a FAULTS errno inside `exc` (itself, its causes, or a DCP CheckpointException's per-rank
    failures), or None when `exc` is not an environment fault."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FAULTS:
            return exc
        failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for failure in failures.values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                found = environment_fault(inner if isinstance(inner, BaseException) else None)
                if found is not None:
                    return found
        exc = exc.__cause__ or exc.__context__
    return None


def describe(err: OSError) -> str:
    """`'<path>: no space left on the device'`, naming the file the system call was on."""
    what = FAULTS.get(err.errno or 0, (err.strerror or str(err), ""))[0]
    return f"{err.filename}: {what}" if err.filename else what


def fix(err: OSError) -> str:
    return FAULTS.get(err.errno or 0, ("", "check the folder, then run again"))[1]


def fault_message(err: OSError, what: str = "") -> str:
    """One line for a fault that reached the command line: what, where, and what to do."""
    lead = f"{what}: " if what else ""
    return f"{lead}{describe(err)}. {fix(err).capitalize()}."


def bytes_text(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the filesystem holding `folder` (None when it cannot be asked)."""
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_writable(folder: str | Path, flag: str, what: str = "") -> Path:
    """Prove `folder` takes a write: a one-byte probe file made and removed there, or in its nearest existing
    parent when it does not exist yet (nothing is left behind). A refusal names the flag, the folder, the fault and
    the fix; `what` says what the folder is for."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".ft-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        with open(probe, "wb") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTDIR):
            raise UserError(f"{flag} {folder}: {existing} is a file, not a folder; pass a folder.") from e
        purpose = f" ({what})" if what else ""
        raise UserError(f"{flag} {folder}{purpose} cannot be written: {describe(e)}. {fix(e).capitalize()}; "
                        "nothing was done yet.") from e
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return folder

"""Whether the writer named in a lock file still runs: read by precompute's locks (precompute/job_slots.py) and by the
jobs' status (journal.py), which tells a job that is running from one that was killed and one that never ran.

A lock file is JSON naming its holder: host, pid, the kernel's start time of that process (so a reused pid is not
taken for the holder) and when it started. A holder on another host cannot be checked from here: it counts as
running. A lock file that is empty or torn is one of two things: its writer is filling it in this instant (it
does so right after creating it), or that writer was killed between creating and filling it. Younger than
`TORN_AFTER_S` it is the first (`read_lock` returns {}: wait), older the second: a holder with no pid, which no
process is, so the lock is stale and is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

TORN_AFTER_S = 10.0  # an empty lock file older than this was left by a writer killed while creating it
TORN = "an empty lock file, left by a writer killed while creating it"


def process_start(pid: int) -> str:
    """The kernel's start time of a process (clock ticks since boot), or "" where /proc cannot say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder may still run: always True for another host (it cannot be checked from here),
    never for a torn lock (no pid: pid 0 would name this process group to os.kill, which always "runs")."""
    if holder.get("torn"):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    recorded = holder.get("process_start", "")
    return not recorded or recorded == process_start(pid)


def describe_holder(holder: dict[str, Any]) -> str:
    if holder.get("torn"):
        return TORN
    return (f"{holder.get('what', 'a writer')} (host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')})")


def read_lock(path: Path) -> dict[str, Any] | None:
    """The holder a lock file names; None when there is no such file; {} while its writer fills it in."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # being written this instant, or torn by a kill just after its creation
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {} if age < TORN_AFTER_S else {"torn": True}
    return data if isinstance(data, dict) else {"torn": True}

"""Logging for ft: plain lines on stderr for people, and quieter third-party libraries.

`log` is the project's logger. `setup_logging()` is called once by the CLI; `quiet_libraries()` silences the
per-file "Loading weights" bars and advisory warnings of transformers/diffusers that would bury our own output;
`quiet_other_ranks()` leaves rank 0 to speak for a multi-process run.
"""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger("ft")


def setup_logging(level: int = logging.INFO) -> None:
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[ft] %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def first_rank() -> bool:
    """Whether this process is rank 0 (or runs alone): notes about the flags, which every rank meets alike, are
    said by it alone (torchrun sets RANK before ft starts; `quiet_other_ranks` comes later, with the trainer)."""
    return os.environ.get("RANK", "0") in ("", "0")


def note(message: str) -> None:
    """A warning about the flags, said once under several processes."""
    if first_rank():
        log.warning(message)


def quiet_other_ranks(rank: int) -> None:
    """Under several processes, a rank other than 0 says only its errors, named as its own: every warning of a
    training run (a flag, a bucket, a resume) is met by all ranks alike, and rank 0 says it once."""
    log.setLevel(logging.ERROR)
    for handler in log.handlers:
        handler.setFormatter(logging.Formatter(f"[ft rank {rank}] %(message)s"))


def quiet_libraries() -> None:
    """Call before loading models. Keeps real errors; drops progress bars and chatter. finetrainers' `--verbose N`
    sets FT_LIBRARY_VERBOSITY (warning, info or debug), which then wins."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    verbosity = os.environ.get("FT_LIBRARY_VERBOSITY")
    if verbosity:
        import diffusers
        import transformers

        for library in (transformers, diffusers):
            library.utils.logging.set_verbosity(getattr(logging, verbosity.upper()))
        return
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated.*")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass

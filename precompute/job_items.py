"""A job's items, read from the dataset a chunk at a time as often as the job needs them (`JobItems`).

The job's items are the dataset's (datasets.iter_dataset), those of its slot when the run has several jobs (by a
hash of each item's path, job_slots.item_identity), with their captions as the caption options make them
(`--id-token`, `--strip-llm-prefixes`). A rerun of ten million rows cannot hold an object per row, so nothing here
keeps them: `chunks` reads the dataset again on each call, and an item is named by its row, its position among the
job's items (the same on every read: the dataset's order). A dataset that is read as one list (a small one, a
folder of WebDataset tars, whose members are extracted on reading) is kept and given again.

`survey` is the first read: how many items, the media outside the dataset folder (every job's: the stamp stats
them, stamp.py), and the rows that repeat an earlier row (the same file and caption: the data policy keeps the
first), found by sorting a 16-byte digest per row (plan_table.first_rows).

Each read must see the dataset the survey saw, or rows would name other items than planned (a row inserted at the
top shifts every row after it). So the files read a chunk at a time (datasets.row_files) are stat'ed when the
first read begins and again after each chunk read: a change stops the run with a UserError (what is encoded is
kept; running again plans the dataset as it now is).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ft.common.errors import UserError

from .config import PrecomputeConfig
from .dataset_config import apply_caption_options
from .datasets import DatasetItem, dataset_root, iter_dataset, row_files
from .job_slots import JobSlot, item_identity
from .plan_table import as_keys, first_rows, row_digest
from .policy import screen_item


@dataclass
class Survey:
    """What the first read of a job's items found."""

    count: int = 0  # the job's items
    total: int = 0  # the dataset's items, every job's
    outside: list[str] = field(default_factory=list)  # media outside the dataset folder (absolute, sorted)
    repeats: dict[int, int] = field(default_factory=dict)  # row -> the earlier row it repeats (file and caption)
    paths: set[str] | None = None  # the job's media paths (absolute), for its media cache; None: one job reads all


class JobItems:
    """The items of `slot`'s job in `cfg.dataset`, a list at a time (`chunks`), each list with its first row."""

    chunk = 1 << 11  # items read and planned at once: their objects (1.2 KB an item) are what planning holds

    def __init__(self, cfg: PrecomputeConfig, slot: JobSlot):
        self.cfg, self.slot = cfg, slot
        self.root = dataset_root(cfg.dataset)
        self._whole: list[DatasetItem] | None = None  # a dataset read as one list, kept
        self._stat: list[tuple[str, int, int, int]] | None = None  # the row files as the first read found them

    def _row_files_stat(self) -> list[tuple[str, int, int, int]]:
        cfg, found = self.cfg, []
        for path in row_files(cfg.dataset, cfg.video_column, cfg.caption_column):
            st = os.stat(path)
            found.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        return found

    def _unchanged(self) -> None:
        """Refuse to go on when the row files changed since the first read began (see the module's docstring)."""
        if self._row_files_stat() != self._stat:
            raise UserError(f"--dataset {self.cfg.dataset}: its rows changed while this run was reading it (ft "
                            "reads a large dataset more than once, and a row added, removed or edited meanwhile "
                            "would shift the rows it planned). Wait until nothing writes it, then run the same "
                            "command again: what is encoded is kept.")

    def _own(self, items: list[DatasetItem]) -> list[DatasetItem]:
        if self.slot.num_jobs > 1:
            items = [it for it in items if self.slot.owns(item_identity(it, self.root))]
        return apply_caption_options(items, self.cfg.id_token, self.cfg.strip_llm_prefixes)

    def _dataset(self) -> Iterator[list[DatasetItem]]:
        """The dataset's lists (every job's items), the kept list when the dataset is one."""
        if self._whole is not None:
            yield self._whole
            return
        cfg = self.cfg
        if self._stat is None:
            self._stat = self._row_files_stat()
        parts = iter_dataset(cfg.dataset, cfg.video_column, cfg.caption_column, self.chunk)
        first = next(parts, None)
        second = next(parts, None)
        if first is not None and second is None:
            self._whole = first
            yield first
            return
        self._unchanged()
        for part in (first, second):
            if part is not None:
                yield part
        for part in parts:
            self._unchanged()
            yield part

    def chunks(self) -> Iterator[tuple[int, list[DatasetItem]]]:
        """(the row of its first item, the items) for each list of the job's items, in the dataset's order."""
        row = 0
        for part in self._dataset():
            own = self._own(part)
            if own:
                yield row, own
                row += len(own)

    def all(self) -> list[DatasetItem]:
        """Every item of the job in one list (a first run plans them as it encodes: planning.JobPlan.stream)."""
        return [item for _, items in self.chunks() for item in items]

    def rows(self, wanted: set[int]) -> dict[int, DatasetItem]:
        """The items at the `wanted` rows (a read of the dataset; few are wanted: the firsts of duplicates)."""
        found = {}
        for start, items in self.chunks():
            for row in wanted & set(range(start, start + len(items))):
                found[row] = items[row - start]
        return found

    def survey(self) -> Survey:
        """The first read (see the module's docstring)."""
        cfg = self.cfg
        root = os.path.abspath(self.root)
        found = Survey(paths=set() if self.slot.num_jobs > 1 else None)
        outside: set[str] = set()
        digests: list[np.ndarray] = []  # a chunk's rows to check for repeats, and their digests
        rows: list[np.ndarray] = []
        for part in self._dataset():
            found.total += len(part)
            # media outside the dataset folder, every job's: each job's stamp stats them all, so a change to any
            # of them makes every job plan again (a job stopping on its stamp while another replans would leave
            # the set unmerged)
            outside.update(path for it in part if not it.extracted
                           and not (path := os.path.abspath(it.path)).startswith(root + os.sep))
            own = self._own(part)
            if found.paths is not None:
                found.paths.update(str(it.path.absolute()) for it in own)
            kept = [i for i, it in enumerate(own)
                    if screen_item(it, self.root, cfg.allow_empty_captions, cfg.allow_outside_paths) is None]
            digests.append(as_keys(row_digest(str(own[i].path.absolute()), own[i].caption) for i in kept))
            rows.append(np.asarray(kept, dtype=np.int64) + found.count)
            found.count += len(own)
        found.outside = sorted(outside)
        if digests:
            row_array = np.concatenate(rows)
            firsts = first_rows(np.concatenate(digests), row_array)
            repeated = np.flatnonzero(firsts != row_array)
            found.repeats = {int(row_array[i]): int(firsts[i]) for i in repeated}
        return found

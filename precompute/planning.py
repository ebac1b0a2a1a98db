"""The planning pipeline: a dataset's items screened, planned, checked as a whole and keyed, for a job or a preflight.

This file is the pipeline; the plan of one item (probe, bucket, frames, keys) is planned_sample.py. The run's
settings are checked against the model first (`check_buckets`, `sequence_length`). Then `screen` takes what
needs no decoding (problems found while reading, empty captions, paths outside the dataset folder, duplicate
rows: policy.py), `planner` plans each remaining item in threads (planned_sample.plan_item), and `finish_check`
checks the plan as a whole (the decoders' notes; with a tokenizer, captions longer than the text length or mostly
unknown tokens). `check_dataset` runs all of it and returns a `DataCheck`: `ft check-data` (check_data.py) prints
it; the precompute job (job.py) runs it through `JobPlan`.

Planning a first run is probing and hashing every file, and the GPU would wait for all of it. So when a job's
`--out` holds nothing it could reuse (no shard: no sample done, no cached half), its items are planned in threads
and handed to the encode loop as they are planned, in the dataset's order (`JobPlan.stream`); the checks of the
whole plan (caption tokens, the summary, the media cache's entries) run when the last item is planned. A job
with shards to look at (a rerun, a grown dataset) plans up front (`JobPlan.up_front`): what is already encoded,
and which halves can be reused, are decided from the whole plan; its unchanged files cost a stat each
(media_cache.py). `--on-error fail` plans up front too, so a bad item stops the job before any encoder loads.
A plan made up front is held in columns, not objects (plan_table.py: 70 bytes a sample, where a PlannedSample and
its item cost 1.2 KB), built a chunk of items at a time; the encode loop plans the rows it encodes again, a chunk
at a time (`JobPlan.replan`).

Either way each item gets the same key (planned_sample.SampleKeys; duplicates found in the dataset's order, so
the same duplicate is the one dropped) and the shards hold the same samples with the same bytes; only their order
in the shards differs: streamed, in the order items are planned and batched per bucket; up front, a chunk of
items at a time, each chunk's reused video halves first, then its clips in the order of their text halves'
sources, batched per bucket. Both are fixed by the dataset, so two runs write the same shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ft.common.errors import UserError
from ft.common.logs import log
from ft.common.model_args import ModelArgs
from ft.common.runtime import prefetch_map
from ft.common.shards import bucket_name, parse_bucket
from ft.pipelines.base import ModelSpec
from ft.precompute.rejects import summarize_inputs

from .config import DataArgs, PrecomputeConfig
from .datasets import DatasetItem, dataset_root
from .job_items import JobItems, Survey
from .media_cache import MediaCache
from .plan_table import PlanColumns, PlanTable, first_rows, hex_keys
from .planned_sample import PlannedSample, SampleKeys, plan_item, repeated_key
from .policy import (
    RecordList,
    Rejected,
    enforce_on_error,
    long_caption_warnings,
    repeated_row,
    screen_item,
    screen_items,
    unknown_token_warnings,
)


def check_buckets(spec: ModelSpec, texts: list[str], vae_config: dict, transformer_config: dict
                  ) -> list[tuple[int, int, int]]:
    """`--buckets` parsed and checked against the model (a bucket it cannot take is an error naming it)."""
    buckets = []
    for text in texts:
        bucket = parse_bucket(text)
        problem = spec.check_bucket(bucket, vae_config, transformer_config)
        if problem:
            raise UserError(f"--buckets {text}: {problem}.")
        buckets.append(bucket)
    return buckets


def sequence_length(spec: ModelSpec, cfg: DataArgs, transformer_config: dict) -> int:
    """The text length captions are encoded at: the flag, else the transformer's; checked against the model."""
    seq_len = cfg.max_sequence_length or spec.default_sequence_length(transformer_config)
    problem = spec.check_sequence_length(seq_len, transformer_config)
    if problem:
        raise UserError(f"--max-sequence-length {seq_len}: {problem}.")
    return seq_len


@dataclass
class DataCheck:
    """What the checks found: the items planned into buckets, the rejected ones and the notes."""

    items: list[DatasetItem]
    planned: list[PlannedSample]
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[Rejected] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)  # caption -> token count, when a tokenizer was given
    # a job that plans up front holds its plan in columns (plan_table.py), not in `items` and `planned`: the
    # number of items and the planned samples per bucket
    num_items: int | None = None
    histogram: dict[str, int] | None = None

    def summary(self) -> str:
        histogram = (self.histogram if self.histogram is not None
                     else Counter(bucket_name(*p.bucket) for p in self.planned))
        items = len(self.items) if self.num_items is None else self.num_items
        head = (f"{items} items: {sum(histogram.values())} usable "
                f"({', '.join(f'{b}: {n}' for b, n in sorted(histogram.items())) or 'none'})")
        rest = summarize_inputs((r.to_dict() for r in self.rejected), (w.to_dict() for w in self.warnings))
        return head + ("\n" + rest if rest else "")

    def log_summary(self) -> None:
        """The summary to the log, a line at a time (what `ft precompute` prints before and after encoding)."""
        for line in self.summary().splitlines():
            log.info(line)


def screen(items: list[DatasetItem], cfg: DataArgs) -> tuple[list[DatasetItem], list[Rejected], list[Rejected]]:
    """What needs no decoding (policy.screen_items): (items to plan, rejected, warnings)."""
    return screen_items(items, dataset_root(cfg.dataset), cfg.allow_empty_captions, cfg.allow_outside_paths)


def planner(items: list[DatasetItem], cfg: DataArgs, spec: ModelSpec, buckets: list[tuple[int, int, int]],
            vae_config: dict, transformer_config: dict, cache: MediaCache | None = None, images: bool = False
            ) -> Iterator[PlannedSample | Rejected]:
    """Each screened item's plan (planned_sample.plan_item) or its rejection, in the items' order, as soon as it is
    made: `--decode-workers` threads plan ahead of the consumer, so the encode loop can take the first items while
    the rest are being planned. `cache` spares unchanged files their probe and hash; the items it knows are planned
    in the caller's thread (a stat and some arithmetic: a pool thread's handoff cost more than the work)."""
    def check(bucket: tuple[int, int, int]) -> str | None:  # why the model cannot take a bucket, None when it can
        return spec.check_bucket(bucket, vae_config, transformer_config)

    workers = cfg.decode_workers
    known = None if cache is None else (lambda it: cache.knows(it.path))  # a stat each: planned in this thread
    return prefetch_map(lambda it: plan_item(it, buckets, cfg.frame_sampling, cfg.frame_stride, cfg.decoder, check,
                                             cfg.max_upscale, cache, images),
                        items, workers, ahead=max(4, workers * 4), inline=known)


def check_dataset(items: list[DatasetItem], cfg: DataArgs, spec: ModelSpec, buckets: list[tuple[int, int, int]],
                  vae_config: dict, transformer_config: dict, seq_len: int, model_args: ModelArgs | None,
                  cache: MediaCache | None = None, images: bool = False, keep_tokens: bool = True) -> DataCheck:
    """Every check that needs no encoder. Token counts come from the family's tokenizer when `model_args` says
    where it is; `images`: an image-to-video run's conditioning images are checked too; `keep_tokens`: see
    `finish_check`."""
    usable, rejected, warnings = screen(items, cfg)
    result = DataCheck(items, [], rejected, warnings)
    for planned in planner(usable, cfg, spec, buckets, vae_config, transformer_config, cache, images):
        (result.rejected if isinstance(planned, Rejected) else result.planned).append(planned)
    return finish_check(result, spec, seq_len, model_args, keep_tokens)


CHECK_CHUNK = 1 << 16  # planned samples whose captions are counted at once (their lists and counts, then dropped)


def finish_check(result: DataCheck, spec: ModelSpec, seq_len: int, model_args: ModelArgs | None,
                 keep_tokens: bool = True) -> DataCheck:
    """The checks of the planned items as a whole, added to `result.warnings` (`check_planned`); `keep_tokens`:
    `result.tokens` gets every caption's count (`ft check-data` reports it; a job does not)."""
    notes, long, unknown = check_planned(result.planned, spec, seq_len, model_args,
                                         result.tokens if keep_tokens else None)
    result.warnings += notes + long + unknown
    return result


def check_planned(planned: list[PlannedSample], spec: ModelSpec, seq_len: int, model_args: ModelArgs | None,
                  tokens: dict[str, int] | None = None) -> tuple[list[Rejected], list[Rejected], list[Rejected]]:
    """The checks of planned items as a whole: the decoders' notes, and (with a tokenizer) captions longer than
    the text length or mostly unknown tokens, as three lists of warnings (a plan checked in parts gives, part by
    part, the lists one pass would). The captions are counted a chunk of samples at a time, so a rerun of a
    million items holds one chunk's lists and counts, not every item's. `tokens` gets every caption's count."""
    notes = [Rejected(str(p.item.path), reason, kind) for p in planned for kind, reason in p.notes]
    long: list[Rejected] = []
    unknown: list[Rejected] = []
    if model_args is None or not planned:
        return notes, long, unknown
    for start in range(0, len(planned), CHECK_CHUNK):
        chunk = planned[start: start + CHECK_CHUNK]
        captions = sorted({p.item.caption for p in chunk})
        stats = dict(zip(captions, spec.caption_token_stats(model_args, captions), strict=True))
        if tokens is not None:
            tokens.update((caption, counts[0]) for caption, counts in stats.items())
        paths = [str(p.item.path) for p in chunk]
        long += long_caption_warnings(paths, [stats[p.item.caption][0] for p in chunk], seq_len)
        unknown += unknown_token_warnings(paths, [p.item.caption for p in chunk],
                                          [stats[p.item.caption] for p in chunk])
    return notes, long, unknown


class JobPlan:
    """The planning of one job's `items` (job_items.py; `survey`: what their first read found); `check` holds what
    it found (rejected, warnings; planned while streamed) as it goes."""

    def __init__(self, items: JobItems, survey: Survey, cfg: PrecomputeConfig, spec: ModelSpec,
                 buckets: list[tuple[int, int, int]], configs: tuple[dict, dict], seq_len: int, cache: MediaCache,
                 keys: SampleKeys, images: bool = False):
        self.items, self.survey, self.cfg, self.spec, self.buckets = items, survey, cfg, spec, buckets
        self.seq_len = seq_len
        self.images = images  # an image-to-video run: conditioning images are planned too
        self.vae_config, self.transformer_config = configs
        self.cache, self.keys = cache, keys
        # the records go to temporary files as they pile up (policy.RecordList: one row's note each can be a million)
        self.check = DataCheck([], [], RecordList(), RecordList(), num_items=survey.count)  # type: ignore[arg-type]
        self.done = False

    def _report(self) -> None:
        if self.cache.hits:
            log.info(f"{self.cache.hits} media files unchanged since the last run (not probed or hashed again), "
                     f"{self.cache.misses} probed")
        self.check.log_summary()

    def _plan(self, usable: list[DatasetItem]) -> Iterator[PlannedSample | Rejected]:
        return planner(usable, self.cfg, self.spec, self.buckets, self.vae_config, self.transformer_config,
                       self.cache, self.images)

    def up_front(self) -> PlanTable:
        """Plan every item now, a chunk of items at a time (each chunk screened, planned, checked and keyed, then
        its objects dropped: plan_table.py), print the summary (before any encoder is loaded), apply
        `--on-error`; returns the plan without duplicate samples (those become warnings). The records come in
        the order one pass over every item gives (screened, then planned; for the warnings: repeated rows, the
        decoders' notes, long captions, unknown tokens, repeated samples)."""
        cfg, root, repeats = self.cfg, dataset_root(self.cfg.dataset), self.survey.repeats
        firsts = set(repeats.values())
        sources: dict[int, str] = {}  # the source of each row an later row repeats
        screened, unplanned = RecordList(), RecordList()
        found = tuple(RecordList() for _ in range(4))  # repeated rows, notes, long captions, unknown tokens
        columns = PlanColumns(self.survey.count)
        for start, items in self.items.chunks():
            usable, rows = [], []
            for row, item in enumerate(items, start):
                if row in firsts:
                    sources[row] = item.source
                problem = screen_item(item, root, cfg.allow_empty_captions, cfg.allow_outside_paths)
                if problem is not None:
                    screened.append(problem)
                elif row in repeats:
                    found[0].append(repeated_row(item, sources[repeats[row]]))
                else:
                    usable.append(item)
                    rows.append(row)
            planned, planned_rows = [], []
            for row, result in zip(rows, self._plan(usable), strict=True):
                if isinstance(result, Rejected):
                    unplanned.append(result)
                else:
                    self.keys.key(result)
                    planned.append(result)
                    planned_rows.append(row)
            for into, more in zip(found[1:], check_planned(planned, self.spec, self.seq_len, cfg), strict=True):
                into += more
            columns.add(planned_rows, planned)
        table = columns.table()
        check = self.check
        for part in (screened, unplanned):
            check.rejected += part
        for part in found:
            check.warnings += part
        check.histogram = table.counts()
        self._report()  # the same checks and summary as `ft check-data`
        enforce_on_error(cfg.on_error, check.rejected, cfg.dataset)
        first = first_rows(table.key, table.rows)
        again = first != table.rows
        if again.any():  # the second of two samples with the same key: a warning naming the first's media
            pairs = list(zip(table.rows[again].tolist(), first[again].tolist(), strict=True))
            named = self.items.rows({row for pair in pairs for row in pair})
            check.warnings += [repeated_key(str(named[row].path), str(named[was].path)) for row, was in pairs]
            table = table.select(~again)
        check.histogram = table.counts()
        self.done = True
        return table

    def replan(self, table: PlanTable, wanted: np.ndarray) -> Iterator[list[tuple[str, PlannedSample | Rejected]]]:
        """The samples of the `wanted` rows of `table` planned again, a chunk of the job's items at a time, each
        with its key as planned: (key, the sample), or (key, why it cannot be used now: its file changed or went
        since it was planned). A media-cache hit is a stat; nothing else is probed again."""
        rows = table.rows[wanted]
        keys = hex_keys(table.key[wanted])
        for start, items in self.items.chunks():
            lo, hi = np.searchsorted(rows, [start, start + len(items)])
            if lo == hi:
                continue
            chosen = [items[row - start] for row in rows[lo:hi].tolist()]
            out: list[tuple[str, PlannedSample | Rejected]] = []
            for key, result in zip(keys[lo:hi], self._plan(chosen), strict=True):
                if isinstance(result, PlannedSample):
                    self.keys.key(result)
                    if result.key != key:
                        result = Rejected(str(result.item.path), "changed since this job planned it; run the job "
                                                                 "again to encode it as it is now", "changed")
                out.append((key, result))
            yield out

    def stream(self, rejected: Callable[[Rejected], Any], finished: Callable[[], Any]) -> Iterator[PlannedSample]:
        """Each sample as soon as it is planned and keyed (duplicates left out, noted as warnings). `rejected`
        is called with each item planning rejects, `finished` once the last item is planned (after the checks of
        the whole plan and the summary)."""
        usable, screened, notes = screen(self.items.all(), self.cfg)
        self.check.warnings.extend(notes)  # in place: the caller holds these lists
        for r in screened:
            self.check.rejected.append(r)
            rejected(r)
        for result in self._plan(usable):
            if isinstance(result, Rejected):
                self.check.rejected.append(result)
                rejected(result)
                continue
            duplicate = self.keys.assign(result)
            if duplicate is not None:
                self.check.warnings.append(duplicate)
                continue
            self.check.planned.append(result)
            yield result
        finish_check(self.check, self.spec, self.seq_len, self.cfg, keep_tokens=False)
        self._report()
        self.done = True
        finished()

"""A job's planning (screen, probe, bucket, digest, key each item), up front or streamed into the encode loop.

Planning a first run is probing and hashing every file, and the GPU would wait for all of it. So when a job's
`--out` holds nothing it could reuse (no shard: no sample done, no cached half), its items are planned in threads
and handed to the encode loop as they are planned, in the dataset's order (`JobPlan.stream`); the checks of the
whole plan (caption tokens, the summary, the media cache's entries) run when the last item is planned. A job
with shards to look at (a rerun, a grown dataset) plans up front (`JobPlan.up_front`): what is already encoded,
and which halves can be reused, are decided from the whole plan; its unchanged files cost a stat each
(media_cache.py). `--on-error fail` plans up front too, so a bad item stops the job before any encoder loads.

Either way each item gets the same key (plan.SampleKeys, in the dataset's order, so the same duplicate is the
one dropped) and the shards hold the same samples with the same bytes; only their order in the shards differs:
streamed, in the order items are planned and batched per bucket; up front, sorted by bucket. Both are fixed by
the dataset, so two runs write the same shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ft.common.logs import log
from ft.pipelines.base import ModelSpec

from .check_data import DataCheck, check_dataset, finish_check, planner, screen
from .config import PrecomputeConfig
from .datasets import DatasetItem
from .media_cache import MediaCache
from .plan import PlannedSample, SampleKeys
from .policy import Rejected, enforce_on_error


class JobPlan:
    """The planning of one job's `items`; `check` holds what it found (planned, rejected, warnings) as it goes."""

    def __init__(self, items: list[DatasetItem], cfg: PrecomputeConfig, spec: ModelSpec,
                 buckets: list[tuple[int, int, int]], configs: tuple[dict, dict], seq_len: int, cache: MediaCache,
                 keys: SampleKeys):
        self.items, self.cfg, self.spec, self.buckets, self.seq_len = items, cfg, spec, buckets, seq_len
        self.vae_config, self.transformer_config = configs
        self.cache, self.keys = cache, keys
        self.check = DataCheck(items, [])
        self.done = False

    def _report(self) -> None:
        if self.cache.hits:
            log.info(f"{self.cache.hits} media files unchanged since the last run (not probed or hashed again), "
                     f"{self.cache.misses} probed")
        for line in self.check.summary().splitlines():
            log.info(line)

    def up_front(self) -> list[PlannedSample]:
        """Plan every item now, print the summary (before any encoder is loaded), apply `--on-error`, and key
        the samples; returns them without duplicates (those become warnings)."""
        self.check = check_dataset(self.items, self.cfg, self.spec, self.buckets, self.vae_config,
                                   self.transformer_config, self.seq_len, self.cfg, self.cache)
        self._report()  # the same checks and summary as `ft check-data`
        enforce_on_error(self.cfg.on_error, self.check.rejected, self.cfg.dataset)
        planned = []
        for p in self.check.planned:
            duplicate = self.keys.assign(p)
            if duplicate is None:
                planned.append(p)
            else:
                self.check.warnings.append(duplicate)
        self.check.planned = planned
        self.done = True
        return planned

    def stream(self, rejected: Callable[[Rejected], Any], finished: Callable[[], Any]) -> Iterator[PlannedSample]:
        """Each sample as soon as it is planned and keyed (duplicates left out, noted as warnings). `rejected`
        is called with each item planning rejects, `finished` once the last item is planned (after the checks of
        the whole plan and the summary)."""
        usable, screened, notes = screen(self.items, self.cfg)
        self.check.warnings.extend(notes)  # in place: the caller holds these lists
        for r in screened:
            self.check.rejected.append(r)
            rejected(r)
        for result in planner(usable, self.cfg, self.spec, self.buckets, self.vae_config, self.transformer_config,
                              self.cache):
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
        finish_check(self.check, self.spec, self.seq_len, self.cfg)
        self._report()
        self.done = True
        finished()

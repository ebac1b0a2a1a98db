"""`ft check-data`: a preflight of a dataset that loads no model, and the checks `ft precompute` runs first.

`check_dataset` reads the dataset, screens it (problems found while reading, empty captions, paths outside the
dataset folder, duplicate rows), probes every file (decodability, fps, frames, size), picks each item's bucket
under `--max-upscale`, and counts caption tokens with the family's tokenizer alone. `ft precompute` runs it before
loading any encoder and prints the same summary; `ft check-data` also decodes the frames each item would use
(frames failing mid-file), prints a table and writes a JSON report, so a user fixes the data before paying for
GPU time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.common.faults import check_writable, describe, environment_fault, fix
from ft.common.logs import log
from ft.common.model_args import ModelArgs
from ft.common.runtime import prefetch_map
from ft.common.shards import bucket_name, parse_bucket
from ft.pipelines.base import ModelSpec
from ft.pipelines.registry import get_spec
from ft.precompute.media import MediaError, open_media, upscale_factor
from ft.precompute.rejects import summarize_inputs

from .config import CheckDataConfig, DataArgs
from .dataset_config import apply_caption_options
from .datasets import DatasetItem, dataset_root, load_dataset
from .media_cache import MediaCache
from .plan import PlannedSample, assign_keys, plan_stream, sample_encoding
from .policy import Rejected, enforce_on_error, long_caption_warnings, screen_items, unknown_token_warnings

TABLE_ROWS = 40  # items listed on the terminal; the JSON report has them all


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

    def summary(self) -> str:
        histogram = Counter(bucket_name(*p.bucket) for p in self.planned)
        head = (f"{len(self.items)} items: {len(self.planned)} usable "
                f"({', '.join(f'{b}: {n}' for b, n in sorted(histogram.items())) or 'none'})")
        rest = summarize_inputs([r.to_dict() for r in self.rejected], [w.to_dict() for w in self.warnings])
        return head + ("\n" + rest if rest else "")


def screen(items: list[DatasetItem], cfg: DataArgs) -> tuple[list[DatasetItem], list[Rejected], list[Rejected]]:
    """What needs no decoding (policy.screen_items): (items to plan, rejected, warnings)."""
    return screen_items(items, dataset_root(cfg.dataset), cfg.allow_empty_captions, cfg.allow_outside_paths)


def planner(items: list[DatasetItem], cfg: DataArgs, spec: ModelSpec, buckets: list[tuple[int, int, int]],
            vae_config: dict, transformer_config: dict, cache: MediaCache | None = None
            ) -> Iterator[PlannedSample | Rejected]:
    """Each screened item planned (probe, bucket, frames, digest) in order, as it is made (plan.plan_stream)."""
    return plan_stream(items, buckets, cfg.frame_sampling, cfg.frame_stride, cfg.decoder, cfg.decode_workers,
                       lambda b: spec.check_bucket(b, vae_config, transformer_config), cfg.max_upscale, cache)


def check_dataset(items: list[DatasetItem], cfg: DataArgs, spec: ModelSpec, buckets: list[tuple[int, int, int]],
                  vae_config: dict, transformer_config: dict, seq_len: int, model_args: ModelArgs | None,
                  cache: MediaCache | None = None) -> DataCheck:
    """Every check that needs no encoder. Token counts come from the family's tokenizer when `model_args` says
    where it is."""
    usable, rejected, warnings = screen(items, cfg)
    result = DataCheck(items, [], rejected, warnings)
    for planned in planner(usable, cfg, spec, buckets, vae_config, transformer_config, cache):
        (result.rejected if isinstance(planned, Rejected) else result.planned).append(planned)
    return finish_check(result, spec, seq_len, model_args)


def finish_check(result: DataCheck, spec: ModelSpec, seq_len: int, model_args: ModelArgs | None) -> DataCheck:
    """The checks of the planned items as a whole, added to `result.warnings`: the decoders' notes, and (with a
    tokenizer) captions longer than the text length or mostly unknown tokens."""
    planned = result.planned
    result.warnings += [Rejected(str(p.item.path), reason, kind) for p in planned for kind, reason in p.notes]
    if model_args is not None and planned:
        captions = sorted({p.item.caption for p in planned})
        stats = dict(zip(captions, spec.caption_token_stats(model_args, captions), strict=True))
        result.tokens = {caption: counts[0] for caption, counts in stats.items()}
        result.warnings += long_caption_warnings([str(p.item.path) for p in planned],
                                                 [result.tokens[p.item.caption] for p in planned], seq_len)
        result.warnings += unknown_token_warnings([str(p.item.path) for p in planned],
                                                  [p.item.caption for p in planned],
                                                  [stats[p.item.caption] for p in planned])
    return result


def decode_planned(planned: list[PlannedSample], decoder: str, workers: int
                   ) -> tuple[list[PlannedSample], list[Rejected]]:
    """Decode the frames each planned item would use: files whose frames fail mid-file are rejected."""
    def decode(p: PlannedSample) -> Rejected | None:
        try:
            open_media(p.item.path, decoder).read(p.indices)
        except MediaError as e:
            return Rejected(str(p.item.path), str(e), e.kind)
        return None

    ok, bad = [], []
    for p, problem in zip(planned, prefetch_map(decode, planned, workers), strict=True):
        (bad if problem else ok).append(problem or p)
    return ok, bad


def _item_rows(check: DataCheck) -> list[dict[str, Any]]:
    rows = []
    for p in check.planned:
        rows.append({"path": str(p.item.path), "status": "ok", "frames": p.source_frames, "fps": round(p.fps, 3),
                     "height": p.height, "width": p.width, "bucket": bucket_name(*p.bucket),
                     "upscale": round(upscale_factor(p.height, p.width, p.bucket), 3),
                     "caption_tokens": check.tokens.get(p.item.caption)})
    for r in check.rejected:
        rows.append({"path": r.path, "status": r.kind, "reason": r.reason})
    return rows


def format_table(rows: list[dict[str, Any]], limit: int = TABLE_ROWS) -> str:
    """The per-item table for the terminal (the first `limit` rows)."""
    lines = [f"{'status':16s} {'frames':>6s} {'fps':>6s} {'size':>11s} {'bucket':>12s} {'upscale':>7s} "
             f"{'tokens':>6s}  path"]
    for r in rows[:limit]:
        if r["status"] == "ok":
            tokens = "-" if r["caption_tokens"] is None else str(r["caption_tokens"])
            lines.append(f"{'ok':16s} {r['frames']:6d} {r['fps']:6.2f} {r['width']:>5d}x{r['height']:<5d} "
                         f"{r['bucket']:>12s} {r['upscale']:7.2f} {tokens:>6s}  {r['path']}")
        else:
            lines.append(f"{r['status']:16s} {'':6s} {'':6s} {'':11s} {'':12s} {'':7s} {'':6s}  {r['path']}: "
                         f"{r['reason']}")
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more items (all of them in --report FILE)")
    return "\n".join(lines)


def run_check_data(cfg: CheckDataConfig) -> dict[str, Any]:
    """Check `cfg.dataset` for `cfg.model`; print the table and summary, write the JSON report; return it."""
    spec = get_spec(cfg.model)
    if cfg.report:  # before the checks: a report that cannot be written would throw their work away
        if Path(cfg.report).is_dir():
            raise UserError(f"--report {cfg.report} is a folder; give a file name, e.g. "
                            f"{Path(cfg.report) / 'check.json'}.")
        check_writable(Path(cfg.report).parent, "--report", f"the folder {Path(cfg.report).name} is written to")
    items = apply_caption_options(load_dataset(cfg.dataset, cfg.video_column, cfg.caption_column), cfg.id_token,
                                  cfg.strip_llm_prefixes)
    model_args = ModelArgs(model=cfg.model, pretrained=cfg.pretrained, revision=cfg.revision) \
        if cfg.pretrained else None
    if model_args is not None:
        spec.check_args(model_args)
    vae_config = spec.load_config("vae", model_args) if model_args else {}
    transformer_config = spec.load_config("transformer", model_args) if model_args else {}
    bucket_texts = cfg.buckets or spec.default_buckets
    buckets = check_buckets(spec, bucket_texts, vae_config, transformer_config)
    seq_len = sequence_length(spec, cfg, transformer_config)
    if model_args is None:
        log.info("no --pretrained: the family's default sizes apply and caption tokens are not counted")
    check = check_dataset(items, cfg, spec, buckets, vae_config, transformer_config, seq_len, model_args)
    check.planned, failed = decode_planned(check.planned, cfg.decoder, cfg.decode_workers)
    check.rejected += failed
    # encoders unknown here: keys without their fingerprint still find the same media, frames and caption twice
    check.planned, duplicates = assign_keys(check.planned, "", sample_encoding(seq_len, {}))
    check.warnings += duplicates
    rows = _item_rows(check)
    report = {"dataset": str(cfg.dataset), "model": spec.name, "buckets": bucket_texts,
              "max_sequence_length": seq_len, "max_upscale": cfg.max_upscale, "items": len(items),
              "usable": len(check.planned),
              "bucket_histogram": dict(sorted(Counter(bucket_name(*p.bucket) for p in check.planned).items())),
              "rejected": [r.to_dict() for r in check.rejected], "warnings": [w.to_dict() for w in check.warnings],
              "rows": rows}
    print(format_table(rows))
    print(check.summary())
    if cfg.report:
        try:
            Path(cfg.report).write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            fault = environment_fault(e)
            if fault is None:
                raise
            raise UserError(f"--report {cfg.report}: {describe(fault)}; the table and summary above are the "
                            f"report's content. {fix(fault).capitalize()}, then run again.") from e
        log.info(f"wrote the report to {cfg.report}")
    enforce_on_error(cfg.on_error, check.rejected, cfg.dataset)
    if not check.planned:
        raise UserError(f"no usable item in {cfg.dataset}: all {len(items)} would be rejected (reasons above).")
    return report

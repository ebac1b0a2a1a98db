"""`ft check-data`: a preflight of a dataset that loads no model, and its report.

The command alone lives here: `run_check_data` runs the planning pipeline that `ft precompute` runs first
(planning.py: screen, probe, bucket under `--max-upscale`, count caption tokens with the family's tokenizer alone),
then also decodes the frames each item would use (`decode_planned`: frames failing mid-file) and keys the samples
without the encoders' fingerprint (exact duplicates), prints a table (`format_table`) and the same summary
`ft precompute` prints, and writes a JSON report, so a user fixes the data before paying for GPU time.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.common.faults import check_writable, describe, environment_fault, fix
from ft.common.logs import log
from ft.common.model_args import ModelArgs
from ft.common.runtime import prefetch_map
from ft.common.shards import bucket_name
from ft.pipelines.image import ImageConditioning, describe_conditioning, read_model_index, resolve_conditioning
from ft.pipelines.registry import get_spec
from ft.precompute.media import MediaError, open_media, upscale_factor

from .config import CheckDataConfig
from .dataset_config import apply_caption_options
from .datasets import load_dataset
from .planned_sample import PlannedSample, assign_keys, black_frame_note, sample_encoding
from .planning import DataCheck, check_buckets, check_dataset, sequence_length
from .policy import Rejected, enforce_on_error

TABLE_ROWS = 40  # items listed on the terminal; the JSON report has them all


def decode_planned(planned: list[PlannedSample], decoder: str, workers: int, images: bool = False
                   ) -> tuple[list[PlannedSample], list[Rejected], list[Rejected]]:
    """Decode the frames each planned item would use: files whose frames fail mid-file are rejected; for an
    image-to-video run (`images`), a black conditioning frame is a warning. Returns (ok, rejected, warnings)."""
    def decode(p: PlannedSample) -> Rejected | tuple[str, str] | None:
        try:
            frames = open_media(p.item.path, decoder).read(p.indices)
            if images:
                first = open_media(p.item.image, decoder).read([0])[0] if p.item.image else frames[0]
                return black_frame_note(p.item, first)
        except MediaError as e:
            return Rejected(str(p.item.path), str(e), e.kind)
        return None

    ok, bad, notes = [], [], []
    for p, problem in zip(planned, prefetch_map(decode, planned, workers), strict=True):
        if isinstance(problem, Rejected):
            bad.append(problem)
            continue
        ok.append(p)
        if problem:
            notes.append(Rejected(str(p.item.path), problem[1], problem[0]))
    return ok, bad, notes


def _item_rows(check: DataCheck, conditioning: ImageConditioning | None = None) -> list[dict[str, Any]]:
    rows = []
    for p in check.planned:
        rows.append({"path": str(p.item.path), "status": "ok", "frames": p.source_frames, "fps": round(p.fps, 3),
                     "height": p.height, "width": p.width, "bucket": bucket_name(*p.bucket),
                     "upscale": round(upscale_factor(p.height, p.width, p.bucket), 3),
                     "caption_tokens": check.tokens.get(p.item.caption)})
        if conditioning is not None:  # where its conditioning image comes from
            first = str(p.item.image) if p.item.image else f"frame {p.indices[0]}"
            rows[-1]["condition"] = " + ".join(first if which == "first" else f"frame {p.indices[-1]}"
                                               for which in conditioning.frames)
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
            condition = f"  (conditioned on {r['condition']})" if r.get("condition") else ""
            lines.append(f"{'ok':16s} {r['frames']:6d} {r['fps']:6.2f} {r['width']:>5d}x{r['height']:<5d} "
                         f"{r['bucket']:>12s} {r['upscale']:7.2f} {tokens:>6s}  {r['path']}{condition}")
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
        spec = spec.for_checkpoint(model_args)  # the checkpoint's own spec (HunyuanVideo-I2V's)
    vae_config = spec.load_config("vae", model_args) if model_args else {}
    transformer_config = spec.load_config("transformer", model_args) if model_args else {}
    bucket_texts = cfg.buckets or spec.default_buckets
    buckets = check_buckets(spec, bucket_texts, vae_config, transformer_config)
    seq_len = sequence_length(spec, cfg, transformer_config)
    if model_args is None:
        log.info("no --pretrained: the family's default sizes apply and caption tokens are not counted")
        if cfg.mode != "auto":
            raise UserError(f"--mode {cfg.mode}: which checkpoint? Pass --pretrained (its configs say how it is "
                            "conditioned).")
    conditioning = resolve_conditioning(spec, cfg.mode, transformer_config, read_model_index(
        cfg.pretrained, cfg.revision), f"--pretrained {cfg.pretrained}") if model_args else None
    check = check_dataset(items, cfg, spec, buckets, vae_config, transformer_config, seq_len, model_args,
                          images=conditioning is not None)
    check.planned, failed, notes = decode_planned(check.planned, cfg.decoder, cfg.decode_workers,
                                                  conditioning is not None)
    check.rejected += failed
    check.warnings += notes
    # encoders unknown here: keys without their fingerprint still find the same media, frames and caption twice
    check.planned, duplicates = assign_keys(check.planned, "", sample_encoding(seq_len, {}))
    check.warnings += duplicates
    rows = _item_rows(check, conditioning)
    report = {"dataset": str(cfg.dataset), "model": spec.name, "mode": describe_conditioning(conditioning),
              "buckets": bucket_texts,
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

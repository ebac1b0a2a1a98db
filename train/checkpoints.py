"""Checkpoints for exact resume: `OUTPUT_DIR/checkpoints/checkpoint-NNNNNN/`.

A checkpoint holds what resuming needs and nothing more: the trainable weights (the LoRA adapters only, never the
frozen base), the optimizer state, the LR schedule, the RNG states, the step and the data position. Tensors go
through torch.distributed.checkpoint (DCP), keyed by parameter names, so they load under other parallel degrees (DCP
reshards: a checkpoint of 2 FSDP2 ranks loads in one process, and the reverse); the rest is `state.json`, with the
world size, the degrees and the samples per optimizer step it was saved with. A save is atomic: it is written to a
hidden `.tmp` folder and renamed into place once complete, so a kill mid-save leaves the previous checkpoints usable
(the leftover is removed by the next save). `--checkpointing-limit K` deletes the oldest beyond K after each save
(never the one just saved); deleting renames first, so a kill mid-delete leaves no half checkpoint that looks whole.
What a resume must keep of the run that wrote a checkpoint (the samples per optimizer step) and what it reports
when it differs (`RESUME_SENSITIVE`) are here too; the trainer's `resume` applies them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.common import __version__
from ft.common.errors import UserError
from ft.common.logs import log
from ft.common.shards import kill_point

if TYPE_CHECKING:
    from .config import TrainConfig

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with their state.json), oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = _NAME.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | Path, which: str) -> Path:
    """`--resume-from-checkpoint N|latest|PATH` -> a checkpoint folder; a clear error listing what exists."""
    existing = list_checkpoints(output_dir)
    listing = ", ".join(str(step) for step, _ in existing) or "none"
    if which == "latest":
        if not existing:
            raise UserError(f"--resume-from-checkpoint latest: {checkpoint_root(output_dir)} holds no checkpoint. "
                            "Start without --resume-from-checkpoint, or pass the --output-dir of the earlier run.")
        return existing[-1][1]
    if which.isdigit():
        for step, path in existing:
            if step == int(which):
                return path
        raise UserError(f"--resume-from-checkpoint {which}: no checkpoint of step {which} in "
                        f"{checkpoint_root(output_dir)}; the checkpoints there are of steps: {listing}.")
    path = Path(which)
    if (path / STATE_NAME).is_file():
        return path
    raise UserError(f"--resume-from-checkpoint {which}: not a step number, `latest`, or a checkpoint folder (one "
                    f"holding {STATE_NAME}). Checkpoints in {checkpoint_root(output_dir)}: {listing}.")


def save_checkpoint(output_dir: str | Path, step: int, tensors: dict[str, Any], state: dict[str, Any],
                    limit: int | None = None, write_weights: Callable[[Path], Any] | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete the oldest beyond `limit`. `write_weights(folder)` adds the
    weights users load (the LoRA file) to the checkpoint before it is published.

    Every rank calls this: the tensors are written by all ranks together through DCP (each its shards); rank 0
    alone makes, renames and deletes folders and writes state.json, with the ranks meeting before and after the
    collective save, so that no rank deletes another's files."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from ft.train import dist

    root = checkpoint_root(output_dir)
    final = root / f"checkpoint-{step:06d}"
    tmp = root / f".checkpoint-{step:06d}.tmp"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(output_dir)

    dist.run_on_rank_zero(prepare)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(tensors, checkpoint_id=str(tmp))  # DCP fsyncs what it writes (FileSystemWriter sync_files)
    dist.barrier()  # every rank's files are written before rank 0 makes the folder a checkpoint

    def publish() -> None:
        if write_weights is not None:
            write_weights(tmp)
        with open(tmp / STATE_NAME, "w") as f:
            f.write(json.dumps({**state, "step": step, "ft_version": __version__}, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again: the old copy is renamed away first, never half-deleted
            _delete(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if limit is not None:  # the oldest others go; never the one just saved
            others = [path for _, path in list_checkpoints(output_dir) if path != final]
            for old in others[: max(0, len(others) + 1 - limit)]:
                _delete(old)
                log.info(f"deleted {old} (--checkpointing-limit {limit})")

    dist.run_on_rank_zero(publish)
    return final


def remove_leftovers(output_dir: str | Path) -> None:
    """Hidden checkpoints of a save or a delete killed half-way (`.checkpoint-N.tmp`, `.checkpoint-N.deleting`)."""
    root = checkpoint_root(output_dir)
    for leftover in [*root.glob(".checkpoint-*.tmp"), *root.glob(".checkpoint-*.deleting")]:
        shutil.rmtree(leftover, ignore_errors=True)


def set_aside_later_checkpoints(output_dir: str | Path, step: int) -> list[Path]:
    """On resuming from `step`, move checkpoints of later steps (written by the run that went on from it) into
    `checkpoints/abandoned-NNNNNN/`, so `latest` and `--checkpointing-limit` mean the resumed run, and remove the
    leftovers of a save or delete the kill cut short. No checkpoint is deleted."""
    remove_leftovers(output_dir)
    later = [path for s, path in list_checkpoints(output_dir) if s > step]
    if not later:
        return []
    aside = checkpoint_root(output_dir) / f"abandoned-{step:06d}"
    aside.mkdir(exist_ok=True)
    moved = []
    for path in later:
        target = aside / path.name
        if target.exists():
            _delete(target)
        os.replace(path, target)
        moved.append(target)
    return moved


def _delete(path: Path) -> None:
    """Rename first (atomic: the folder stops counting as a checkpoint), then remove."""
    doomed = path.with_name(f".{path.name}.deleting")
    os.replace(path, doomed)
    kill_point("checkpoint-deleting")  # test hook: a kill here leaves the hidden folder a resumed run removes
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_unsaved_optimizer_state(tensors: dict[str, Any], saved: Any) -> None:
    """Leave out of `tensors` the optimizer state of weights the checkpoint holds none for: a trainable weight that
    never got a gradient (HunyuanVideo 1.5's last block's text-stream output, whose result the model discards) has
    no optimizer state in the run that wrote it, while this run's fresh state dict has one for every weight. The
    resumed run then has none for it either, as the straight run."""
    state = tensors.get("optimizer", {}).get("state", {})
    prefix = "optimizer.state."
    held = {key.removeprefix(prefix).rsplit(".", 1)[0] for key in saved if key.startswith(prefix)}
    for name in [n for n in state if n not in held]:  # a saved key is the weight's name, then its field (exp_avg)
        del state[name]


STATE_KEYS = ("step", "data_position", "lr_schedule", "rng")
FIT_HINT = "Resume with the same --training-type, --rank, --target-modules and model as the run that wrote it."


def load_checkpoint(path: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """Load the tensors in place into `tensors` (a state dict of the same structure); returns state.json.

    A damaged checkpoint and one that does not fit this run (other trainable weights) are told apart."""
    import logging
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    others = ", ".join(str(step) for step, p in list_checkpoints(path.parent.parent) if p != path) or "none"
    damaged = (f"{path} is damaged (%s); resume from another checkpoint (steps: {others}) or start without "
               "--resume-from-checkpoint.")
    try:
        state = json.loads((path / STATE_NAME).read_text())
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{STATE_NAME} lacks {', '.join(missing)}")
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, EOFError) as e:
        raise UserError(damaged % e) from e
    saved = {k[len("model."):] for k in metadata.state_dict_metadata if k.startswith("model.")}
    extra = sorted(saved - set(tensors["model"]))
    if extra:
        raise UserError(f"{path} holds trained weights this run would drop ({len(extra)}, e.g. {extra[0]}). "
                        + FIT_HINT)
    drop_unsaved_optimizer_state(tensors, metadata.state_dict_metadata)
    dcp_logger = logging.getLogger("torch.distributed")
    level, dcp_logger.level = dcp_logger.level, logging.CRITICAL  # its own traceback printing: ours says it
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(tensors, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP names the missing or mismatched weights
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        last = lines[-1][:300] if lines else type(e).__name__
        if "mismatch" in last.lower() or "missing key" in last.lower():
            raise UserError(f"{path} does not fit this run ({last}). " + FIT_HINT) from e
        raise UserError(damaged % last) from e
    finally:
        dcp_logger.level = level
    return state


# settings that change what a resumed run computes: a difference from the checkpoint's run is reported
# (the samples per optimizer step are checked apart: another split of them continues the same data)
RESUME_SENSITIVE = ("model", "pretrained", "expert", "transformer_id", "shards", "seed", "shuffle_buffer",
                    "training_type", "rank", "lora_alpha", "target_modules", "caption_dropout_p",
                    "first_frame_conditioning_p", "image_noise", "noised_image_dropout", "optimizer", "lr",
                    "lr_scheduler", "lr_warmup_steps", "guidance_scale")


def check_samples_per_step(path: Path, extra: dict[str, Any], now: int, cfg: TrainConfig, world: int) -> None:
    """A resume must keep the samples per optimizer step (the data position counts steps of that size); any split
    of them into processes, batches and accumulation continues the same data."""
    position = extra.get("data_position") or {}
    saved = extra.get("samples_per_step", position.get("samples_per_step"))
    if saved is None:  # an ft 0.1 checkpoint: one process, its position counted micro-batches
        old = extra.get("config", {})
        if old.get("gradient_accumulation_steps", 1) != 1:
            raise UserError(f"{path} was written by an older ft whose data position counts micro-batches of a run "
                            "with gradient accumulation; it cannot be continued exactly. Start a new run.")
        saved = old.get("batch_size", cfg.batch_size)
    if saved == now:
        return
    options = []
    if saved % (world * cfg.gradient_accumulation_steps) == 0:
        options.append(f"--batch-size {saved // (world * cfg.gradient_accumulation_steps)}")
    if saved % (world * cfg.batch_size) == 0:
        options.append(f"--gradient-accumulation-steps {saved // (world * cfg.batch_size)}")
    hint = (f"; with {world} process(es), {' or '.join(options)} gives that" if options else
            f"; {saved} samples cannot be split over {world} process(es): use a number of processes that divides it")
    raise UserError(f"--resume-from-checkpoint: {path} trained {saved} samples per optimizer step, this run "
                    f"{now} (--batch-size {cfg.batch_size} x {world} process(es) x --gradient-accumulation-steps "
                    f"{cfg.gradient_accumulation_steps}); the data position counts steps of {saved} samples, so "
                    f"keep that number{hint}.")


def dcp_failure(exc: BaseException | None) -> bool:
    """Whether `exc` is, or was caused by, a torch.distributed.checkpoint CheckpointException."""
    from torch.distributed.checkpoint.api import CheckpointException

    while exc is not None and not isinstance(exc, CheckpointException):
        exc = exc.__cause__ or exc.__context__
    return exc is not None

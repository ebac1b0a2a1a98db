"""Watching a run: OUTPUT_DIR/train_log.jsonl (one JSON line per logged step), TensorBoard event files under
OUTPUT_DIR/logs or a wandb run (`--report-to`), and OUTPUT_DIR/loss.png drawn at the end.

Validation's videos and contact sheets reach the tracker through `RunLog.media`: TensorBoard gets each video as
an animated GIF image summary (what `add_video` writes, made with PIL: no moviepy) and the sheet as an image;
wandb gets the mp4 files and the PNG. train_log.jsonl records the files (`RunLog.write(..., to_tracker=False)`).

A resumed run appends to train_log.jsonl after dropping the lines of steps past its checkpoint (written by the
run that was stopped), so the file reads as one run.

Test hook: `FT_TEST_KILL_AT=logged[:n]` (ft.common.shards.kill_point) signals the process after the n-th record is
written; with `FT_TEST_KILL_SIGNAL=STOP` a test stops the run there, remounts its output folder read-only and lets
it go on, to see the clean stop a real fault gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ft.common.errors import UserError
from ft.common.shards import kill_point

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss.png"
GIF_SIDE = 256  # the long side of the validation GIFs in TensorBoard (the mp4s keep the full size)


class RunLog:
    def __init__(self, out: Path, report_to: str, config: dict[str, Any], resumed_step: int | None = None):
        self.path = out / LOG_NAME
        if resumed_step is not None and self.path.is_file():
            kept = [json.dumps(r) for r in read_log(self.path) if r.get("step", 0) <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.is_file():
            self.path.unlink()
        self.path.touch()
        self.tracker = _tracker(out, report_to, config, resumed_step)

    def write(self, record: dict[str, Any], to_tracker: bool = True) -> None:
        # opened per record: nothing of the run stays open for writing between steps, so a folder that goes
        # read-only (or a test remounting it so) fails the next write, not a buffered one at exit
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None and to_tracker:
            self.tracker.log(record)
        kill_point("logged")

    def media(self, step: int, videos: list[tuple[str, Any, float, Path]], images: list[tuple[str, Path]]) -> None:
        """Videos (tag, uint8 frames [F, H, W, 3], fps, mp4 path) and images (tag, PNG path) to the tracker."""
        if self.tracker is not None:
            self.tracker.media(step, videos, images)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl; a line a kill left half-written is skipped."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class _TensorBoard:
    def __init__(self, folder: Path, resumed_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("--report-to tensorboard needs the tensorboard package: `pip install tensorboard`, or "
                            "use --report-to none.") from e
        # on resume, TensorBoard drops the stopped run's points past the checkpoint
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=None if resumed_step is None else resumed_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{name}", value, record["step"])

    def media(self, step: int, videos: list[tuple[str, Any, float, Path]], images: list[tuple[str, Path]]) -> None:
        import numpy as np
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        for tag, frames, fps, _ in videos:
            gif, (width, height) = gif_bytes(frames, fps)
            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
            self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        for tag, path in images:
            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_project(config: dict[str, Any]) -> str:
    """The wandb project: --tracker-name (finetrainers' flag), else WANDB_PROJECT, else "ft"."""
    import os

    return config.get("tracker_name") or os.environ.get("WANDB_PROJECT") or "ft"


WANDB_OFF_MODES = ("offline", "disabled", "dryrun")


def check_wandb_login(env: dict[str, str] | None = None) -> None:
    """`--report-to wandb` with nowhere to send the run: refused before any model loads (wandb itself raises its
    UsageError at `wandb.init`, after the transformer has loaded). Enough: an API key (WANDB_API_KEY, or the
    wandb server's entry in ~/.netrc, which `wandb login` writes), an identity token file, or WANDB_MODE
    offline/disabled (the run is logged to files, `wandb sync` uploads them later)."""
    import netrc
    import os
    from urllib.parse import urlsplit

    env = dict(os.environ if env is None else env)
    if env.get("WANDB_MODE", "").lower() in WANDB_OFF_MODES or env.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        entry = None
    if entry and entry[2]:
        return
    raise UserError(f"--report-to wandb: no wandb login here (no WANDB_API_KEY, no {host} entry in {path}), so wandb "
                    "would stop the run after the model has loaded. Run `wandb login` (or set WANDB_API_KEY), or set "
                    "WANDB_MODE=offline to log to files and `wandb sync` them later; or use --report-to tensorboard.")


class _Wandb:
    def __init__(self, folder: Path, config: dict[str, Any], resumed_step: int | None):
        try:
            import wandb
        except ImportError as e:
            raise UserError("--report-to wandb needs wandb: `pip install wandb`, or use --report-to "
                            "tensorboard.") from e
        id_file = folder / "wandb_run_id.txt"  # a resumed run continues the same wandb run
        run_id = id_file.read_text().strip() if resumed_step is not None and id_file.is_file() else None
        self.run = wandb.init(project=wandb_project(config), dir=str(folder), config=config, id=run_id,
                              resume="allow" if run_id else None)
        id_file.write_text(self.run.id + "\n")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def media(self, step: int, videos: list[tuple[str, Any, float, Path]], images: list[tuple[str, Path]]) -> None:
        import wandb

        logged: dict[str, Any] = {tag: wandb.Video(str(path)) for tag, _, _, path in videos}  # the mp4 as written
        logged |= {tag: wandb.Image(str(path)) for tag, path in images}
        self.run.log(logged, step=step)

    def close(self) -> None:
        self.run.finish()


def gif_bytes(frames: Any, fps: float, longest: int = GIF_SIDE) -> tuple[bytes, tuple[int, int]]:
    """uint8 frames [F, H, W, 3] as a looping animated GIF, as TensorBoard shows videos, scaled down to `longest`
    pixels on the long side (a 49x480x720 GIF at full size would put tens of MB in the event file each time);
    returns the bytes and (width, height)."""
    import io

    from PIL import Image

    height, width = frames.shape[1:3]
    scale = min(1.0, longest / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    images = [Image.fromarray(f).resize(size) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(1000 / (fps or 8))))
    return buffer.getvalue(), size


def _tracker(out: Path, report_to: str, config: dict[str, Any], resumed_step: int | None) -> Any:
    if report_to == "tensorboard":
        return _TensorBoard(out / "logs", resumed_step)
    if report_to == "wandb":
        return _Wandb(out, config, resumed_step)
    return None


def stopped_by_fault(fault: OSError, out: Path, step: int, checkpoints: list[tuple[int, Path]]) -> str:
    """What `ft train` says when a write fails mid-run (disk full, folder read-only): where, what is usable, and
    how to go on. A checkpoint is renamed into place only when whole, so the newest listed one is usable."""
    from ft.common.faults import describe, fix

    if checkpoints:
        last, path = checkpoints[-1]
        kept = (f"The last checkpoint, step {last} ({path}), is whole and usable; a checkpoint that was being "
                "written is a hidden .tmp folder the next save removes. To go on: "
                f"{fix(fault)}, then run the same command plus --resume-from-checkpoint latest.")
    else:
        kept = f"No checkpoint was saved yet. To go on: {fix(fault)}, then run the same command again."
    return f"--output-dir {out}: {describe(fault)}; training stopped after step {step}. {kept}"


def plot_losses(log_path: Path, image_path: Path, size: tuple[int, int] = (640, 360)) -> Path | None:
    """Draw the loss of every logged step (thin) and its running mean (thick) as a PNG; None when nothing to plot."""
    from PIL import Image, ImageDraw

    records = read_log(log_path)
    points = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    if len(points) < 2:
        return None
    width, height = size
    left, right, top, bottom = 60, 15, 15, 35
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-9
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (width - left - right)
        return x, top + (hi - loss) / (hi - lo) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.line([xy(s, v) for s, v in points], fill=(150, 180, 230), width=1)
    window = max(1, len(points) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    draw.line([xy(s, v) for s, v in zip(steps, smooth, strict=True)], fill=(20, 60, 160), width=3)
    draw.text((5, top), f"{hi:.3f}", fill="black")
    draw.text((5, height - bottom - 10), f"{lo:.3f}", fill="black")
    draw.text((left, height - bottom + 8), f"step {steps[0]}", fill="black")
    draw.text((width - right - 70, height - bottom + 8), f"step {steps[-1]}", fill="black")
    draw.text((width // 2 - 40, height - bottom + 8), "training loss", fill="black")
    image.save(image_path)
    return image_path

"""What a rerun of `ft precompute` costs: the first run, an unchanged rerun, one caption changed, one clip added.

    python bench/precompute.py [--config tiny|medium] [--clips N] [--no-save]

Each run goes through the real command (`ft.cli.main.invoke`, in this process, so the import of torch and
diffusers is paid once, before the first run, and is not in any row). The family's real `encode_video`,
`encode_prompts` and `load_component` are wrapped to count the clips and captions encoded, the models loaded, and
the seconds spent encoding. Configurations:
- tiny: the test suite's CogVideoX, 9x32x32 clips (a smoke run: encoding does not dominate);
- medium (default): bench/train_step.py's scaled-down CogVideoX (the real VAE layout at widths 32-128 with 16
  latent channels, a 4-layer T5 of width 512, 226 text tokens), 17x128x192 clips: encoding dominates the first run.
Decoding is timed on its own (the same clips, frames and resize, one thread) and set against the encoders' time:
the run decodes in threads ahead of the encoders, so decoding is hidden when the first run's wall time is about
its encode time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = {"tiny": {"bucket": (9, 32, 32), "clips": 8}, "medium": {"bucket": (17, 128, 192), "clips": 24}}
FP32 = ["--vae-dtype", "fp32", "--text-encoder-dtype", "fp32"]
COUNTS: Counter[str] = Counter()
SECONDS: Counter[str] = Counter()


def count_stage_one(spec_class: type) -> None:
    """Wrap the family's stage-1 calls to count them and time the encoders."""
    encode_video, encode_prompts, load = spec_class.encode_video, spec_class.encode_prompts, spec_class.load_component

    def video(self, vae, frames):
        start = time.perf_counter()
        try:
            return encode_video(self, vae, frames)
        finally:
            COUNTS["clips encoded"] += frames.shape[0]
            SECONDS["encode"] += time.perf_counter() - start

    def prompts(self, encoders, captions, length):
        start = time.perf_counter()
        try:
            return encode_prompts(self, encoders, captions, length)
        finally:
            COUNTS["captions encoded"] += len(captions)
            SECONDS["encode"] += time.perf_counter() - start

    def load_component(self, component, args, device=None):
        if not component.startswith("tokenizer"):
            COUNTS["models loaded"] += 1
        return load(self, component, args, device)

    spec_class.encode_video, spec_class.encode_prompts, spec_class.load_component = video, prompts, load_component


def run(model: Path, data: Path, out: Path, bucket: str) -> dict[str, float]:
    from ft.cli.main import invoke

    COUNTS.clear()
    SECONDS.clear()
    start = time.perf_counter()
    invoke(["precompute", "--model", "cogvideox", "--pretrained", str(model), *FP32, "--dataset", str(data),
            "--out", str(out), "--buckets", bucket], standalone=False)
    return {"seconds": time.perf_counter() - start, "encode": SECONDS["encode"], **COUNTS}


def cli_run(model: Path, data: Path, out: Path, bucket: str) -> dict[str, float]:
    """The run as a user starts it: `ft precompute` in a new process (its encoder calls are not counted)."""
    ft = Path(sys.executable).parent / "ft"
    start = time.perf_counter()
    subprocess.run([str(ft), "precompute", "--model", "cogvideox", "--pretrained", str(model), *FP32, "--dataset",
                    str(data), "--out", str(out), "--buckets", bucket], check=True, capture_output=True)
    return {"seconds": time.perf_counter() - start, "encode": float("nan")}


def decode_seconds(data: Path, bucket: tuple[int, int, int]) -> float:
    """Decoding (and resizing) every clip's frames as precompute does, in one thread."""
    from ft.precompute.datasets import load_dataset
    from ft.precompute.media import frame_indices, open_media, resize_to_bucket

    start = time.perf_counter()
    for item in load_dataset(data):
        media = open_media(item.path)
        frames = media.read(frame_indices(media.num_frames, bucket[0], "head", 1))
        resize_to_bucket(frames, bucket[1], bucket[2], "center-crop")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    parser.add_argument("--clips", type=int, default=None, help="Clips in the dataset (default: the config's).")
    parser.add_argument("--no-save", action="store_true", help="Print the table only.")
    args = parser.parse_args()
    c = CONFIGS[args.config]
    clips = args.clips or c["clips"]
    frames, height, width = c["bucket"]
    bucket = f"{frames}x{height}x{width}"

    from ft.cli.synthetic import make_shapes_dataset
    from ft.common.logs import quiet_libraries
    from ft.pipelines.cogvideox import CogVideoXSpec
    from ft.pipelines.registry import save_tiny_model

    quiet_libraries()
    count_stage_one(CogVideoXSpec)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.config == "tiny":
            save_tiny_model("cogvideox", work / "model")
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from train_step import build_medium

            build_medium(work / "model")
        data = make_shapes_dataset(work / "data", num_clips=clips, frames=frames + 4, sizes=((height, width),),
                                   seed=0)
        # another frame count: bytes of their own, never a repeat of a clip already in the dataset
        make_shapes_dataset(work / "extra", num_clips=1, frames=frames + 5, sizes=((height, width),), seed=1)
        out = work / "shards"
        rows = [("first run", run(work / "model", data, out, bucket))]
        rows.append(("rerun, unchanged data", run(work / "model", data, out, bucket)))
        rows.append(("the same rerun as a new `ft` process (imports included)", cli_run(work / "model", data, out,
                                                                                         bucket)))
        prompts = (data / "prompts.txt").read_text().splitlines()
        (data / "prompts.txt").write_text("\n".join([prompts[0] + ", at dusk", *prompts[1:]]) + "\n")
        rows.append(("one caption changed", run(work / "model", data, out, bucket)))
        shutil.copy(work / "extra" / "videos" / "clip_000.mp4", data / "videos" / "added.mp4")
        with open(data / "videos.txt", "a") as f:
            f.write("videos/added.mp4\n")
        with open(data / "prompts.txt", "a") as f:
            f.write((work / "extra" / "prompts.txt").read_text().splitlines()[0] + ", the added clip\n")
        rows.append(("one clip added", run(work / "model", data, out, bucket)))
        decode = decode_seconds(data, c["bucket"])

    first = rows[0][1]
    lines = [f"{args.config} CogVideoX, {clips} clips of {bucket}, fp32 on {os.cpu_count()} cores "
             f"(in-process: imports are paid before the first run)", "",
             "| run | seconds | of first run | clips encoded | captions encoded | models loaded | encoders' s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        counts = " | ".join(str(r.get(k, 0)) if r["encode"] == r["encode"] else "-"  # nan: not counted
                            for k in ("clips encoded", "captions encoded", "models loaded"))
        encode = f"{r['encode']:.2f}" if r["encode"] == r["encode"] else "-"
        lines.append(f"| {name} | {r['seconds']:.2f} | {100 * r['seconds'] / first['seconds']:.1f}% | {counts} | "
                     f"{encode} |")
    encoded = first.get("clips encoded", 0)  # the generated dataset may repeat a clip: repeats are encoded once
    lines += ["", f"First run: {encoded} distinct clips, {encoded / first['seconds']:.2f} clips/s; the encoders "
                  f"took {first['encode']:.2f} s of "
                  f"its {first['seconds']:.2f} s ({100 * first['encode'] / first['seconds']:.0f}%). Decoding and "
                  f"resizing all {clips + 1} clips alone, in one thread: {decode:.2f} s "
                  f"({100 * decode / max(first['encode'], 1e-9):.0f}% of the encode time), done in threads ahead of "
                  "the encoders."]
    body = "\n".join(lines)
    if args.no_save:
        print(body)
    else:
        from report import save_result

        save_result("precompute" if args.config == "medium" else f"precompute_{args.config}", body)


if __name__ == "__main__":
    main()

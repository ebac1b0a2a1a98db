"""How `ft precompute` and `ft train`'s start-up grow with the size of a shard set: no quadratic work, no memory
that grows per sample beyond what is kept for the keys.

    python bench/precompute_scale.py [--samples 1000,10000,100000] [--clips 500,5000] [--no-save]

Synthetic sets (`--samples`): samples with tiny tensors written by ft's own `ShardWriter` as one precompute job
does it: each finished shard appended to the job's journal, its state saved at the start and the end, one
warning record per sample (the worst case the issue measured: every caption longer than the text length), then
the real merge (`precompute/merge.py`). Reported: manifest.json's bytes, the time of every manifest write of
the run (journal appends, state saves, the rejects/warnings file, the merge), and `ft train`'s data start-up in
a new process (open the set, index it, plan the first epoch, read the first batch) with its wall time and peak
RSS. Tiny clips (`--clips`): a real `ft precompute` of N 9x32x32 mp4 clips (N samples: the generated shapes
repeat, so each caption is numbered) with the test suite's tiny CogVideoX, then the same command again on the
unchanged data as a new process (its wall time and peak RSS), against `ft --help` plus a stat of every file.
The last rows give the growth ratio between the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
FT = [sys.executable, "-m", "ft.cli.main"]

TRAIN_STARTUP = """
import resource, sys, time
start = time.perf_counter()
from ft.train.loader import DataStream, ShardSet
s = ShardSet(sys.argv[1])
stream = DataStream([s], seed=0, batch_size=1)
batch = next(stream.batches())
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


# runs a command as its only child, so the child's peak RSS is what RUSAGE_CHILDREN reports
WRAP = """
import resource, subprocess, sys, time
start = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr + f"\\n{wall} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}\\n")
sys.exit(r.returncode)
"""


def run_child(argv: list[str]) -> tuple[float, float, str]:
    """Run a process to its end: (wall seconds, its peak RSS in MB, stdout)."""
    proc = subprocess.run([sys.executable, "-c", WRAP, *map(str, argv)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{proc.stderr[-3000:]}")
    wall, rss = (float(x) for x in proc.stderr.strip().splitlines()[-1].split())
    return wall, rss, proc.stdout


def synthetic_set(folder: Path, n: int) -> float:
    """Write n tiny samples as one precompute job writes them and merge; returns the seconds of manifest writes."""
    import torch

    from ft.common.shards import JOBS_DIR, JobState, ShardWriter, append_journal, write_atomic
    from ft.common.shards.manifest import input_summary
    from ft.precompute.merge import finalize

    (folder / JOBS_DIR).mkdir(parents=True)
    state = JobState(0, 1, "bench", "host", os.getpid(), "now",
                     header={"model_family": "cogvideox", "encoders": {}, "encoder_fingerprint": "f", "encoding": {},
                             "shapes": {"latent_channels": 4}, "empty_caption": {}})
    spent = 0.0

    def timed(fn, *args) -> None:
        nonlocal spent
        t = time.perf_counter()
        fn(*args)
        spent += time.perf_counter() - t

    keys = [f"{i:032x}" for i in range(n)]
    warnings = [{"path": f"videos/clip_{i:07d}.mp4", "reason": "caption of 300 tokens is cut to "
                 "--max-sequence-length 226", "kind": "caption-truncated"} for i in range(n)]
    timed(write_atomic, folder / state.file(".active.txt"), "".join(k + "\n" for k in keys))
    timed(write_atomic, folder / state.file(".warnings.jsonl"), "".join(json.dumps(w) + "\n" for w in warnings))
    state.active = {"file": state.file(".active.txt"), "samples": n, "buckets": {"9x32x32": n}}
    state.inputs = {"warnings": input_summary([state.file(".warnings.jsonl")], warnings)}
    timed(state.save, folder)
    writer = ShardWriter(folder, on_shard=lambda info: timed(append_journal, folder, state, info))
    latents = {"mean": torch.zeros(4, 1, 2, 2, dtype=torch.bfloat16), "logvar": torch.zeros(4, 1, 2, 2)}
    cond = {"prompt_embeds": torch.zeros(4, 8, dtype=torch.bfloat16)}
    for key in keys:
        writer.write(key, {"latents": latents, "cond": cond}, {"bucket": [9, 32, 32], "video_key": key,
                                                               "text_key": key, "caption": "c"})
    writer.finish_shard()
    state.complete = True
    timed(state.save, folder)
    timed(finalize, folder)
    return spent


def clips_rows(n: int, work: Path) -> dict[str, float]:
    from ft.cli.synthetic import make_shapes_dataset
    from ft.pipelines.registry import save_tiny_model

    model = work / "model"
    if not model.exists():
        save_tiny_model("cogvideox", model, seed=0)
    data = make_shapes_dataset(work / f"clips-{n}", num_clips=n, frames=9, seed=1)
    prompts = (data / "prompts.txt").read_text().splitlines()  # the shapes repeat: a caption each keeps them apart
    (data / "prompts.txt").write_text("".join(f"{p}, take {i}\n" for i, p in enumerate(prompts)))
    out = work / f"clips-{n}-shards"
    argv = [*FT, "precompute", "--model", "cogvideox", "--pretrained", str(model), "--dataset", str(data),
            "--out", str(out), "--buckets", "9x32x32", "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32"]
    first, _, _ = run_child(argv)
    rerun, rss, _ = run_child(argv)
    help_s, _, _ = run_child([*FT, "--help"])
    start = time.perf_counter()
    for path in data.rglob("*"):
        os.stat(path)
    stat_s = time.perf_counter() - start
    return {"first": first, "rerun": rerun, "rss": rss, "help+stat": help_s + stat_s,
            "manifest": (out / "manifest.json").stat().st_size}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="1000,10000,100000")
    parser.add_argument("--clips", default="500,5000")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.samples.split(",") if x]
    clips = [int(x) for x in args.clips.split(",") if x]
    rows = ["| synthetic samples | manifest.json | all manifest writes | train data start-up | its peak RSS |",
            "|---|---|---|---|---|"]
    found = []
    with tempfile.TemporaryDirectory(prefix="ft-bench-scale-") as tmp:
        for n in sizes:
            folder = Path(tmp) / f"set-{n}"
            writes = synthetic_set(folder, n)
            _, _, out = run_child([sys.executable, "-c", TRAIN_STARTUP, str(folder)])
            startup, rss = (float(x) for x in out.split())
            found.append((n, (folder / "manifest.json").stat().st_size, writes, startup, rss))
            rows.append(f"| {n:,} | {found[-1][1] / 1e3:.1f} KB | {writes:.2f} s | {startup:.2f} s | {rss:.0f} MB |")
        if len(found) > 1:
            (a, *ra), (b, *rb) = found[0], found[-1]
            rows.append(f"| growth {b // a}x samples | {ratio(rb[0], ra[0])} | {ratio(rb[1], ra[1])} | "
                        f"{ratio(rb[2], ra[2])} | {ratio(rb[3], ra[3])} |")
        rows += ["", "| tiny clips | first run | rerun, unchanged (new process) | its peak RSS | `ft --help` + stat "
                 "of every file | rerun / that | manifest.json |", "|---|---|---|---|---|---|---|"]
        got = []
        for n in clips:
            r = clips_rows(n, Path(tmp))
            got.append((n, r))
            rows.append(f"| {n:,} | {r['first']:.1f} s | {r['rerun']:.2f} s | {r['rss']:.0f} MB | "
                        f"{r['help+stat']:.2f} s | {ratio(r['rerun'], r['help+stat'])} | "
                        f"{r['manifest'] / 1e3:.1f} KB |")
        if len(got) > 1:
            (a, ra), (b, rb) = got[0], got[-1]
            rows.append(f"| growth {b // a}x clips | {ratio(rb['first'], ra['first'])} | "
                        f"{ratio(rb['rerun'], ra['rerun'])} | {ratio(rb['rss'], ra['rss'])} | "
                        f"{ratio(rb['help+stat'], ra['help+stat'])} | | |")
    table = "\n".join(rows)
    if args.no_save:
        print(table)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import save_result

    save_result("precompute_scale", table)


if __name__ == "__main__":
    main()

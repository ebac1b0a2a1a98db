"""How `ft precompute`'s merge and `ft train`'s start-up grow with the size of a shard set, up to ten million
samples: start-up in seconds and memory flat whatever the size, on every rank.

    python bench/precompute_scale.py [--samples 1000,100000,1000000,10000000] [--jobs 4] [--clips 500,5000]
                                     [--planning 1000,100000,1000000] [--work DIR] [--no-save]

Synthetic sets (`--samples`): samples with tiny tensors, written as `--jobs` precompute jobs leave them
(bench/synthetic_set.py: ft's `ShardWriter` for each job's first shard, byte-identical copies with other keys for
the rest, checked against `ShardWriter` once per job; each shard journalled; one warning record per sample, the
worst case the issue measured), then merged by `ft precompute --finalize` in a new process (its wall time and peak
RSS; it writes the set's index). Then `ft train`'s data start-up in a new process, after its imports (open the
set, map its index, plan the first epoch, read the first batch): wall and CPU seconds, what it added to its peak
RSS, and what it added at the first batch, private (anonymous) and file-backed (the index's mapped pages, shared
through the page cache); the same for 2 processes at once (rank 0 and 1 of 2); and the first start of the same
set as an older ft left it (no `set_index.bin`: the index is built from the `.idx` files once and saved). Each set
is deleted once measured; a size the disk cannot hold (about 3.6 KB a sample) is reported as not run.
Tiny clips (`--clips`): a real `ft precompute` of N 9x32x32 mp4 clips (N samples: the generated shapes
repeat, so each caption is numbered) with the test suite's tiny CogVideoX, then the same command again on the
unchanged data as a new process (its wall time and peak RSS), against `ft --help` plus a stat of every file.
A planning rerun (`--planning`): `planning_rerun` below, up to its plan, over a table of N rows.
The growth rows give the ratio between successive sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from ft.common.shards import INDEX_NAME, MANIFEST_NAME

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
FT = [sys.executable, "-m", "ft.cli.main"]

TRAIN_STARTUP = """
import json, sys, time
import torch, xxhash  # what ft train has imported before it opens its data
from ft.common.runtime import steady_malloc
from ft.train.loader import DataStream, ShardSet
torch.stack([torch.zeros(1), torch.zeros(1)])


def status():
    out = {}
    for line in open("/proc/self/status"):
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


before = status()
wall, cpu = time.perf_counter(), time.process_time()
s = ShardSet(sys.argv[1])  # ft train reads the manifests in its checks, then sets its allocator (Trainer.build:
steady_malloc()  # freed heap blocks are kept, not trimmed), then maps the index and plans as the data starts
s.index
index_s = time.perf_counter() - wall
stream = DataStream([s], seed=0, batch_size=1, rank=int(sys.argv[2]), world=int(sys.argv[3]))
taken = int(sys.argv[4])  # a resume at step `taken` of epoch 0 (0: a first start)
batch = next(stream.batches({"batches": taken, "sets": [{"epoch": 0, "taken": taken}], "samples_per_step": 1}))
after = status()
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "index": index_s,
                  "peak": after["VmHWM"] - before["VmRSS"], "anon": after["RssAnon"] - before["RssAnon"],
                  "file": after["RssFile"] - before["RssFile"]}))
"""


def train_startup(folder: Path, world: int = 1, taken: int = 0) -> dict[str, float]:
    """`ft train`'s data start-up in `world` new processes at once (rank r of world each), from the start of the
    first epoch or resumed at its step `taken`: the slowest wall and CPU seconds, and the most any of them added
    to its RSS (peak; private and file-backed at the first batch)."""
    procs = [subprocess.Popen([sys.executable, "-c", TRAIN_STARTUP, str(folder), str(rank), str(world), str(taken)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for rank in range(world)]
    found = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"the training start-up failed:\n{err[-3000:]}")
        found.append(json.loads(out.strip().splitlines()[-1]))
    return {k: max(f[k] for f in found) for k in found[0]}


# runs a command as its only child, so the child's peak RSS is what RUSAGE_CHILDREN reports
WRAP = """
import resource, subprocess, sys, time
start = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
sys.stdout.write(r.stdout)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
sys.stderr.write(r.stderr + f"\\n{wall} {usage.ru_maxrss / 1024} {usage.ru_utime + usage.ru_stime}\\n")
sys.exit(r.returncode)
"""


class Child(NamedTuple):
    wall: float  # seconds
    rss: float  # its peak RSS, MB
    cpu: float  # user + system seconds
    stdout: str


def run_child(argv: list[str]) -> Child:
    """Run a process to its end: its wall and CPU seconds, its peak RSS and its output."""
    proc = subprocess.run([sys.executable, "-c", WRAP, *map(str, argv)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{proc.stderr[-3000:]}")
    wall, rss, cpu = (float(x) for x in proc.stderr.strip().splitlines()[-1].split())
    return Child(wall, rss, cpu, proc.stdout)


def synthetic_set(folder: Path, n: int, jobs: int) -> dict[str, float]:
    """Write n tiny samples as `jobs` precompute jobs leave them (bench/synthetic_set.py), then merge them in a new
    process (which also writes the set's index): the seconds of each and the merge's peak RSS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic_set import write_jobs

    start = time.perf_counter()
    write_jobs(folder, n, jobs)
    written = time.perf_counter() - start
    merge = run_child([*FT, "precompute", "--finalize", "--out", str(folder)])
    return {"write": written, "merge": merge.wall, "merge_cpu": merge.cpu, "merge_rss": merge.rss}


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


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
    first = run_child(argv).wall
    rerun, rss = run_child(argv)[:2]
    help_s = run_child([*FT, "--help"]).wall
    start = time.perf_counter()
    for path in data.rglob("*"):
        os.stat(path)
    stat_s = time.perf_counter() - start
    return {"first": first, "rerun": rerun, "rss": rss, "help+stat": help_s + stat_s,
            "manifest": (out / MANIFEST_NAME).stat().st_size}


PLAN_ONLY = """
import json, resource, sys, time
import diffusers, torch, transformers  # what a planning job imports (its model's configs, its tokenizer)
from ft.cli.commands import invoke
from ft.precompute.job import PrecomputeJob


def plan_only(job):  # the rerun up to its plan: what it found, what it reuses and what is left to encode
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after the imports
    wall, cpu = time.perf_counter(), time.process_time()
    job.plan()
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "todo": len(job.todo),
                      "done": len(job.done), "before": before,
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


PrecomputeJob.run = plan_only
invoke(sys.argv[1:], standalone=False)
"""


def planning_rerun(n: int, work: Path) -> dict[str, float]:
    """A precompute rerun that has to plan, at n items: a table of n rows naming 10 tiny clips with a caption each
    (`--out` holds the first 10 rows' samples, encoded by a real first run of the same folder, so the rerun plans
    up front and finds every media file in the media cache, as one after a caption edit does), run in a new process
    up to its plan (`PrecomputeJob.plan`: the items read, their media facts from the cache, keyed, checked against
    the shards held, the halves to reuse found): its wall and CPU seconds and peak RSS. The set holds 10 samples,
    not n: the keys a rerun of a whole set finds held (a Python set of n keys) are not in this number."""
    from ft.cli.synthetic import make_shapes_dataset
    from ft.pipelines.registry import save_tiny_model

    model = work / "model"
    if not model.exists():
        save_tiny_model("cogvideox", model, seed=0)
    clips = work / "plan-clips"
    if not clips.exists():
        make_shapes_dataset(clips, num_clips=10, frames=9, seed=1)
    videos = (clips / "videos.txt").read_text().splitlines()
    captions = (clips / "prompts.txt").read_text().splitlines()
    table = work / f"plan-{n}"  # the first run and the rerun read the same folder: the media cache knows its paths
    table.mkdir(exist_ok=True)
    if not (table / "videos").exists():
        (table / "videos").symlink_to(clips / "videos")
    out = work / f"plan-{n}-shards"
    argv = ["precompute", "--model", "cogvideox", "--pretrained", str(model), "--out", str(out), "--buckets",
            "9x32x32", "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32", "--dataset", str(table)]
    if not out.exists():
        (table / "videos.txt").write_text("".join(v + "\n" for v in videos))
        (table / "prompts.txt").write_text("".join(c + "\n" for c in captions))
        run_child([*FT, *argv])
    with open(table / "videos.txt", "w") as v, open(table / "prompts.txt", "w") as c:
        for start in range(0, n, 1 << 16):
            rows = range(start, min(n, start + (1 << 16)))
            v.write("".join(videos[i % 10] + "\n" for i in rows))
            c.write("".join((captions[i] if i < 10 else f"{captions[i % 10]}, take {i}") + "\n" for i in rows))
    child = run_child([sys.executable, "-c", PLAN_ONLY, *argv])
    return json.loads(child.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="1000,100000,1000000")
    parser.add_argument("--jobs", type=int, default=4, help="precompute jobs the synthetic sets are written as")
    parser.add_argument("--clips", default="500,5000")
    parser.add_argument("--planning", default="", help="items of a planning rerun (planning_rerun), e.g. 1000000")
    parser.add_argument("--work", default=None, help="folder for the sets (default: a temporary one in /tmp)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.samples.split(",") if x]
    clips = [int(x) for x in args.clips.split(",") if x]
    planning = [int(x) for x in args.planning.split(",") if x]
    rows = [f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores", "",
            f"| synthetic samples ({args.jobs} jobs) | write | merge (+ set index): wall / CPU | its peak RSS | "
            "manifest.json | train data start-up: wall / CPU | + peak RSS | + private / file-backed at the first "
            "batch | 2 processes: wall / CPU | + peak RSS (each) | old set's first start (builds the index) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    found = []
    with tempfile.TemporaryDirectory(prefix="ft-bench-scale-", dir=args.work) as tmp:
        for n in sizes:
            folder = Path(tmp) / f"set-{n}"
            need = n * 3600 * 1.2 + (1 << 30)
            if free_bytes(Path(tmp)) < need:
                rows.append(f"| {n:,} | not run: {free_bytes(Path(tmp)) / 1e9:.0f} GB free, about "
                            f"{need / 1e9:.0f} GB needed | | | | | | | | | |")
                continue
            made = synthetic_set(folder, n, args.jobs)
            one, two = train_startup(folder), train_startup(folder, world=2)
            (folder / INDEX_NAME).unlink()
            old = train_startup(folder)
            found.append((n, one, made))
            rows.append(f"| {n:,} | {made['write']:.1f} s | {made['merge']:.1f} / {made['merge_cpu']:.1f} s | "
                        f"{made['merge_rss']:.0f} MB | {(folder / MANIFEST_NAME).stat().st_size / 1e3:.1f} KB | "
                        f"{one['wall']:.2f} / {one['cpu']:.2f} s | {one['peak']:.0f} MB | "
                        f"{one['anon']:.0f} / {one['file']:.0f} MB | "
                        f"{two['wall']:.2f} / {two['cpu']:.2f} s | {two['peak']:.0f} MB | {old['wall']:.1f} s, "
                        f"+{old['peak']:.0f} MB |")
            shutil.rmtree(folder)
        for (a, ra, ma), (b, rb, mb) in zip(found, found[1:], strict=False):
            rows.append(f"| growth {a:,} -> {b:,} ({b // a}x) | | {ratio(mb['merge'], ma['merge'])} | "
                        f"{ratio(mb['merge_rss'], ma['merge_rss'])} | | {ratio(rb['wall'], ra['wall'])} | "
                        f"{ratio(rb['peak'], ra['peak'])} | | | | |")
        rows.append(f"load average after: {os.getloadavg()[0]:.2f}")
        if clips:
            rows += ["", "| tiny clips | first run | rerun, unchanged (new process) | its peak RSS | `ft --help` + "
                     "stat of every file | rerun / that | manifest.json |", "|---|---|---|---|---|---|---|"]
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
        if planning:
            rows += ["", "| planning rerun: items (10 clips) | plan: wall / CPU | its peak RSS | + over the imports | "
                     "to encode |", "|---|---|---|---|---|"]
        for n in planning:
            r = planning_rerun(n, Path(tmp))
            rows.append(f"| {n:,} | {r['wall']:.1f} / {r['cpu']:.1f} s | {r['peak']:.0f} MB | "
                        f"{r['peak'] - r['before']:.0f} MB | {r['todo']:,} |")
    table = "\n".join(rows)
    if args.no_save:
        print(table)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import save_result

    save_result("precompute_scale", table)


if __name__ == "__main__":
    main()

"""A first `ft precompute` into an empty --out: how long until the first clip reaches the VAE, and the whole run.

    python bench/first_run.py [--clips 200] [--frames 9] [--source 480x720] [--code LABEL=DIR ...]

Writes N clips (the shapes dataset at `--source` size, a caption each; the bucket is 9x32x32, so encoding stays
cheap while planning probes full-size files) and runs the real command on them with the test suite's tiny
CogVideoX, in a new process each time (best of `--repeats`, the ways interleaved), timing from the start of
`run_precompute` to the first call of the family's `encode_video` (wrapped to note the time; it then runs as it
is) and to the end.
Before encoding streamed with planning, the first encode waited for every item to be probed, hashed and keyed.

`--code LABEL=DIR` also runs another checkout of ft (an older commit, `git archive`d into DIR) on the same data,
for the before/after rows: the child imports `ft` from DIR through a folder of links, ahead of this checkout.
The table goes to bench/results/first_run.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
shim = sys.argv[1]
if shim:
    sys.path.insert(0, shim)
from ft.pipelines.cogvideox import CogVideoXSpec
from ft.precompute import encode
first = []
real = CogVideoXSpec.encode_video
def timed(self, vae, frames):
    first.append(time.perf_counter())
    return real(self, vae, frames)
CogVideoXSpec.encode_video = timed
from ft.cli.main import invoke
import ft.common
start = time.perf_counter()
invoke(sys.argv[2:], standalone=False)
end = time.perf_counter()
print(json.dumps({"first_encode": first[0] - start, "total": end - start, "batches": len(first),
                  "code": ft.common.__file__}))
"""


def shim_for(code: Path, work: Path) -> str:
    """A folder whose `ft/` links to the packages of the checkout at `code`."""
    shim = work / ("shim-" + code.resolve().name)
    (shim / "ft").mkdir(parents=True, exist_ok=True)
    for name in ("common", "pipelines", "precompute", "train"):
        link = shim / "ft" / name
        if not link.exists():
            link.symlink_to(code.resolve() / name)
    return str(shim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--source", default="480x720", help="the clips' size, HEIGHTxWIDTH")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                        help="another ft checkout to run too (the 'before' rows); repeatable")
    parser.add_argument("--work", type=Path, default=None, help="keep the data here (reused across calls)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    from report import save_result

    from ft.cli.synthetic import make_shapes_dataset
    from ft.pipelines.tiny import save_tiny_model

    work = args.work or Path(tempfile.mkdtemp(prefix="ft-first-run-"))
    model = work / "model"
    if not model.exists():
        save_tiny_model("cogvideox", model, seed=0)
    height, width = (int(v) for v in args.source.split("x"))
    data = work / f"clips-{args.clips}-{args.source}"
    if not data.exists():
        make_shapes_dataset(data, num_clips=args.clips, frames=args.frames, sizes=((height, width),), seed=1)
        prompts = (data / "prompts.txt").read_text().splitlines()  # the shapes repeat: a caption each
        (data / "prompts.txt").write_text("".join(f"{p}, take {i}\n" for i, p in enumerate(prompts)))
    codes = [(label, shim_for(Path(path), work)) for label, path in (c.split("=", 1) for c in args.code)]
    codes.append(("this checkout", ""))
    runs: dict[str, list[dict]] = {label: [] for label, _ in codes}
    for i in range(args.repeats):  # interleaved, so a busy moment of the machine is not one row's alone
        for label, shim in codes:
            out = work / f"out-{i}"
            argv = ["precompute", "--model", "cogvideox", "--pretrained", str(model), "--dataset", str(data),
                    "--out", str(out), "--buckets", f"{args.frames}x32x32", "--vae-dtype", "fp32",
                    "--text-encoder-dtype", "fp32"]
            done = subprocess.run([sys.executable, "-c", CHILD, shim, *argv], capture_output=True, text=True,
                                  cwd=ROOT)
            subprocess.run(["rm", "-rf", str(out)], check=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = ["| code | start to first VAE encode | start to end | VAE batches |", "|---|---|---|---|"]
    for label, _ in codes:
        best = min(runs[label], key=lambda r: r["total"])
        lines.append(f"| {label} | {best['first_encode']:.2f} s | {best['total']:.2f} s | {best['batches']} |")
    body = (f"First run into an empty --out: {args.clips} clips of {args.frames}x{args.source} into a "
            f"{args.frames}x32x32 bucket, tiny CogVideoX, each way in a new process, best of {args.repeats} "
            "(interleaved):\n\n" + "\n".join(lines) + "\n")
    if args.no_save:
        print(body)
    else:
        save_result("first_run", body)


if __name__ == "__main__":
    main()

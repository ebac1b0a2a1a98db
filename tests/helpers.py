"""Helpers the tests share (importable as `helpers`: pyproject puts tests/ on the path)."""

from __future__ import annotations

FP32 = ["--transformer-dtype", "fp32", "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32"]
BUCKETS = ["--buckets", "9x32x32", "9x32x64", "1x32x32"]


def run_cli(argv: list[object]) -> object:
    """Run `ft argv` through the real command-line parser; returns the command's result."""
    from ft.cli.main import invoke

    return invoke([str(a) for a in argv], standalone=False)


def torchrun(nproc: int, argv: list[object], timeout: float = 240) -> object:
    """`ft argv` in `nproc` processes under torchrun (gloo on the CPU); returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "ft.cli.main", *map(str, argv)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


HUNYUAN_FP32 = [*FP32, "--text-encoder-2-dtype", "fp32"]
# 32 Llama tokens after the template's crop (the default is 256): the same code path, half the step time on a CPU
HUNYUAN_TEXT = ["--max-sequence-length", "32"]
# each family's shared test shard set (conftest's family_shards): the fixture-name stem, the dtype flags (every
# command takes them) and the flags precompute takes besides
FAMILIES = {"cogvideox": ("cog", FP32, []), "ltx_video": ("ltx", FP32, []),
            "hunyuan_video": ("hunyuan", HUNYUAN_FP32, HUNYUAN_TEXT), "wan": ("wan", FP32, []),
            "hunyuan_video_1_5": ("hv15", HUNYUAN_FP32, [])}

# each family's LoRA run that lowers the loss (tests/train's `lora_run(family)`): rank 8, alpha 16, lr 3e-3, seed 0;
# the steps and fixed-noise eval batches its tiny model needs, and the family's own flags (LTX-Video trains with
# first-frame conditioning half the time)
LORA_RUN = ["--rank", "8", "--lora-alpha", "16", "--batch-size", "2", "--lr", "3e-3", "--lr-warmup-steps", "0",
            "--seed", "0"]
LORA_RUNS = {"cogvideox": (50, 4, []), "ltx_video": (20, 2, ["--first-frame-conditioning-p", "0.5"]),
             "hunyuan_video": (30, 4, []), "wan": (30, 4, []), "hunyuan_video_1_5": (30, 4, [])}


def train_args(family: str, model: object, shards: object, out: object, *flags: object) -> list[str]:
    """`ft train`'s command line for the tiny `model` of `family` (a FAMILIES key) on `shards` into `out`, in the
    family's fp32 dtypes, then `flags`: what a test file's runs share, then the run's own (a flag given twice
    counts with its last value)."""
    _, dtypes, _ = FAMILIES[family]
    argv = ["train", "--model", family, "--pretrained", model, *dtypes, "--shards", shards, "--output-dir", out,
            *flags]
    return [str(a) for a in argv]


def train(family: str, model: object, shards: object, out: object, *flags: object) -> dict:
    """`ft train` (train_args's command line) in this process; returns the run's summary."""
    return run_cli(train_args(family, model, shards, out, *flags))


def train_log(out: object) -> list[dict]:
    """The records of the run in `out`, from its train_log.jsonl."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(str(out)) / "train_log.jsonl").read_text().splitlines()]


def mount_tmpfs(path: object, size: str = "4m") -> None:
    """Mount a tmpfs of `size` at `path` (made if missing), for real disk-full and read-only faults; skips the
    test where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    import os
    import subprocess
    from pathlib import Path

    import pytest

    Path(str(path)).mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for a fault test needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def remount(path: object, mode: str) -> None:
    """Remount the tmpfs at `path` read-only ("ro") or writable ("rw")."""
    import subprocess

    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def unmount(path: object) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: object, leave: int) -> object:
    """Fill the filesystem at `path` with one file, leaving about `leave` bytes free; returns the file."""
    import shutil
    from pathlib import Path

    filler = Path(str(path)) / "filler"
    size = max(0, shutil.disk_usage(str(path)).free - leave)
    with open(filler, "wb") as f:
        f.write(b"\0" * size)
    return filler


class BuiltClasses:
    """Records the class of every transformers model and tokenizer constructed while it is active (the real
    constructors run; only their class names are noted)."""

    def __enter__(self) -> list[str]:
        from transformers import PreTrainedModel, PreTrainedTokenizerBase

        self.built: list[str] = []
        self.originals = {cls: cls.__init__ for cls in (PreTrainedModel, PreTrainedTokenizerBase)}
        for cls, init in self.originals.items():
            def recording(obj, *args, _init=init, **kwargs):
                self.built.append(type(obj).__name__)
                _init(obj, *args, **kwargs)
            cls.__init__ = recording
        return self.built

    def __exit__(self, *exc: object) -> None:
        for cls, init in self.originals.items():
            cls.__init__ = init


def start(args: list[str], **env: str) -> object:
    """`ft args` as a real process (no job variables of this shell's, SIGINT as by default); see `finish`."""
    import os
    import signal
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_COUNT",
                                                              "SLURM_ARRAY_TASK_ID")}
    return subprocess.Popen([sys.executable, "-m", "ft.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**clean, "HF_HUB_OFFLINE": "1", **env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def shard_tensors(out: object) -> dict[str, dict[str, bytes]]:
    """Every active sample's tensors in the shard set `out`, as bytes by key: the same samples with the same bytes,
    whatever their order in the shards."""
    import torch

    from ft.common.shards import iter_shard, open_shard_set

    manifest, paths = open_shard_set(out)
    active = manifest.active_keys(out)
    return {s.key: {f"{g}/{n}": t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    for g, named in s.tensors.items() for n, t in named.items()}
            for path in paths for s in iter_shard(path) if s.key in active}


def finish(proc: object) -> tuple[int, str]:
    """Wait for a process from `start`: its exit status and stderr."""
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, as FT_TEST_KILL_SIGNAL=STOP does at a kill point)."""
    from pathlib import Path

    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


# ---------------------------------------------------------------------------------------------- pipeline-call capture
class Calls:
    """Every call of a module's forward, its keyword arguments as they arrived (a forward pre-hook)."""

    def __init__(self, module):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        assert not args  # WanPipeline and ft pass every argument by name
        self.calls.append(dict(kwargs))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


def assert_same_call(ours: dict, theirs: dict) -> None:
    """Two captured calls (`Calls`) are the same: the same names, tensors equal bitwise in dtype and shape."""
    import torch

    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        mine = ours[name]
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):  # rotary tables (cos, sin)
            assert isinstance(mine, tuple) and len(mine) == len(value), name
            mine, value = torch.stack(mine), torch.stack(value)
        if isinstance(value, torch.Tensor):
            assert mine.dtype == value.dtype and mine.shape == value.shape, name
            assert torch.equal(mine, value), name
        else:
            assert mine == value, name

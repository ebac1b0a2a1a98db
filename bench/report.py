"""What every benchmark prints and saves: its table, plus the machine, package versions and date it ran on.

    from report import save_result        # bench/ scripts run as `python bench/NAME.py`, so bench/ is on the path
    save_result("loader", table_markdown)  # prints it and writes bench/results/loader.md

A result file is self-describing, so numbers from different machines are never mistaken for each other.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "webdataset", "xxhash")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> str:
    """One markdown paragraph: date, host kind, CPU, cores, memory, GPU, Python and package versions."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    gpu = "no GPU"
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = f"{mem:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        memory = "RAM unknown"
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()} {cpu_name()}, "
            f"{os.cpu_count()} cores, {memory}, {gpu}; Python {platform.python_version()}; {', '.join(versions)}")


def save_result(name: str, body: str, command: str | None = None) -> Path:
    """Print `body` (markdown) and write it with the environment to bench/results/<name>.md."""
    print(body)
    command = command or "python " + " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"# bench/{name}\n\n`{command}`\n\n{environment()}\n\n{body.rstrip()}\n")
    print(f"\n(written to {path})")
    return path

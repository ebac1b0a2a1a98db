"""The design's rules that code review alone would let slip: import direction, shipped recipes that parse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ft.common.config import load_config_file
from ft.precompute.config import PrecomputeConfig
from ft.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# the one place in ft.common allowed to reach up: the CLI composition root and the demo it runs
COMPOSITION_ROOT = {"cli/main.py", "cli/demo.py", "cli/finetrainers.py"}
FORBIDDEN = {
    "common": ("ft.pipelines", "ft.precompute", "ft.train"),
    "pipelines": ("ft.precompute", "ft.train"),
    "precompute": ("ft.train",),
    "train": ("ft.precompute",),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", FORBIDDEN)
def test_imports_run_one_way(package):
    for path in sorted((ROOT / package).glob("*.py")):
        rel = f"{package}/{path.name}"
        if rel in COMPOSITION_ROOT:
            continue
        bad = {m for m in imported_modules(path) if m.startswith(FORBIDDEN[package])}
        assert not bad, f"{rel} imports {bad}: imports run common <- pipelines <- precompute, train"


def test_every_module_opens_with_a_docstring():
    for package in FORBIDDEN:
        for path in sorted((ROOT / package).glob("*.py")):
            assert ast.get_docstring(ast.parse(path.read_text())), f"{package}/{path.name} has no module docstring"


@pytest.mark.parametrize("recipe", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    values = load_config_file(str(recipe))
    if "precompute" in recipe.name:
        config = PrecomputeConfig(**values, dataset="data", out="shards")
    else:
        config = TrainConfig(**values, shards=["shards"], output_dir="out")
    assert config.model == recipe.name.split("_")[0]  # cogvideox_lora.toml, wan_lora.toml, ...


@pytest.mark.parametrize("script", sorted((ROOT / "examples" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_shipped_cluster_scripts_are_bash_and_their_ft_flags_parse(script, tmp_path):
    import shlex
    import subprocess

    from ft.cli.finetrainers import translate
    from ft.cli.main import command_configs

    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    # run the script with ft, srun and the SLURM tools replaced by stubs that print the ft command line
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "ft").write_text('#!/bin/bash\nprintf "%q " ft "$@" >> "$FT_CALLS"; echo >> "$FT_CALLS"\n')
    # srun (and the torchrun it starts) reduced to the ft command it would run on each rank
    (stub / "srun").write_text('#!/bin/bash\nwhile [ "$1" != "ft" ] && [ $# -gt 0 ]; do shift; done\n"$@"\n')
    (stub / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for tool in stub.iterdir():
        tool.chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{stub}:/usr/bin:/bin", "FT_CALLS": str(calls), "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "8",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "8",
           "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (line,) = calls.read_text().splitlines()
    _, command, *argv = shlex.split(line)
    (run,) = translate(command, argv, None, command_configs(), "").runs  # every flag is one of ft's
    assert "--model" in run

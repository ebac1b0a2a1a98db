"""The design's rules that code review alone would let slip: import direction, shipped recipes that parse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ft.common.config import load_config_file
from ft.precompute.config import PrecomputeConfig
from ft.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# The floors of the house: a package imports only from floors below it (and from itself). precompute and train
# stand side by side on one floor and never import each other; the command line stands on top.
FLOORS = {"common": 0, "pipelines": 1, "precompute": 2, "train": 2, "cli": 3}
# within ft.common, the base stands below the shard contract (common/shards/)
BASE_OF_COMMON = "ft.common"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("ft", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("ft", *parts))


def imported_modules(path: Path) -> set[str]:
    """Every ft module `path` imports, wherever the import stands (top level or inside a function), relative
    imports resolved."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "ft"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.split(".")[0] == "ft":
                names.add(module)
                names |= {f"{module}.{a.name}" for a in node.names}  # `from ft.common import shards`
    return {name for name in names if _is_module(name)}


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    if not parts or parts[0] not in FLOORS:
        return False
    folder = ROOT.joinpath(*parts)
    return folder.with_suffix(".py").exists() or (folder / "__init__.py").exists()


def package_files() -> list[Path]:
    return sorted(p for package in FLOORS for p in (ROOT / package).rglob("*.py"))


def floor_of(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("package", FLOORS)
def test_imports_run_down_the_floors_only(package):
    """Every import anywhere in a package (lazy ones inside functions and relative ones included) points to its own
    package or a lower floor: common <- pipelines <- precompute | train <- cli, with no exemption."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in imported_modules(path):
            other = floor_of(module)
            assert other == package or FLOORS[other] < FLOORS[package], (
                f"{path.relative_to(ROOT)} imports {module}: imports run common <- pipelines <- precompute | train "
                "<- cli")


def test_the_base_of_common_does_not_import_the_shard_contract():
    for path in sorted((ROOT / "common").glob("*.py")):
        bad = {m for m in imported_modules(path) if m.startswith("ft.common.shards")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the contract stands on the base, not under it"


def test_every_file_in_common_is_shared_by_two_floors_above_it():
    """common/ holds only what both stages (and pipelines) share: each of its modules is imported by at least two of
    pipelines, precompute and train, directly or through another module of common."""
    users: dict[str, set[str]] = {}
    for path in package_files():
        for module in imported_modules(path):
            users.setdefault(module, set()).add(module_name(path))
    def floors_using(module: str, seen: set[str]) -> set[str]:
        found = set()
        for user in users.get(module, ()):
            if floor_of(user) in ("pipelines", "precompute", "train"):
                found.add(floor_of(user))
            elif floor_of(user) == "common" and user not in seen:
                found |= floors_using(user, seen | {user})
        return found
    for path in sorted((ROOT / "common").rglob("*.py")):
        module = module_name(path)
        if module in ("ft.common", "ft.common.shards"):
            continue
        floors = floors_using(module, {module})
        if path.parent.name == "shards":  # a part of the contract: the contract as a whole is what the floors use
            floors |= floors_using("ft.common.shards", {"ft.common.shards"})
        assert len(floors) >= 2, f"{path.relative_to(ROOT)} is used by {floors or 'nothing'} only: move it there"


def test_every_module_opens_with_a_docstring():
    for path in package_files():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no module docstring"


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

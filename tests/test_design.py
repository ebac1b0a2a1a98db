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
COMPOSITION_ROOT = {"common/cli.py", "common/demo.py", "common/finetrainers.py"}
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
    assert config.model == "cogvideox"

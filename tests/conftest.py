"""Shared fixtures: each family's tiny model saved as a diffusers folder and its shards of a dataset of real mp4
clips (one parametrised fixture each: `tiny_model(family)`, `family_shards(family)`, also reachable by the names
tiny_cog, cog_shards, tiny_ltx, ltx_shards, tiny_hunyuan, hunyuan_shards, tiny_wan, wan_shards).

Everything is built locally from configs (no network; HF_HUB_OFFLINE=1 is set here too) and cached per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import BUCKETS, FAMILIES, run_cli


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ft.cli.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_clips=8, frames=17,
                               sizes=((32, 32), (32, 64)), num_images=2, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_model(family)`: the family's tiny model (seed 0) saved as a diffusers folder, made once a session."""
    from ft.pipelines.registry import save_tiny_model

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            folder = tmp_path_factory.mktemp("models") / f"tiny-{family.replace('_', '-')}"
            made[family] = save_tiny_model(family, folder, seed=0)
        return made[family]

    return get


@pytest.fixture(scope="session")
def family_shards(tmp_path_factory: pytest.TempPathFactory, tiny_model, shapes_data: Path):
    """`family_shards(family)`: `shapes_data` precomputed with the family's tiny model (fp32, BUCKETS), made once
    a session."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            stem, dtypes, text = FAMILIES[family]
            out = tmp_path_factory.mktemp("shards") / stem
            run_cli(["precompute", "--model", family, "--pretrained", tiny_model(family), *dtypes, *text, "--dataset",
                     shapes_data, "--out", out, *BUCKETS, "--batch-size", "2"])
            made[family] = out
        return made[family]

    return get


def _family_fixture(factory: str, family: str, name: str):
    @pytest.fixture(scope="session", name=name)
    def fixture(request: pytest.FixtureRequest) -> Path:
        return request.getfixturevalue(factory)(family)

    return fixture


# tiny_cog, cog_shards, ..., tiny_wan, wan_shards: the factories' values, by name
for _family, (_stem, *_) in FAMILIES.items():
    globals()[f"tiny_{_stem}"] = _family_fixture("tiny_model", _family, f"tiny_{_stem}")
    globals()[f"{_stem}_shards"] = _family_fixture("family_shards", _family, f"{_stem}_shards")


@pytest.fixture(scope="session")
def tiny_wan_ti2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan 2.2 TI2V-5B's layout at toy size (expand_timesteps in model_index.json)."""
    from diffusers import WanPipeline

    from ft.pipelines.wan import tiny_ti2v_components

    folder = tmp_path_factory.mktemp("models") / "tiny-wan2.2-ti2v"
    WanPipeline(**tiny_ti2v_components(0)).save_pretrained(folder)
    return folder


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A factory of tmpfs mounts under tmp_path (`tmpfs("name", "2m")`), unmounted after the test."""
    from helpers import mount_tmpfs, unmount

    mounted: list[Path] = []

    def make(name: str = "mnt", size: str = "4m") -> Path:
        path = tmp_path / name
        mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        unmount(path)


@pytest.fixture(scope="session")
def tiny_wan_a14b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan 2.2 A14B's layout at toy size: two experts (transformer, transformer_2) and boundary_ratio 0.875."""
    from diffusers import WanPipeline

    from ft.pipelines.wan_experts import tiny_a14b_components

    folder = tmp_path_factory.mktemp("models") / "tiny-wan2.2-a14b"
    WanPipeline(**tiny_a14b_components(0)).save_pretrained(folder)
    return folder

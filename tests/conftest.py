"""Shared fixtures: a tiny model of each family saved as a diffusers folder, datasets of real mp4 clips,
encoded shards.

Everything is built locally from configs (no network; HF_HUB_OFFLINE=1 is set here too) and cached per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import BUCKETS, FP32, run_cli


@pytest.fixture(scope="session")
def tiny_cog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ft.pipelines.tiny import save_tiny_model

    return save_tiny_model("cogvideox", tmp_path_factory.mktemp("models") / "tiny-cogvideox", seed=0)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ft.common.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_clips=8, frames=17,
                               sizes=((32, 32), (32, 64)), num_images=2, seed=0)


@pytest.fixture(scope="session")
def cog_shards(tmp_path_factory: pytest.TempPathFactory, tiny_cog: Path, shapes_data: Path) -> Path:
    out = tmp_path_factory.mktemp("shards") / "cog"
    run_cli(["precompute", "--model", "cogvideox", "--pretrained", tiny_cog, *FP32, "--dataset", shapes_data,
             "--out", out, *BUCKETS, "--batch-size", "2"])
    return out


@pytest.fixture(scope="session")
def tiny_hunyuan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ft.pipelines.tiny import save_tiny_model

    return save_tiny_model("hunyuan_video", tmp_path_factory.mktemp("models") / "tiny-hunyuan-video", seed=0)


@pytest.fixture(scope="session")
def hunyuan_shards(tmp_path_factory: pytest.TempPathFactory, tiny_hunyuan: Path, shapes_data: Path) -> Path:
    from helpers import HUNYUAN_FP32, HUNYUAN_TEXT

    out = tmp_path_factory.mktemp("shards") / "hunyuan"
    run_cli(["precompute", "--model", "hunyuan_video", "--pretrained", tiny_hunyuan, *HUNYUAN_FP32, *HUNYUAN_TEXT,
             "--dataset", shapes_data, "--out", out, *BUCKETS, "--batch-size", "2"])
    return out


@pytest.fixture(scope="session")
def tiny_ltx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ft.pipelines.tiny import save_tiny_model

    return save_tiny_model("ltx_video", tmp_path_factory.mktemp("models") / "tiny-ltx-video", seed=0)


@pytest.fixture(scope="session")
def ltx_shards(tmp_path_factory: pytest.TempPathFactory, tiny_ltx: Path, shapes_data: Path) -> Path:
    out = tmp_path_factory.mktemp("shards") / "ltx"
    run_cli(["precompute", "--model", "ltx-video", "--pretrained", tiny_ltx, *FP32, "--dataset", shapes_data,
             "--out", out, *BUCKETS, "--batch-size", "2"])
    return out


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ft.pipelines.tiny import save_tiny_model

    return save_tiny_model("wan", tmp_path_factory.mktemp("models") / "tiny-wan", seed=0)


@pytest.fixture(scope="session")
def tiny_wan_ti2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan 2.2 TI2V-5B's layout at toy size (expand_timesteps in model_index.json)."""
    from diffusers import WanPipeline

    from ft.pipelines.wan import tiny_ti2v_components

    folder = tmp_path_factory.mktemp("models") / "tiny-wan2.2-ti2v"
    WanPipeline(**tiny_ti2v_components(0)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wan_shards(tmp_path_factory: pytest.TempPathFactory, tiny_wan: Path, shapes_data: Path) -> Path:
    out = tmp_path_factory.mktemp("shards") / "wan"
    run_cli(["precompute", "--model", "wan", "--pretrained", tiny_wan, *FP32, "--dataset", shapes_data,
             "--out", out, *BUCKETS, "--batch-size", "2"])
    return out


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

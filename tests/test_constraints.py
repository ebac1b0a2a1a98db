"""constraints.txt (the exact versions `make` and CI install) agrees with pyproject.toml's open ranges.

Every dependency of the project and of its dev extra that applies on this platform is pinned there (`==`), at a
version its range accepts; torch is the one exception, pinned by the Makefile's TORCH on the first install so a
GPU user's own torch is kept, and that pin must satisfy the range too. The file does not pin ft itself.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
requirements = pytest.importorskip("packaging.requirements")
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

NOT_IN_FILE = {"torch"}  # pinned by the Makefile (TORCH), see the module docstring


def pinned() -> dict[str, Version]:
    out = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"constraints.txt line {number} ({line!r}) is not an exact pin NAME==VERSION"
        out[canonicalize_name(name)] = Version(version.strip())
    return out


def dependencies() -> list[requirements.Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [requirements.Requirement(line) for line in lines]


def test_every_dependency_is_pinned_within_its_range():
    pins = pinned()
    problems = []
    for req in dependencies():
        name = canonicalize_name(req.name)
        if name in NOT_IN_FILE or (req.marker is not None and not req.marker.evaluate()):
            continue
        if name not in pins:
            problems.append(f"{req.name} ({req}) is missing from constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}")
    assert not problems, "; ".join(problems) + ". Run `make constraints` after a green `make test`."


def test_the_file_pins_neither_ft_nor_torch_and_the_makefile_torch_fits_the_range():
    pins = pinned()
    assert "ft" not in pins and "torch" not in pins
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH \?= torch==(\S+)$", makefile, re.M)
    assert torch_pin, "the Makefile pins torch with TORCH ?= torch==VERSION"
    torch_req = next(r for r in dependencies() if canonicalize_name(r.name) == "torch")
    assert torch_req.specifier.contains(Version(torch_pin.group(1)))
    assert "-c $(CONSTRAINTS)" in makefile and "CONSTRAINTS ?= constraints.txt" in makefile


def test_a_disagreement_is_caught(tmp_path, monkeypatch):
    """The check itself: a pin outside its range and a missing dependency both fail it."""
    text = (ROOT / "constraints.txt").read_text()
    bad = re.sub(r"^diffusers==\S+$", "diffusers==0.1.0", text, flags=re.M)
    bad = re.sub(r"^pyarrow==\S+\n", "", bad, flags=re.M)
    (tmp_path / "constraints.txt").write_text(bad)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError) as error:
        test_every_dependency_is_pinned_within_its_range()
    assert "diffusers==0.1.0, outside pyproject's >=0.32" in str(error.value)
    assert "pyarrow (pyarrow>=15) is missing" in str(error.value)

"""PEP 561: the package ships py.typed, in the source tree and in a wheel setuptools builds from pyproject.toml."""

import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_is_in_the_installed_package():
    assert importlib.resources.files("flatlora").joinpath("py.typed").is_file()


def test_wheel_contains_py_typed(tmp_path):
    # build from a copy: the shared work tree stays free of build/ and egg-info churn
    src = tmp_path / "proj"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_wheel(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert "flatlora/__init__.py" in names and "flatlora/py.typed" in names


def _floor_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints-floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_core_floors_are_the_versions_the_core_check_installs():
    """pyproject's core `>=` floors and constraints-floor.txt (what `make test-core` installs) name the same
    packages at the same versions, so the floors a user is promised are the ones CI ran."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", dep)
        assert m, f"core dependency {dep!r} is not of the form name>=floor"
        floors[m.group(1).lower()] = m.group(2)
    pins = _floor_pins()
    assert set(floors) == set(pins), (floors, pins)
    norm = {k: tuple(int(x) for x in v.split(".")) for k, v in floors.items()}
    pinned = {k: tuple(int(x) for x in v.split(".")) for k, v in pins.items()}
    # a floor given with fewer parts (2.13) names the same version as the pin with zeros (2.13.0)
    assert all(pinned[k][:len(norm[k])] == norm[k] and not any(pinned[k][len(norm[k]):]) for k in norm), (floors, pins)

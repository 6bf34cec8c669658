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

"""The benchmark scripts (benchmarks/*.py) loaded as modules, for tests of their CPU side."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(stem: str, name: str | None = None) -> ModuleType:
    """A fresh module of ``benchmarks/<stem>.py`` (``name``: its module name, default ``flatlora_bench_<stem>``),
    with benchmarks/ on ``sys.path`` for its ``_bench`` helpers."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name or f"flatlora_bench_{stem}", BENCHMARKS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

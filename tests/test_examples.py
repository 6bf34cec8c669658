"""The README's plain-loop example runs as written."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_plain_loop_example_runs(capsys):
    runpy.run_path(str(EXAMPLES / "plain_loop.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("step 20  sigma 0.0500")

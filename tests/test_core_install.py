"""The core install trains: with every optional package hidden (``sys.modules[name] = None``), the engine still
perturbs a plain LoRA model, the Trainer callback runs, and features that need an extra name it.

This runs `scripts/core_check.py --hide-optional --quick` in a fresh interpreter (the optional packages are
already imported in this one). `make test` also runs the full check in an environment that holds the core
dependencies only (`make test-core`)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_runs_with_every_optional_package_hidden():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "core_check.py"), "--hide-optional", "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines), out.stdout
    assert "restored bit for bit" in out.stdout and "trainer_callback.py: step 4  sigma 0.0500" in out.stdout


def test_hiding_makes_an_optional_import_fail():
    """The mechanism the check relies on: a hidden module cannot be imported, and looks uninstalled."""
    code = ("import sys, importlib.util; sys.modules['bitsandbytes'] = None\n"
            "assert importlib.util.find_spec('bitsandbytes') is None\n"
            "try:\n    import bitsandbytes\nexcept ImportError:\n    print('hidden')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "hidden", out.stderr

"""Optional packages: imported only where their feature is used, with one clear error naming the extra.

The core install (``pip install flatlora``: torch, peft, transformers, accelerate, safetensors, pyyaml, tqdm)
runs the engine, the Trainer callback and the diagnostics' numbers. Everything else is an extra:

    experiments  matplotlib (figures of `flatlora compare` and the diagnostics), the embedded MiniLM model
    train        datasets, TRL, scikit-learn, pillow (`flatlora train`)
    dev          pytest, bitsandbytes, triton, ... (the test suite)

bitsandbytes and triton are never required: a model holding bitsandbytes layers has imported it already, and
the Triton noise kernel is used only when triton imports (`flatlora.noise`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (PyPI name, extra that installs it)
_PACKAGES = {
    "matplotlib": ("matplotlib", "experiments"),
    "datasets": ("datasets", "train"),
    "trl": ("trl", "train"),
    "sklearn": ("scikit-learn", "train"),
    "PIL": ("pillow", "train"),
}


class MissingExtraError(ImportError):
    """An optional package a feature needs is not installed; the message names the extra to install."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``) for ``feature`` (e.g. ``"flatlora compare's figures"``),
    or raise `MissingExtraError` naming the package and the extra that installs it."""
    top = module.partition(".")[0]
    pypi, extra = _PACKAGES[top]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{feature} needs the optional package {pypi!r}, which is not installed "
                                f"({exc}): pip install 'flatlora[{extra}]'") from None

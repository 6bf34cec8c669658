"""Offline experiments: LoRA vs Flat-LoRA vs SAM baselines on embedded tasks (`flatlora compare`).

Public entry points: `ExperimentConfig` and `preset` (what to run), `compare` (run a whole comparison
into a run folder, resumable), `train_run` (one run), `load_run`/`find_runs`/`LoadedRun` (read finished
runs back for analysis) and `get_task` (the task registry).
"""

from __future__ import annotations

from .config import PRESETS, ExperimentConfig, preset
from .runs import LoadedRun, find_runs, load_run

__all__ = ["ExperimentConfig", "LoadedRun", "PRESETS", "compare", "find_runs", "get_task", "load_run", "preset",
           "train_run"]


def __getattr__(name: str):
    if name == "compare":
        from .compare import compare

        return compare
    if name == "train_run":
        from .train import train_run

        return train_run
    if name == "get_task":
        from .tasks import get_task

        return get_task
    raise AttributeError(f"module 'flatlora.experiments' has no attribute {name!r}")

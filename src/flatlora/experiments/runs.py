"""Run-folder layout, atomic saves, resume, and loading a finished run back.

    <root>/                         one `flatlora compare` (default ./runs/<name>/)
        config.yaml  results.json  table.md  *.png  log.txt
        <method>/seed<k>/           one finished run (``<method>-r<rank>`` in a rank sweep)
            adapter/                PEFT save_pretrained (adapter_model.safetensors, adapter_config.json)
            run.json                task, method, seed, config, metrics, timings
            curve.json              training curve: step, loss, lr, sigma

A run is built in a hidden sibling folder ``.seed<k>.tmp-<pid>`` and renamed into place when complete,
so a run folder with ``run.json`` is always whole; an interrupted compare leaves only temp folders, which
the next compare removes before re-running exactly the runs that are missing. A ``run.json`` damaged later
(truncated by a full disk or a partial copy) makes its run unfinished: compare re-runs it, and every reader
names the file in its error. The JSON files are strict JSON: an undefined number (nan) is written as
``null`` (`flatlora._jsonio`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .._checks import check_count
from .._jsonio import TMP_MARK, read_json, write_text_atomic
from .._jsonio import write_json as write_json_atomic

RUN_FILE = "run.json"
CURVE_FILE = "curve.json"
ADAPTER_DIR = "adapter"


def run_file_error(run_dir: str | Path) -> str | None:
    """Why ``run_dir``'s ``run.json`` is there but unusable (not readable JSON, not an object), else ``None``
    (also when there is no ``run.json``: that run is simply unfinished)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = read_json(path)
    except ValueError as exc:
        return str(exc)
    if not isinstance(info, dict):
        return f"{str(path)!r} holds a JSON {type(info).__name__}, not an object"
    return None


def is_finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a readable ``run.json`` (a truncated or damaged one means: not finished)."""
    return (Path(run_dir) / RUN_FILE).is_file() and run_file_error(run_dir) is None


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``final``; rename it to ``final`` if the body succeeds, else delete it."""
    final = Path(final)
    if final.exists():
        if is_finished(final):
            raise ValueError(f"run folder {final} is already finished; delete it to run it again")
        shutil.rmtree(final)  # an unfinished folder (not written by us): replace it
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, final)


def clean_stale(root: str | Path) -> list[Path]:
    """Remove temp folders and files left by an interrupted compare under ``root``; returns what was removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in sorted(root.rglob(f"*{TMP_MARK}*"), key=lambda q: len(q.parts), reverse=True):
        if p.name.startswith(".") and p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def find_runs(root: str | Path) -> list[Path]:
    """Finished run folders under a compare folder (or ``[root]`` if ``root`` is itself a run), sorted."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{str(root)!r} does not exist; pass a folder written by `flatlora compare`")
    if is_finished(root):
        return [root]
    found = [p.parent for p in root.rglob(RUN_FILE)
             if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found)


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The ``run.json`` of a finished run; a missing or damaged one is a ``ValueError`` naming the file."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a finished run (no {RUN_FILE}); list runs with find_runs(root)")
    try:
        info = read_json(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; re-running the `flatlora compare` that wrote it redoes that run") from None
    if not isinstance(info, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(info).__name__}, not an object; re-running the "
                         "`flatlora compare` that wrote it redoes that run")
    return info


@dataclass
class LoadedRun:
    """A finished run, ready for analysis (sharpness, loss landscapes).

    ``model``: the backbone with the trained adapter (a ``PeftModel``, eval mode, CPU, fp32);
    ``loss_fn(model, batch)``: mean loss of one batch, a scalar tensor; ``batches``: a bounded,
    deterministic list of training-split batches (the first ``n_batches * batch_size`` examples of the
    run's training split, in stored order); ``label``: e.g. ``"flat-lora/seed0"``; ``info``: run.json.
    """

    model: nn.Module
    loss_fn: Callable[[nn.Module, dict], torch.Tensor]
    batches: list[dict[str, torch.Tensor]]
    label: str
    info: dict[str, Any] = field(default_factory=dict)


def load_run(run_dir: str | Path, n_batches: int = 8, batch_size: int = 32) -> LoadedRun:
    """Rebuild a finished run: backbone from the offline assets + the saved adapter (no training)."""
    from peft import PeftModel

    from .config import ExperimentConfig
    from .tasks import get_task

    check_count("n_batches", n_batches)
    check_count("batch_size", batch_size)
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    missing = sorted({"config", "seed", "label"} - set(info))
    if missing:
        raise ValueError(f"{str(run_dir / RUN_FILE)!r} lacks {', '.join(missing)}: not a run.json written by "
                         "`flatlora compare`")
    try:
        cfg = ExperimentConfig.from_dict(info["config"])
    except ValueError as exc:
        raise ValueError(f"{str(run_dir / RUN_FILE)!r}: its config is not valid here: {exc}") from None
    task = get_task(cfg.task)
    base = task.build_model(cfg, int(info["seed"]))
    model = PeftModel.from_pretrained(base, str(run_dir / ADAPTER_DIR), is_trainable=False)
    model.eval()
    train = task.run_splits(cfg).train.head(n_batches * batch_size)
    batches = [task.collate(chunk, cfg) for chunk in train.chunks(batch_size)]
    # plain cross-entropy: the loss whose landscape analysis measures (AdaLoRA's orthogonality penalty is a
    # training regulariser, and PEFT's AdaLoRA cannot compute it on an adapter loaded for inference)
    return LoadedRun(model=model, loss_fn=task.ce_loss, batches=batches, label=info["label"], info=info)


def split_set_name(name: str) -> tuple[str, str]:
    """``"contrast@3"`` -> ``("contrast", "3")`` (a corrupted vision set); any other OOD set name -> ``(name, "")``."""
    kind, at, sev = name.rpartition("@")
    return (kind, sev) if at and sev.isdigit() else (name, "")


__all__ = ["LoadedRun", "atomic_dir", "clean_stale", "find_runs", "is_finished", "load_run", "read_json",
           "read_run", "run_file_error", "split_set_name", "write_json_atomic", "write_text_atomic"]

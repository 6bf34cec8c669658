"""`compare`: run every (method, rank, seed) of a config into one run folder, resumably, then report.

Finished runs (folders with a readable ``run.json``) are never re-run; a run whose ``run.json`` cannot be
read (e.g. truncated) is re-run, with a warning naming the file; temp folders of an interrupted compare are
removed and their runs started afresh. The folder's ``config.yaml`` pins everything that changes results:
resuming with a different training setup is refused (only methods, seeds, ranks, device, threads and the
report's also_against may change, which adds or selects runs).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .config import ExperimentConfig
from .runs import RUN_FILE, clean_stale, is_finished, run_file_error

# fields that select which runs exist (or where they run), not what a run computes
_FREE_FIELDS = {"name", "preset", "methods", "seeds", "ranks", "device", "threads", "also_against"}


def default_root(cfg: ExperimentConfig) -> Path:
    return Path("runs") / cfg.name


def check_resumable(root: Path, cfg: ExperimentConfig) -> None:
    path = root / "config.yaml"
    if not path.is_file():
        return
    old = ExperimentConfig.load(path).to_dict()
    new = cfg.to_dict()
    diff = {k: (old[k], new[k]) for k in new if k not in _FREE_FIELDS and old.get(k) != new[k]}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{root} holds runs of a different setup ({changes}); pass --out NEW_FOLDER, "
                         "or delete the folder to start over")


class _NotForConsole(logging.Filter):
    """Drop records logged with ``extra={"file_only": True}`` (the result tables: the CLI prints them to stdout)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def _logger(root: Path, echo: bool) -> logging.Logger:
    """Log to ``root/log.txt`` and to stderr (everything with ``echo``, else warnings only: never silent)."""
    log = logging.getLogger(f"flatlora.compare.{root.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fh = logging.FileHandler(root / "log.txt")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    sh.setLevel(logging.INFO if echo else logging.WARNING)
    sh.addFilter(_NotForConsole())
    log.addHandler(sh)
    return log


def plan_text(cfg: ExperimentConfig) -> str:
    """What the config will run, in words (printed before a compare starts)."""
    from .methods import alora_config, get_method
    from .tasks import get_task
    from .train import SHARPNESS_BATCH, total_steps

    task = get_task(cfg.task)
    splits = task.run_splits(cfg)
    steps = total_steps(cfg, len(splits.train))
    n_ood = {k: len(v) for k, v in splits.ood.items()}
    alora = ""
    if any(get_method(m).init == "alora" for m in cfg.methods):
        rounds = alora_config(1, steps, math.ceil(len(splits.train) / cfg.batch_size), 0).round_steps()
        alora = (f"\n  alora: r open of 2r slots per module, {len(rounds)} reallocation round(s)"
                 + (f" after steps {', '.join(map(str, rounds))}" if rounds else ""))
    return (f"preset {cfg.preset!r}, task {cfg.task} ({task.description})\n"
            f"  {len(splits.train)} training examples, {steps} steps of batch {cfg.batch_size} "
            f"({'max_steps' if cfg.max_steps else f'{cfg.epochs:g} epochs'}), test {len(splits.test)}, "
            f"OOD {sum(n_ood.values())} over {len(n_ood)} set(s)\n"
            f"  methods {', '.join(cfg.methods)} x ranks {cfg.ranks} x seeds {cfg.seeds} "
            f"= {len(cfg.run_labels())} runs; flat-lora rho {', '.join(f'{r:g}' for r in cfg.flat_rhos())}, "
            f"lora-sam rho {cfg.sam_rho}, sam-w rho {cfg.sam_w_rho}, lr {cfg.lr}"
            + (f"\n  bi-lora rho {cfg.bi_lora_rho} ({cfg.bi_lora_norm} norm)" if "bi-lora" in cfg.methods else "")
            + (f"\n  eflat-lora rho {cfg.eflat_rho} ({cfg.eflat_schedule}, {cfg.eflat_norm} norm), beta "
               f"{cfg.eflat_beta}" if "eflat-lora" in cfg.methods else "")
            + alora
            + (f"\n  label noise: {cfg.label_noise:g} of the training labels" if cfg.label_noise else "")
            + (f"\n  flatness measured after training on {cfg.sharpness_batches} x {SHARPNESS_BATCH} training examples"
               if cfg.sharpness_batches else ""))


def compare(cfg: ExperimentConfig, out: str | Path | None = None, progress: bool = True,
            echo: bool = True) -> dict[str, Any]:
    """Run (or resume) the comparison ``cfg`` into ``out`` (default ``./runs/<name>``); returns results.json.

    The plan, progress and log go to stderr (with ``echo``; warnings always) and to ``log.txt``; the result
    table is written to ``table.md`` and ``log.txt`` and returned as ``results["table"]``, not logged to stderr.
    """
    from .report import write_report
    from .train import train_run

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(out) if out is not None else default_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    check_resumable(root, cfg)
    stale = clean_stale(root)
    cfg.save(root / "config.yaml")
    log = _logger(root, echo)
    if stale:
        log.info(f"removed {len(stale)} unfinished temp folder(s) of an interrupted compare")
    log.info(f"flatlora compare -> {root}\n" + plan_text(cfg))
    labels = cfg.run_labels()
    for _, _, _, rel, _ in labels:
        problem = run_file_error(root / rel)
        if problem is not None:
            log.warning(f"warning: {root / rel / RUN_FILE} is unreadable ({problem}); the run {rel} will be re-run")
    todo = [lab for lab in labels if not is_finished(root / lab[3])]
    if len(todo) < len(labels):
        log.info(f"resuming: {len(labels) - len(todo)} of {len(labels)} runs already finished, skipped")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="runs", unit="run", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            for method, rank, seed, rel, rho in todo:
                train_run(cfg, method, rank, seed, root / rel, progress=progress, log=log.info, rho=rho)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if todo:
        log.info(f"{len(todo)} run(s) took {time.perf_counter() - t0:.0f} s")
    results = write_report(root, cfg)
    log.info("\n" + results["table"], extra={"file_only": True})
    log.info(f"wrote {root / 'table.md'}, {root / 'results.json'}, " + ", ".join(Path(p).name for p in results["plots"]))
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    return results


__all__ = ["check_resumable", "compare", "default_root", "plan_text"]

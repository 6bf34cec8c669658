"""The diagnostics on finished experiment runs (what ``flatlora sharpness`` / ``flatlora landscape`` call).

A path is a run folder (``<compare>/<method>/seed<k>/`` with ``run.json``), a compare folder (every finished
run under it, via ``flatlora.experiments.find_runs``) or a run's ``adapter/`` folder. Each run is rebuilt by
``flatlora.experiments.load_run`` (backbone + saved adapter + the first training batches, eval mode) and
measured with the same settings and seeds, one run at a time. Results go to ``out`` (default: the first
path): ``sharpness.{json,md,png}``, ``landscape.json``, ``landscape_1d.{csv,png}``, ``landscape_2d.{csv,png}``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .._jsonio import as_float, dumps, write_text_atomic
from .._stats import mean, stderr
from .config import LandscapeConfig, SharpnessConfig


def resolve_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders named by ``paths`` (runs, compare folders, or adapter folders of runs), in order, no repeats."""
    from ..experiments import find_runs
    from ..experiments.runs import read_run

    if not paths:
        raise ValueError("no run given; pass a run folder or a compare folder written by `flatlora compare`")
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "adapter_config.json").is_file():
            if not (p.parent / "run.json").is_file():
                raise ValueError(
                    f"{str(p)!r} is a PEFT adapter outside an experiment run: the commands need the run's "
                    "run.json for its backbone, data and loss; call flatlora.analysis functions on your own "
                    "model and loss instead")
            p = p.parent
        runs = find_runs(p)
        if not runs:
            raise ValueError(f"no finished run (run.json) under {str(p)!r}")
        found += [r for r in runs if r not in found]
    for run in found:  # a damaged run.json stops the command before any measurement, naming the file
        read_run(run)
    return found


def default_out(paths: Sequence[str | Path]) -> Path:
    p = Path(paths[0])
    return p.parent if (p / "adapter_config.json").is_file() else p


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}"


# --- sharpness -------------------------------------------------------------------------------------------
def sharpness_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `measure_sharpness` rows (``SharpnessReport.to_dict()`` plus ``method``), with
    per-method means (+- standard error over runs) when a method has several runs."""
    if not rows:
        return ""
    r0 = rows[0]
    head = (f"| run | loss | E-sharpness rho={r0['expected']['rho']:g} (+- s.e.) "
            f"| SAM full W rho={r0['sam_full']['rho']:g} | SAM LoRA (A,B) | full - LoRA | top eig. H_W (residual) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h = r["hessian"]
        eig = "-" if h is None else f"{_fmt(h['value'])} ({_fmt(h['residual'], 2)})"
        lines.append(f"| {r['label']} | {_fmt(r['loss'])} | {_fmt(r['expected']['sharpness'])} +- "
                     f"{_fmt(r['expected']['stderr'], 2)} | {_fmt(r['sam_full']['sharpness'])} | "
                     f"{_fmt(r['sam_lora']['sharpness'])} | {_fmt(r['sam_gap'])} | {eig} |")
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r.get("method") or r["label"].split("/")[0], []).append(r)
    for method, group in methods.items():
        if len(group) < 2:
            continue
        cols = [[g["loss"] for g in group], [g["expected"]["sharpness"] for g in group],
                [g["sam_full"]["sharpness"] for g in group], [g["sam_lora"]["sharpness"] for g in group],
                [g["sam_gap"] for g in group],
                [g["hessian"]["value"] for g in group if g["hessian"] is not None]]
        cells = [_mean_se(c) for c in cols]
        lines.append(f"| **{method}** (mean of {len(group)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_se(values: list[float | None]) -> str:
    values = [as_float(v) for v in values]  # None: undefined (nan) in to_dict()
    if not values:
        return "-"
    if len(values) < 2:
        return _fmt(mean(values))
    return f"{_fmt(mean(values))} +- {_fmt(stderr(values), 2)}"


def measure_sharpness(paths: Sequence[str | Path], cfg: SharpnessConfig | None = None, out: str | Path | None = None,
                      progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """`sharpness_report` of every run; writes ``sharpness.json``, ``sharpness.md`` and ``sharpness.png``."""
    from ..experiments import load_run
    from .plots import plot_sharpness
    from .sharpness import sharpness_report

    cfg = cfg or SharpnessConfig()
    runs = resolve_runs(paths)
    out = Path(out) if out is not None else default_out(paths)
    rows, reports = [], []
    for run_dir in runs:
        run = load_run(run_dir, n_batches=cfg.batches, batch_size=cfg.batch_size)
        rep = sharpness_report(run.model, run.loss_fn, run.batches, label=run.label, rho=cfg.rho,
                               n_samples=cfg.samples, sam_rho=cfg.sam_rho, seed=cfg.seed,
                               hessian_iters=cfg.hessian_iters, hessian_batches=cfg.hessian_batches,
                               progress=progress, hessian_hvp=cfg.hessian_hvp)
        reports.append(rep)
        rows.append({**rep.to_dict(), "method": run.info.get("method"), "run_dir": str(run_dir),
                     "n_examples": sum(_batch_len(b) for b in run.batches)})
        del run
    files = {
        "json": write_text_atomic(out / "sharpness.json", dumps({"config": cfg.to_dict(), "runs": rows})),
        "md": write_text_atomic(out / "sharpness.md", sharpness_table(rows)),
        "png": plot_sharpness(reports, out / "sharpness.png",
                              title=f"sharpness on {rows[0]['n_examples']} training examples"),
    }
    return rows, files


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict) and "labels" in batch:
        return len(batch["labels"])
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return len(first)


# --- landscapes ------------------------------------------------------------------------------------------
def landscape_table(curves: list) -> str:
    """Markdown: per run and space, the loss at the centre and its rise (mean of both sides) at the grid point
    nearest to half the span and at the ends, and the largest rise over the grid."""
    if not curves:
        return ""
    c0 = curves[0]
    mid = len(c0.losses) // 2
    half = mid + (mid + 1) // 2
    lines = [f"| run | space | loss at 0 | rise at +-{c0.alphas[half]:g} | rise at +-{c0.alphas[-1]:g} | max rise |",
             "|---|---|---:|---:|---:|---:|"]
    for c in curves:
        n, mid = len(c.losses), len(c.losses) // 2
        half = mid + (mid + 1) // 2
        half_rise = (c.losses[half] + c.losses[n - 1 - half]) / 2 - c.center_loss
        end_rise = (c.losses[0] + c.losses[n - 1]) / 2 - c.center_loss
        lines.append(f"| {c.label} | {c.space} | {_fmt(c.center_loss)} | {_fmt(half_rise)} | {_fmt(end_rise)} | "
                     f"{_fmt(max(c.losses) - c.center_loss)} |")
    return "\n".join(lines) + "\n"


def measure_landscapes(paths: Sequence[str | Path], cfg: LandscapeConfig | None = None,
                       out: str | Path | None = None, progress: bool = True) -> tuple[list, list, dict[str, Path]]:
    """1-D (and with ``cfg.two_d`` 2-D) landscapes of every run in every space of ``cfg.spaces``; writes
    ``landscape.json``, ``landscape_1d.csv/png`` (all runs on one figure) and ``landscape_2d.csv/png``."""
    from ..experiments import load_run
    from .landscape import loss_landscape_1d, loss_landscape_2d
    from .plots import plot_landscapes_1d, plot_landscapes_2d

    cfg = cfg or LandscapeConfig()
    runs = resolve_runs(paths)
    out = Path(out) if out is not None else default_out(paths)
    curves, surfaces = [], []
    for run_dir in runs:
        run = load_run(run_dir, n_batches=cfg.batches, batch_size=cfg.batch_size)
        for space in cfg.spaces:
            curves.append(loss_landscape_1d(run.model, run.loss_fn, run.batches, space=space, span=cfg.span,
                                            steps=cfg.steps, seed=cfg.seed, label=run.label, progress=progress))
            if cfg.two_d:
                surfaces.append(loss_landscape_2d(run.model, run.loss_fn, run.batches, space=space, span=cfg.span,
                                                  steps=cfg.steps_2d, seed=cfg.seed, label=run.label,
                                                  progress=progress))
        del run
    data = {"config": cfg.to_dict(), "one_d": [c.to_dict() for c in curves], "two_d": [s.to_dict() for s in surfaces]}
    files = {"json": write_text_atomic(out / "landscape.json", dumps(data)),
             "csv": write_text_atomic(out / "landscape_1d.csv", _concat_csv([c.to_csv() for c in curves])),
             "md": write_text_atomic(out / "landscape.md", landscape_table(curves)),
             "png": plot_landscapes_1d(curves, out / "landscape_1d.png",
                                       title="loss along a filter-normalised random direction")}
    if surfaces:
        files["csv_2d"] = write_text_atomic(out / "landscape_2d.csv", _concat_csv([s.to_csv() for s in surfaces]))
        files["png_2d"] = plot_landscapes_2d(surfaces, out / "landscape_2d.png")
    return curves, surfaces, files


def _concat_csv(parts: list[str]) -> str:
    """One header, then the rows of every part."""
    if not parts:
        return ""
    lines = parts[0].splitlines(keepends=True)
    for p in parts[1:]:
        lines += p.splitlines(keepends=True)[1:]
    return "".join(lines)


__all__ = ["default_out", "landscape_table", "measure_landscapes", "measure_sharpness", "resolve_runs",
           "sharpness_table"]

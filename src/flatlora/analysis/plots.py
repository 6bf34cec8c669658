"""Matplotlib figures of the diagnostics (PNG, Agg backend), several runs per figure.

* `plot_landscapes_1d`: one panel per space (full, LoRA), one curve per run: LoRA and Flat-LoRA overlay.
* `plot_landscapes_2d`: a grid of contour plots (rows = runs, columns = spaces) with shared levels.
* `plot_sharpness`: grouped bars of expected sharpness (+- standard error) and SAM sharpness (full, LoRA)
  per run, and the top Hessian eigenvalue (+- residual) when measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .._extras import require
from .landscape import Landscape1D, Landscape2D
from .sharpness import SharpnessReport

_SPACE_TITLE = {"full": "full space (merged W)", "lora": "LoRA space (A, B)"}


def _pyplot():
    require("matplotlib", "the diagnostics' figures").use("Agg", force=False)
    return require("matplotlib.pyplot", "the diagnostics' figures")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path {str(path)!r} must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _spaces(items: Sequence) -> list[str]:
    return [s for s in ("full", "lora") if any(x.space == s for x in items)]


def plot_landscapes_1d(curves: Sequence[Landscape1D], path: str | Path, title: str | None = None) -> Path:
    """Curves (their ``label`` names the run) in one panel per space; returns the PNG path."""
    if not curves:
        raise ValueError("no landscapes to plot")
    plt = _pyplot()
    spaces = _spaces(curves)
    fig, axes = plt.subplots(1, len(spaces), figsize=(5.2 * len(spaces), 3.8), squeeze=False, layout="constrained")
    labels = list(dict.fromkeys(c.label for c in curves))
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    for ax, space in zip(axes[0], spaces):
        for c in (c for c in curves if c.space == space):
            ax.plot(c.alphas, c.losses, marker="o", ms=3, color=colors[c.label], label=c.label or None)
        ax.set_title(_SPACE_TITLE[space])
        ax.set_xlabel("step along filter-normalised direction (alpha)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if any(c.label for c in curves if c.space == space):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_landscapes_2d(surfaces: Sequence[Landscape2D], path: str | Path, title: str | None = None,
                       levels: int = 15) -> Path:
    """Contour plots, one row per run and one column per space, sharing colour levels per space."""
    if not surfaces:
        raise ValueError("no landscapes to plot")
    import numpy as np

    plt = _pyplot()
    spaces = _spaces(surfaces)
    labels = list(dict.fromkeys(s.label for s in surfaces))
    fig, axes = plt.subplots(len(labels), len(spaces), figsize=(5.2 * len(spaces), 4.2 * len(labels)),
                             squeeze=False, layout="constrained")
    for j, space in enumerate(spaces):
        group = [s for s in surfaces if s.space == space]
        lo = min(min(map(min, s.losses)) for s in group)
        hi = max(max(map(max, s.losses)) for s in group)
        lv = np.linspace(lo, hi if hi > lo else lo + 1e-12, levels)
        for i, lab in enumerate(labels):
            ax = axes[i][j]
            found = [s for s in group if s.label == lab]
            if not found:
                ax.axis("off")
                continue
            s = found[0]
            z = np.array(s.losses).T  # rows = betas (y), columns = alphas (x)
            cs = ax.contourf(s.alphas, s.betas, z, levels=lv, cmap="viridis")
            ax.contour(s.alphas, s.betas, z, levels=lv, colors="k", linewidths=0.3)
            ax.plot([0], [0], "r+", ms=10)
            ax.set_title(f"{lab}: {_SPACE_TITLE[space]}" if lab else _SPACE_TITLE[space], fontsize=9)
            ax.set_xlabel("alpha (direction 1)")
            ax.set_ylabel("beta (direction 2)")
            fig.colorbar(cs, ax=ax, label="loss")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_sharpness(reports: Sequence[SharpnessReport], path: str | Path, title: str | None = None) -> Path:
    """Grouped bars per run: expected sharpness, SAM sharpness (full, LoRA); a second panel for the Hessian."""
    if not reports:
        raise ValueError("no sharpness reports to plot")
    import numpy as np

    plt = _pyplot()
    with_hessian = any(r.hessian is not None for r in reports)
    fig, axes = plt.subplots(1, 2 if with_hessian else 1, figsize=(6 + 4 * with_hessian, 4.2), squeeze=False,
                             layout="constrained")
    ax = axes[0][0]
    x = np.arange(len(reports))
    width = 0.27
    exp = [r.expected.sharpness for r in reports]
    err = [r.expected.stderr if r.expected.stderr == r.expected.stderr else 0.0 for r in reports]
    ax.bar(x - width, exp, width, yerr=err, capsize=3,
           label=f"expected, rho={reports[0].expected.rho:g} (+- s.e.)")
    ax.bar(x, [r.sam_full.sharpness for r in reports], width, label=f"SAM full W, rho={reports[0].sam_full.rho:g}")
    ax.bar(x + width, [r.sam_lora.sharpness for r in reports], width,
           label=f"SAM LoRA (A, B), rho={reports[0].sam_lora.rho:g}")
    ax.set_xticks(x, [r.label for r in reports], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("loss increase")
    ax.grid(axis="y", alpha=0.3)
    ax.axhline(0.0, color="k", lw=0.6)
    fig.legend(fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    if with_hessian:
        ax2 = axes[0][1]
        vals = [r.hessian.value if r.hessian is not None else np.nan for r in reports]
        res = [r.hessian.residual if r.hessian is not None else 0.0 for r in reports]
        ax2.bar(x, vals, 0.5, yerr=res, capsize=3, color="C4")
        ax2.set_xticks(x, [r.label for r in reports], rotation=20, ha="right", fontsize=8)
        ax2.set_ylabel("top Hessian eigenvalue (merged W)")
        ax2.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


__all__ = ["plot_landscapes_1d", "plot_landscapes_2d", "plot_sharpness"]

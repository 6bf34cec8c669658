"""The PNG figures of a compare folder, drawn from its results.json dict (and the runs' curve.json files).

* ``accuracy.png``: per method, mean and 95% CI of in-domain and OOD accuracy, seeds as dots;
* ``curves.png``: training loss (moving average, mean over seeds);
* ``paired.png``: paired differences with 95% CIs;
* ``severity.png`` (vision): accuracy against corruption severity; ``gain_severity.png``: the paired OOD gain of
  each Flat-LoRA method per corruption type and severity, with 95% CIs;
* ``gain_rho.png`` (a rho sweep): the paired gain of each Flat-LoRA method against rho, with 95% CIs;
* ``sharpness.png`` (runs that measured flatness): in-domain and OOD accuracy against expected sharpness and
  against the top Hessian eigenvalue, one dot per run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .._extras import require
from .._jsonio import as_float
from .._stats import mean
from .runs import CURVE_FILE, read_json, split_set_name


def plot_all(root: Path, results: dict[str, Any], runs: dict[str, list[dict]]) -> list[Path]:
    require("matplotlib", "flatlora compare's figures").use("Agg")
    plt = require("matplotlib.pyplot", "flatlora compare's figures")

    out = [_plot_accuracy(plt, root, results), _plot_curves(plt, root, runs)]
    if any(m["ood_groups"] for m in results["methods"].values()):
        out.append(_plot_severity(plt, root, results))
    if results["paired"]:
        out.append(_plot_paired(plt, root, results))
    if any(split_set_name(k)[1] for p in results["paired"] for k in p.get("ood_set_diffs") or {}):
        out.append(_plot_gain_severity(plt, root, results))
    if len({m["rho"] for m in results["methods"].values() if m.get("flat_rho_sweep")}) > 1:
        out.append(_plot_gain_rho(plt, root, results))
    if any(r["metrics"].get("flatness") for rs in runs.values() for r in rs):
        out.append(_plot_sharpness(plt, root, runs))
    return out


def _err(s: dict) -> tuple[float, float]:
    if not (math.isfinite(s["ci_low"]) and math.isfinite(s["ci_high"])):  # 1 seed, or every seed equal
        return 0.0, 0.0
    return 100 * (s["mean"] - s["ci_low"]), 100 * (s["ci_high"] - s["mean"])


def _plot_accuracy(plt, root: Path, results: dict) -> Path:
    ms = results["methods"]
    labels = list(ms)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 4))
    width = 0.38
    for j, (key, name) in enumerate((("test_accuracy", "in-domain test"), ("ood_accuracy", "out-of-domain"))):
        xs = [i + (j - 0.5) * width for i in range(len(labels))]
        means = [100 * ms[k][key]["mean"] for k in labels]
        errs = list(zip(*[_err(ms[k][key]) for k in labels]))
        ax.bar(xs, means, width, yerr=errs, capsize=4, label=name, alpha=0.75)
        for x, k in zip(xs, labels):
            vals = [100 * v for v in ms[k][key]["values"]]
            ax.plot([x] * len(vals), vals, "k.", ms=4)
    lo = min(100 * min(ms[k][key]["values"]) for k in labels for key in ("test_accuracy", "ood_accuracy"))
    hi = max(100 * max(ms[k][key]["values"]) for k in labels for key in ("test_accuracy", "ood_accuracy"))
    ax.set_ylim(max(0, lo - 5), min(100, hi + 3))
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['task']}: accuracy, mean and 95% CI over seeds (dots: seeds)")
    ax.legend()
    return _save(plt, fig, root / "accuracy.png")


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write ``path`` at 110 dpi and close the figure (pyplot keeps open figures alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_severity(plt, root: Path, results: dict) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, m in results["methods"].items():
        groups = list(m["ood_groups"])
        xs = [0] + [int(g.split()[-1]) for g in groups]
        stats = [m["test_accuracy"]] + [m["ood_groups"][g] for g in groups]
        ys = [100 * s["mean"] for s in stats]
        ax.plot(xs, ys, "o-", label=label)
        if all(math.isfinite(s["ci_low"]) and math.isfinite(s["ci_high"]) for s in stats):
            ax.fill_between(xs, [100 * s["ci_low"] for s in stats], [100 * s["ci_high"] for s in stats], alpha=0.15)
    ax.set_xlabel("corruption severity (0 = clean test set)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy under corruption, mean and 95% CI")
    ax.legend()
    return _save(plt, fig, root / "severity.png")


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _plot_curves(plt, root: Path, runs: dict[str, list[dict]]) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, rs in runs.items():
        curves = [read_json(Path(r["_dir"]) / CURVE_FILE) for r in rs]
        n = min(len(c["loss"]) for c in curves)
        avg = [mean([c["loss"][i] for c in curves]) for i in range(n)]
        k = max(1, n // 20)
        ax.plot(curves[0]["step"][:n], _smooth(avg, k), label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average, mean over seeds)")
    ax.set_title("training curves (flat-lora: loss at the perturbed weights)")
    ax.legend()
    return _save(plt, fig, root / "curves.png")


def _plot_paired(plt, root: Path, results: dict) -> Path:
    rows = [(f"{p['name']}: {metric}", d) for p in results["paired"]
            for metric, d in p["diffs"].items()]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * len(rows)))
    for i, (name, d) in enumerate(rows):
        if math.isfinite(d["low"]) and math.isfinite(d["high"]):
            ax.errorbar(100 * d["mean"], i, xerr=[[100 * (d["mean"] - d["low"])], [100 * (d["high"] - d["mean"])]],
                        fmt="o", capsize=4, color="C0")
        else:
            ax.plot(100 * d["mean"], i, "o", color="C0")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference (percentage points), 95% CI")
    return _save(plt, fig, root / "paired.png")


def _ci_bar(d: dict) -> tuple[list[float], list[float]] | None:
    if not (math.isfinite(d["low"]) and math.isfinite(d["high"])):
        return None
    return [100 * (d["mean"] - d["low"])], [100 * (d["high"] - d["mean"])]


def _plot_gain_severity(plt, root: Path, results: dict) -> Path:
    """Per paired comparison: the OOD gain per corruption type and severity (0 = the clean test set)."""
    pairs = [p for p in results["paired"] if any(split_set_name(k)[1] for k in p.get("ood_set_diffs") or {})]
    cols = min(len(pairs), 4)  # a peer map pairs a dozen methods: rows of four panels
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, pairs):
        kinds: dict[str, list[tuple[int, dict]]] = {}
        for name, d in p["ood_set_diffs"].items():
            kind, sev = split_set_name(name)
            if sev:
                kinds.setdefault(kind, []).append((int(sev), d))
        groups = [(int(g.split()[-1]), p["diffs"][f"ood {g}"]) for g in
                  (k[len("ood "):] for k in p["diffs"] if re.fullmatch(r"ood severity \d+", k))]
        series = list(kinds.items()) + ([("mean over types", groups)] if groups else [])
        for j, (kind, pts) in enumerate(series):
            pts = [(0, p["diffs"]["test_accuracy"])] + sorted(pts, key=lambda t: t[0])
            xs = [x + 0.06 * (j - len(series) / 2) for x, _ in pts]
            style = dict(fmt="o-", capsize=3, lw=2.2) if kind == "mean over types" else dict(fmt="o--", capsize=2)
            bars = [_ci_bar(d) or ([0.0], [0.0]) for _, d in pts]  # an undefined CI (1 seed) draws no bar
            err = [[b[0][0] for b in bars], [b[1][0] for b in bars]]
            ax.errorbar(xs, [100 * d["mean"] for _, d in pts], yerr=err, label=kind, **style)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("corruption severity (0 = clean test set)")
        ax.set_title(p["name"], fontsize=9)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("paired accuracy gain (pp), 95% CI")
    return _save(plt, fig, root / "gain_severity.png")


def _plot_gain_rho(plt, root: Path, results: dict) -> Path:
    """The paired test and OOD gain of each Flat-LoRA method against its rho (one line per method and rank)."""
    ms = results["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    lines: dict[tuple[str, str], list[tuple[float, dict, dict]]] = {}
    for p in results["paired"]:
        m = ms.get(p["method"], {})
        if not m.get("flat_rho_sweep"):
            continue
        key = (m["method"], p["baseline"])
        lines.setdefault(key, []).append((m["rho"], p["diffs"]["test_accuracy"], p["diffs"]["ood_accuracy"]))
    for (method, base), pts in lines.items():
        pts.sort(key=lambda t: t[0])
        for ax, k in zip(axes, (1, 2)):
            line, = ax.plot([t[0] for t in pts], [100 * t[k]["mean"] for t in pts], "o-", label=f"{method} − {base}")
            for t in pts:  # each point's CI on its own: one with an undefined CI (e.g. 1 seed) has no bar
                bar = _ci_bar(t[k])
                if bar is not None:
                    ax.errorbar([t[0]], [100 * t[k]["mean"]], yerr=bar, capsize=4, color=line.get_color())
    for ax, name in zip(axes, ("in-domain test", "out-of-domain")):
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("Flat-LoRA rho")
        ax.set_ylabel(f"paired {name} accuracy gain (pp), 95% CI")
        ax.legend(fontsize=8)
    return _save(plt, fig, root / "gain_rho.png")


def _plot_sharpness(plt, root: Path, runs: dict[str, list[dict]]) -> Path:
    """In-domain (top) and OOD (bottom) accuracy against expected sharpness and against the top Hessian
    eigenvalue, one dot per run."""
    keys = [("expected_sharpness", "expected sharpness E[L(W+E)] - L(W)"),
            ("hessian_top", "top Hessian eigenvalue (W)")]
    keys = [k for k in keys if any((r["metrics"].get("flatness") or {}).get(k[0]) is not None
                                   for rs in runs.values() for r in rs)]
    accs = [("test_accuracy", "test accuracy (%)"), ("ood_accuracy", "OOD accuracy (%)")]
    fig, axes = plt.subplots(len(accs), len(keys), figsize=(5.2 * len(keys), 3.6 * len(accs)), squeeze=False,
                             sharex="col", sharey="row")
    for i, (acc, acc_name) in enumerate(accs):
        for ax, (key, name) in zip(axes[i], keys):
            for label, rs in runs.items():
                pts = [(as_float(r["metrics"]["flatness"].get(key)), 100 * as_float(r["metrics"][acc]))
                       for r in rs if r["metrics"].get("flatness")]
                pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], "o", label=label, alpha=0.8)
            if i == len(accs) - 1:
                ax.set_xlabel(name)
        axes[i][0].set_ylabel(acc_name)
    axes[0][0].legend(fontsize=7)
    n = next(r["metrics"]["flatness"]["n_examples"] for rs in runs.values() for r in rs if r["metrics"].get("flatness"))
    fig.suptitle(f"accuracy vs flatness, one dot per run (flatness on the first {n} training examples)", fontsize=9)
    return _save(plt, fig, root / "sharpness.png")


__all__ = ["plot_all"]

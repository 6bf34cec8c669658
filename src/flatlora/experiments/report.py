"""Summaries of a compare folder: statistics over seeds, the Markdown table, results.json and PNG plots.

Per method (and rank): mean +- sample std over seeds of in-domain test accuracy, out-of-domain accuracy
(per severity for vision), final clean train loss, step time and peak memory. Paired differences
(method - baseline, seed by seed: flat-lora - lora, lora-sam - lora, ..., X+flat - X) with Student-t 95%
confidence intervals and the paired t-test p-value (undefined, shown "n/a", for one seed or when every paired
difference is equal). Accuracies are reported in percent, differences in percentage points (pp).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .._jsonio import as_float
from .config import ExperimentConfig
from .methods import paired_baseline
from .runs import CURVE_FILE, read_json, read_run, write_json_atomic, write_text_atomic
from .stats import mean, mean_ci, paired_diff


def collect(root: str | Path, cfg: ExperimentConfig) -> dict[str, list[dict]]:
    """run.json of every finished run of ``cfg`` under ``root``, grouped by method label, sorted by seed."""
    root = Path(root)
    out: dict[str, list[dict]] = {}
    for method, rank, seed, rel, rho in cfg.run_labels():
        d = root / rel
        if (d / "run.json").is_file():
            info = read_run(d)
            info["_dir"] = str(d)
            out.setdefault(cfg.method_label(method, rank, rho), []).append(info)
    for runs in out.values():
        runs.sort(key=lambda r: r["seed"])
    return out


def _stat(xs: list[float | None]) -> dict[str, float]:
    xs = [as_float(x) for x in xs]  # null in run.json: undefined (nan), e.g. the OOD mean of no OOD set
    ci = mean_ci(xs)
    return {"mean": ci.mean, "std": ci.std, "ci_low": ci.low, "ci_high": ci.high, "n": ci.n, "values": list(xs)}


def summarize(runs: dict[str, list[dict]], cfg: ExperimentConfig) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for label, rs in runs.items():
        m = {
            "method": rs[0]["method"], "rank": rs[0]["rank"], "seeds": [r["seed"] for r in rs],
            "test_accuracy": _stat([r["metrics"]["test_accuracy"] for r in rs]),
            "ood_accuracy": _stat([r["metrics"]["ood_accuracy"] for r in rs]),
            "train_loss": _stat([r["metrics"]["train_loss"] for r in rs]),
            "step_s": _stat([r["timings"]["step_s_mean"] for r in rs]),
            "peak_memory_mib": _stat([r["timings"]["peak_memory_mib"] for r in rs]),
            "train_s": _stat([r["timings"]["train_s"] for r in rs]),
            "ood": {k: _stat([r["metrics"]["ood"][k] for r in rs]) for k in rs[0]["metrics"]["ood"]},
            "ood_groups": {k: _stat([r["metrics"]["ood_groups"][k] for r in rs])
                           for k in rs[0]["metrics"].get("ood_groups", {})},
            "steps": rs[0]["steps"], "n_train": rs[0]["n_train"], "rho": rs[0]["rho"],
        }
        methods[label] = m
    paired = []
    for method, rank, _, _, rho in cfg.run_labels():
        label = cfg.method_label(method, rank, rho)
        base = paired_baseline(method)
        if base is None or base not in cfg.methods or any(p["method"] == label for p in paired):
            continue
        base_label = cfg.method_label(base, rank, rho)
        if label not in runs or base_label not in runs:
            continue
        a = {r["seed"]: r for r in runs[label]}
        b = {r["seed"]: r for r in runs[base_label]}
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        metrics = {"test_accuracy": lambda r: as_float(r["metrics"]["test_accuracy"]),
                   "ood_accuracy": lambda r: as_float(r["metrics"]["ood_accuracy"])}
        for g in a[seeds[0]]["metrics"].get("ood_groups", {}):
            metrics[f"ood {g}"] = lambda r, g=g: as_float(r["metrics"]["ood_groups"][g])
        diffs = {k: paired_diff([f(a[s]) for s in seeds], [f(b[s]) for s in seeds]).to_dict()
                 for k, f in metrics.items()}
        paired.append({"method": label, "baseline": base_label, "seeds": seeds, "diffs": diffs})
    first = next(iter(runs.values()))[0] if runs else {}
    return {"task": cfg.task, "config": cfg.to_dict(), "methods": methods, "paired": paired,
            "n_train": first.get("n_train"), "steps": first.get("steps"),
            "n_test": first.get("metrics", {}).get("n_test"), "n_ood": first.get("metrics", {}).get("n_ood")}


def _pct(s: dict) -> str:
    if s["n"] < 2:
        return f"{100 * s['mean']:.2f}"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def _pp(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:+.2f}"


def table_md(results: dict[str, Any]) -> str:
    """The Markdown tables: per-method means ± std over seeds, severity table (vision), paired differences."""
    ms = results["methods"]
    cfg = results["config"]
    lines = [f"Task `{results['task']}`: {results['n_train']} training examples, {results['steps']} steps "
             f"(batch {cfg['batch_size']}, lr {cfg['lr']}), test n={results['n_test']}, "
             f"OOD n={_ood_n(results)}; mean ± std over seeds.", "",
             "| method | seeds | test acc (%) | OOD acc (%) | train loss | s/step | peak mem (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for label, m in ms.items():
        tl = m["train_loss"]
        tl_s = f"{tl['mean']:.4f}" + (f" ± {tl['std']:.4f}" if tl["n"] > 1 else "")
        lines.append(f"| {label} | {len(m['seeds'])} | {_pct(m['test_accuracy'])} | {_pct(m['ood_accuracy'])} | "
                     f"{tl_s} | {m['step_s']['mean']:.3f} | {m['peak_memory_mib']['mean']:.0f} |")
    groups = next((list(m["ood_groups"]) for m in ms.values() if m["ood_groups"]), [])
    if groups:
        lines += ["", "OOD accuracy (%) per corruption severity (mean over corruption types):", "",
                  "| method | clean | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
        for label, m in ms.items():
            cells = [_pct(m["ood_groups"][g]) for g in groups]
            lines.append(f"| {label} | {_pct(m['test_accuracy'])} | " + " | ".join(cells) + " |")
    if results["paired"]:
        lines += ["", "Paired differences (same seeds, data order and initialisation), percentage points, "
                  "Student-t 95% CI over seeds:", "",
                  "| comparison | metric | mean diff (pp) | 95% CI (pp) | p (paired t) | seeds |",
                  "|---|---|---|---|---|---|"]
        for p in results["paired"]:
            for metric, d in p["diffs"].items():
                ci, pv = _ci_cells(d)
                lines.append(f"| {p['method']} − {p['baseline']} | {metric} | {_pp(d['mean'])} | {ci} | {pv} | "
                             f"{d['n']} |")
    return "\n".join(lines) + "\n"


def _ci_cells(d: dict) -> tuple[str, str]:
    """The CI and p-value cells of a paired difference; 'n/a (why)' where the t-test is undefined."""
    if d["n"] < 2:
        return "n/a (1 seed)", "n/a (1 seed)"
    if math.isnan(d["p_value"]) and d["std"] == 0:
        return "n/a (all paired differences equal)", "n/a (all paired differences equal)"
    return f"[{_pp(d['low'])}, {_pp(d['high'])}]", f"{d['p_value']:.3f}"


def _ood_n(results: dict[str, Any]) -> str:
    n = results.get("n_ood") or {}
    vals = sorted(set(n.values()))
    return "/".join(str(v) for v in vals) + (f" x {len(n)} sets" if len(n) > 1 else "")


def write_report(root: str | Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """Write results.json, table.md and the plots of ``cfg``'s finished runs under ``root``."""
    root = Path(root)
    runs = collect(root, cfg)
    if not runs:
        raise ValueError(f"no finished runs of this config under {root}")
    results = summarize(runs, cfg)
    results["runs"] = {label: [{k: v for k, v in r.items() if k not in ("config", "_dir")} for r in rs]
                       for label, rs in runs.items()}
    results["table"] = table_md(results)
    write_json_atomic(root / "results.json", results)
    write_text_atomic(root / "table.md", results["table"])
    results["plots"] = [str(p) for p in plot_all(root, results, runs)]
    return results


# --- plots -----------------------------------------------------------------------------------------------
def plot_all(root: Path, results: dict[str, Any], runs: dict[str, list[dict]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = [_plot_accuracy(plt, root, results), _plot_curves(plt, root, runs)]
    if any(m["ood_groups"] for m in results["methods"].values()):
        out.append(_plot_severity(plt, root, results))
    if results["paired"]:
        out.append(_plot_paired(plt, root, results))
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
    rows = [(f"{p['method']} − {p['baseline']}: {metric}", d) for p in results["paired"]
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


__all__ = ["collect", "plot_all", "summarize", "table_md", "write_report"]

"""Summaries of a compare folder: statistics over seeds, the Markdown tables, results.json and the plots.

Per method (and rank, and rho in a rho sweep): mean +- sample std over seeds of in-domain test accuracy,
out-of-domain accuracy (per severity for vision), final clean train loss, step time, peak memory, and the
flatness measures when the runs took them. Paired differences (method - baseline, seed by seed: flat-lora -
lora, lora-sam - lora, ..., X+flat - X; then every method against each of the config's ``also_against``, a
pair of different initial adapters marked "different init") with Student-t 95% confidence intervals and the
paired t-test p-value (undefined, shown "n/a", for one seed or when every paired difference is equal): of the
accuracies (percentage points), of every OOD set (vision: per corruption type and severity), of the severity
slope (the least-squares slope of OOD accuracy over severities, pp per level: the paired difference of slopes is
the slope of the gain), and of the flatness measures (in their own units). The figures are drawn by `.plots`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from .._jsonio import as_float
from .config import ExperimentConfig
from .methods import get_method, paired_baseline, uses_flat_rho
from .runs import read_run, split_set_name, write_json_atomic, write_text_atomic
from .stats import mean_ci, paired_diff, slope

# flatness measures of run.json's metrics["flatness"] (see `.train.measure_flatness`), with their table names
FLATNESS = {"expected_sharpness": "expected sharpness", "sam_sharpness_full": "SAM sharpness (W)",
            "sam_sharpness_lora": "SAM sharpness (A, B)", "hessian_top": "top Hessian eigenvalue"}


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


def severity_slope(metrics: dict[str, Any]) -> float:
    """Least-squares slope of a run's OOD accuracy over corruption severity (``ood_groups`` "severity s"), per
    level; nan without at least two severities."""
    pts = [(int(g.split()[-1]), as_float(a)) for g, a in (metrics.get("ood_groups") or {}).items()
           if g.startswith("severity ")]
    return slope([x for x, _ in pts], [y for _, y in pts])


def _flatness(r: dict, key: str) -> float:
    return as_float((r["metrics"].get("flatness") or {}).get(key))


def summarize(runs: dict[str, list[dict]], cfg: ExperimentConfig) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    sweep = len(cfg.flat_rhos()) > 1
    for label, rs in runs.items():
        m = {
            "method": rs[0]["method"], "rank": rs[0]["rank"], "seeds": [r["seed"] for r in rs],
            "test_accuracy": _stat([r["metrics"]["test_accuracy"] for r in rs]),
            "ood_accuracy": _stat([r["metrics"]["ood_accuracy"] for r in rs]),
            "train_loss": _stat([r["metrics"]["train_loss"] for r in rs]),
            "step_s": _stat([r["timings"]["step_s_mean"] for r in rs]),
            "peak_memory_mib": _stat([r["timings"]["peak_memory_mib"] for r in rs]),
            "trainable_params": rs[0].get("trainable_params"),
            "extra_params": {k: rs[0][k] for k in ("reserve_params", "auxiliary_params") if rs[0].get(k)},
            "train_s": _stat([r["timings"]["train_s"] for r in rs]),
            "ood": {k: _stat([r["metrics"]["ood"][k] for r in rs]) for k in rs[0]["metrics"]["ood"]},
            "ood_groups": {k: _stat([r["metrics"]["ood_groups"][k] for r in rs])
                           for k in rs[0]["metrics"].get("ood_groups", {})},
            "steps": rs[0]["steps"], "n_train": rs[0]["n_train"], "rho": rs[0]["rho"],
            "flat_rho_sweep": sweep and uses_flat_rho(rs[0]["method"]),
        }
        if any(r["metrics"].get("flatness") for r in rs):
            m["flatness"] = {k: _stat([_flatness(r, k) for r in rs]) for k in FLATNESS}
            m["flatness_examples"] = next(r["metrics"]["flatness"]["n_examples"] for r in rs
                                          if r["metrics"].get("flatness"))
        if m["ood_groups"]:
            m["severity_slope"] = _stat([severity_slope(r["metrics"]) for r in rs])
        methods[label] = m
    paired: list[dict[str, Any]] = []

    def add(label: str, base_label: str, note: str = "") -> None:
        if label in runs and base_label in runs and label != base_label and not any(  # nor its reverse
                {p["method"], p["baseline"]} == {label, base_label} for p in paired):
            entry = _pair(runs[label], runs[base_label], label, base_label)
            if entry is not None:
                name = f"{label} − {base_label}" + (f" ({note})" if note else "")
                paired.append({"name": name, **entry, **({"note": note} if note else {})})

    labels = list(dict.fromkeys((method, rank, rho, cfg.method_label(method, rank, rho))  # once, not once a seed
                                for method, rank, _, _, rho in cfg.run_labels()))
    for method, rank, rho, label in labels:  # each method against its own baseline (same init)
        base = paired_baseline(method)
        if base is not None and base in cfg.methods:
            add(label, cfg.method_label(base, rank, rho))
    for base in cfg.also_against:  # then every method against each extra baseline (`also_against`)
        for method, rank, rho, label in labels:
            same = get_method(method).init == get_method(base).init
            add(label, cfg.method_label(base, rank, rho), "" if same else "different init")
    first = next(iter(runs.values()))[0] if runs else {}
    return {"task": cfg.task, "config": cfg.to_dict(), "methods": methods, "paired": paired,
            "n_train": first.get("n_train"), "steps": first.get("steps"),
            "n_test": first.get("metrics", {}).get("n_test"), "n_ood": first.get("metrics", {}).get("n_ood")}


def _pair(runs_a: list[dict], runs_b: list[dict], label: str, base_label: str) -> dict[str, Any] | None:
    """Paired differences ``label − base_label`` over their common seeds (None without one)."""
    a = {r["seed"]: r for r in runs_a}
    b = {r["seed"]: r for r in runs_b}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    metrics = {"test_accuracy": lambda r: as_float(r["metrics"]["test_accuracy"]),
               "ood_accuracy": lambda r: as_float(r["metrics"]["ood_accuracy"])}
    for g in a[seeds[0]]["metrics"].get("ood_groups", {}):
        metrics[f"ood {g}"] = lambda r, g=g: as_float(r["metrics"]["ood_groups"][g])
    if a[seeds[0]]["metrics"].get("ood_groups"):
        metrics["ood severity slope (per level)"] = lambda r: severity_slope(r["metrics"])

    def diff(f) -> dict[str, Any]:
        return paired_diff([f(a[s]) for s in seeds], [f(b[s]) for s in seeds]).to_dict()

    entry = {"method": label, "baseline": base_label, "seeds": seeds,
             "diffs": {k: diff(f) for k, f in metrics.items()}}
    sets = list(a[seeds[0]]["metrics"]["ood"])
    if len(sets) > 1:
        entry["ood_set_diffs"] = {k: diff(lambda r, k=k: as_float(r["metrics"]["ood"][k])) for k in sets}
    if all(a[s]["metrics"].get("flatness") and b[s]["metrics"].get("flatness") for s in seeds):
        entry["flatness_diffs"] = {k: diff(lambda r, k=k: _flatness(r, k)) for k in FLATNESS}
    return entry


def fmt_pct(s: dict) -> str:
    """A proportion's mean ± std over seeds (`flatlora.experiments.stats.mean_ci`), in percent."""
    if s["n"] < 2:
        return f"{100 * s['mean']:.2f}"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def fmt_pp(x: float) -> str:
    """A difference of proportions in percentage points, with its sign."""
    return "nan" if math.isnan(x) else f"{100 * x:+.2f}"


def table_md(results: dict[str, Any]) -> str:
    """The Markdown tables: per-method means ± std over seeds, severity table (vision), paired differences."""
    ms = results["methods"]
    cfg = results["config"]
    lines = [f"Task `{results['task']}`: {results['n_train']} training examples, {results['steps']} steps "
             f"(batch {cfg['batch_size']}, lr {cfg['lr']}), test n={results['n_test']}, "
             f"OOD n={_ood_n(results)}; mean ± std over seeds.", "",
             "| method | seeds | test acc (%) | OOD acc (%) | train loss | s/step | peak mem (MiB) "
             "| trainable params |",
             "|---|---|---|---|---|---|---|---|"]
    for label, m in ms.items():
        tl = m["train_loss"]
        tl_s = f"{tl['mean']:.4f}" + (f" ± {tl['std']:.4f}" if tl["n"] > 1 else "")
        lines.append(f"| {label} | {len(m['seeds'])} | {fmt_pct(m['test_accuracy'])} | {fmt_pct(m['ood_accuracy'])} | "
                     f"{tl_s} | {m['step_s']['mean']:.3f} | {m['peak_memory_mib']['mean']:.0f} | "
                     f"{fmt_params(m)} |")
    groups = next((list(m["ood_groups"]) for m in ms.values() if m["ood_groups"]), [])
    if groups:
        lines += ["", "OOD accuracy (%) per corruption severity (mean over corruption types):", "",
                  "| method | clean | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
        for label, m in ms.items():
            cells = [fmt_pct(m["ood_groups"][g]) for g in groups]
            lines.append(f"| {label} | {fmt_pct(m['test_accuracy'])} | " + " | ".join(cells) + " |")
    flat = [(label, m) for label, m in ms.items() if m.get("flatness")]
    measured = [k for k in FLATNESS if any(math.isfinite(m["flatness"][k]["mean"]) for _, m in flat)]
    if flat:  # a measure no run took (e.g. the Hessian with hessian_iters=0) gets no column
        n = flat[0][1]["flatness_examples"]
        lines += ["", f"Flatness after training (first {n} training examples, the same probe draws for every run; "
                  f"expected sharpness at rho {cfg['sharpness_rho']:g}, SAM sharpness at radius "
                  f"{cfg['sharpness_sam_rho']:g}); mean ± std over seeds:", "",
                  "| method | " + " | ".join(FLATNESS[k] for k in measured) + " |", "|---|" + "---|" * len(measured)]
        for label, m in flat:
            lines.append(f"| {label} | " + " | ".join(_num(m["flatness"][k]) for k in measured) + " |")
    if results["paired"]:
        lines += ["", "Paired differences (same seeds, data order and initialisation), percentage points, "
                  "Student-t 95% CI over seeds:", "",
                  "| comparison | metric | mean diff (pp) | 95% CI (pp) | p (paired t) | seeds |",
                  "|---|---|---|---|---|---|"]
        for p in results["paired"]:
            for metric, d in p["diffs"].items():
                ci, pv = ci_cells(d)
                lines.append(f"| {p['name']} | {metric} | {fmt_pp(d['mean'])} | {ci} | {pv} | "
                             f"{d['n']} |")
    lines += _set_diff_table(results["paired"]) + _flatness_diff_table(results["paired"])
    return "\n".join(lines) + "\n"


def fmt_params(m: dict) -> str:
    """``trainable_params`` as the papers count them, with ALoRA's reserve / Bi-LoRA's auxiliary adapter beside."""
    n = m.get("trainable_params")
    if n is None:  # a run.json written before the count was recorded
        return "–"
    extra = "".join(f" (+{v:,} {k.removesuffix('_params')})" for k, v in m.get("extra_params", {}).items())
    return f"{n:,}{extra}"


def _num(s: dict) -> str:
    """mean ± std of a flatness measure, 4 significant digits."""
    if not math.isfinite(s["mean"]):
        return "n/a"
    return f"{s['mean']:.4g}" + (f" ± {s['std']:.2g}" if s["n"] > 1 and math.isfinite(s["std"]) else "")


def _set_diff_table(paired: list[dict]) -> list[str]:
    """Paired OOD gain per corruption type (rows) and severity (columns), pp with the 95% CI."""
    out: list[str] = []
    for p in paired:
        if not p.get("ood_set_diffs"):
            continue
        grid: dict[str, dict[str, dict]] = {}
        for name, d in p["ood_set_diffs"].items():
            kind, sev = split_set_name(name)
            grid.setdefault(kind, {})[sev] = d
        sevs = sorted({s for row in grid.values() for s in row}, key=lambda v: int(v) if v else 0)
        out += ["", f"{p['name']}: paired OOD gain per corruption and severity, pp [95% CI]:", "",
                "| OOD set | " + " | ".join(f"severity {s}" if s else "accuracy" for s in sevs) + " |",
                "|---|" + "---|" * len(sevs)]
        for kind, row in grid.items():
            cells = [f"{fmt_pp(row[s]['mean'])} {ci_cells(row[s])[0]}" if s in row else "" for s in sevs]
            out.append(f"| {kind} | " + " | ".join(cells) + " |")
    return out


def _flatness_diff_table(paired: list[dict]) -> list[str]:
    rows = [(p, k, d) for p in paired for k, d in (p.get("flatness_diffs") or {}).items()
            if d["n"] and not math.isnan(d["mean"])]  # a measure no run took has no row
    if not rows:
        return []
    out = ["", "Paired differences of flatness (method − baseline, in the measure's units; negative = flatter), "
           "Student-t 95% CI over seeds:", "",
           "| comparison | measure | mean diff | 95% CI | p (paired t) | seeds |", "|---|---|---|---|---|---|"]
    for p, k, d in rows:
        ci, pv = ci_cells(d, fmt_units)
        out.append(f"| {p['name']} | {FLATNESS[k]} | {fmt_units(d['mean'])} | {ci} | {pv} | "
                   f"{d['n']} |")
    return out


def ci_cells(d: dict, fmt: Callable[[float], str] = fmt_pp) -> tuple[str, str]:
    """The CI (its ends written by ``fmt``: percentage points by default) and p-value cells of a paired
    difference; 'n/a (why)' where the t-test is undefined."""
    if d["n"] < 2:
        return "n/a (1 seed)", "n/a (1 seed)"
    if math.isnan(d["p_value"]) and d["std"] == 0:
        return "n/a (all paired differences equal)", "n/a (all paired differences equal)"
    return f"[{fmt(d['low'])}, {fmt(d['high'])}]", f"{d['p_value']:.3f}"


def fmt_units(x: float) -> str:
    """A flatness value or difference in its own units, 4 significant digits with its sign."""
    return f"{x:+.4g}"


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
    from .plots import plot_all  # matplotlib only when the figures are drawn

    results["plots"] = [str(p) for p in plot_all(root, results, runs)]
    return results


__all__ = ["FLATNESS", "ci_cells", "collect", "fmt_params", "fmt_pct", "fmt_pp", "fmt_units", "severity_slope", "split_set_name",
           "summarize", "table_md", "write_report"]

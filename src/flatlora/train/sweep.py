"""``flatlora train RECIPE --methods lora flat-lora --seeds 0 1 2``: does Flat-LoRA help on this task?

Every (seed, method) run of one recipe, each in its own folder (`flatlora.train.resolve` keys it on the method,
the seed and the overrides that change the run), then the paired table. Per seed the methods share the data order,
the initialisation of the adapters and head, and every other setting: the only difference is `FlatLoraCallback`.

* A run whose folder holds ``metrics.json`` is finished and skipped; one holding ``checkpoint-N`` folders but no
  ``metrics.json`` was interrupted and resumes from its newest checkpoint (`flatlora.train.runner.resume_point`);
  anything else runs from the start. ``--dry-run`` prints this plan and runs nothing.
* The table, in the format and with the statistics code of ``flatlora compare`` (`flatlora.experiments.report`,
  `flatlora.experiments.stats`): per method the mean ± sample std over seeds of every metric of ``metrics.json``
  (the eval scores and losses, the train loss); then the paired difference flat-lora − lora seed by seed, with its
  Student-t 95% interval and paired t-test p-value, undefined ("n/a") for one seed or when every difference is
  equal. Scores in [0, 1] (accuracy, F1, Matthews correlation, exact match, GSM8K accuracy) are shown in percent
  and percentage points, losses in their own units.
* ``paired.json`` (every value, the per-seed numbers included) and ``table.md`` go to the folder above the
  methods' folders (``runs/train/<recipe>[/<overrides>]/``).
"""

from __future__ import annotations

import gc
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._jsonio import write_json, write_text_atomic
from ..experiments.report import ci_cells, fmt_pct, fmt_pp, fmt_units
from ..experiments.stats import mean_ci, paired_diff
from .recipe import METHODS, Recipe
from .resolve import load_recipe
from .runner import last_checkpoint

BASELINE = "lora"
# metrics.json keys that describe the run, not its result
_NOT_METRICS = {"optimizer_steps", "training_seed", "flat_lora_rho", "flat_lora_seed", "epoch", "total_flos",
                "best_checkpoint_step", "best_metric", "eval_gsm8k_examples"}
_TIMING = re.compile(r"(_runtime|_per_second)$")
_SCORE = re.compile(r"(accuracy|f1|matthews_correlation|exact_match)(_lenient)?$")


@dataclass
class PlannedRun:
    method: str
    seed: int
    recipe: Recipe
    status: str  # "done", "resume from checkpoint-N" or "run"

    @property
    def folder(self) -> Path:
        return Path(self.recipe.output_dir)


def plan(path: str | Path, overrides: list[tuple[str, list[str]]], methods: list[str], seeds: list[int]
         ) -> list[PlannedRun]:
    """The runs of ``methods`` x ``seeds`` (seed-major), each the recipe with ``--method`` and ``--training.seed``
    set; a given ``output_dir`` becomes the root of ``<method>/seed<seed>`` folders."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: {m!r} is not a method; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--methods {' '.join(methods)} --seeds {' '.join(map(str, seeds))}: each method and "
                         "seed once")
    for key, _ in overrides:
        if key in ("method", "training.seed"):
            raise ValueError(f"--{key} with --methods/--seeds: give the methods and seeds as --methods and --seeds")
    root = next((values for key, values in overrides if key == "output_dir"), None)
    rest = [(k, v) for k, v in overrides if k != "output_dir"]
    runs = []
    for seed in seeds:
        for method in methods:
            extra = [("method", [method]), ("training.seed", [str(seed)])]
            if root:
                extra.append(("output_dir", [str(Path(root[0]) / method / f"seed{seed}")]))
            recipe = load_recipe(path, rest + extra)
            out = Path(recipe.output_dir)
            ckpt = last_checkpoint(out)
            status = "done" if (out / "metrics.json").is_file() else \
                f"resume from {ckpt.name}" if ckpt is not None else "run"
            runs.append(PlannedRun(method, seed, recipe, status))
    return runs


def root_of(runs: list[PlannedRun]) -> Path:
    """The folder above the methods' folders (``.../<method>/seed<seed>``)."""
    return runs[0].folder.parent.parent


def plan_text(runs: list[PlannedRun]) -> str:
    lines = [f"{len(runs)} runs ({sum(r.status == 'done' for r in runs)} finished), results in {root_of(runs)}:"]
    for r in runs:
        lines.append(f"  seed {r.seed:<4} {r.method:<10} {r.status:<24} {r.folder}")
    return "\n".join(lines) + "\n"


def run_all(runs: list[PlannedRun]) -> None:
    """Train every run not yet finished, in the plan's order (progress on stderr)."""
    from .runner import train

    for i, r in enumerate(runs, 1):
        if r.status == "done":
            print(f"[{i}/{len(runs)}] {r.method} seed {r.seed}: finished before, skipped ({r.folder})", file=sys.stderr)
            continue
        print(f"[{i}/{len(runs)}] {r.method} seed {r.seed}: {r.status} -> {r.folder}", file=sys.stderr)
        train(r.recipe)
        gc.collect()


def read_metrics(runs: list[PlannedRun]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{method: {seed: metrics.json}}`` of the finished runs."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        f = r.folder / "metrics.json"
        if f.is_file():
            out.setdefault(r.method, {})[r.seed] = json.loads(f.read_text(encoding="utf-8"))
    return out


def metric_names(metrics: list[dict[str, Any]]) -> list[str]:
    """The result metrics every run has: numeric top-level keys, timings and run descriptions left out."""
    def numeric(m: dict[str, Any]) -> set[str]:
        return {k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in _NOT_METRICS and not _TIMING.search(k)}

    common = set.intersection(*(numeric(m) for m in metrics)) if metrics else set()
    first = list(metrics[0]) if metrics else []
    return sorted(common, key=lambda k: (not k.startswith("eval_"), not is_score(k), first.index(k)))


def is_score(name: str) -> bool:
    """A score in [0, 1], shown in percent (differences in percentage points)."""
    return bool(_SCORE.search(name))


def summarize(by_method: dict[str, dict[int, dict[str, Any]]], methods: list[str]) -> dict[str, Any]:
    """Per method: mean, std and t interval over seeds of every metric; the paired differences of each method
    against lora over the seeds both finished."""
    present = [m for m in methods if by_method.get(m)]
    names = metric_names([mt for m in present for mt in by_method[m].values()])
    out: dict[str, Any] = {"metrics": names, "methods": {}, "paired": []}
    for m in present:
        seeds = sorted(by_method[m])
        out["methods"][m] = {"seeds": seeds, "stats": {}}
        for k in names:
            xs = [float(by_method[m][s][k]) for s in seeds]
            ci = mean_ci(xs)
            out["methods"][m]["stats"][k] = {"mean": ci.mean, "std": ci.std, "ci_low": ci.low, "ci_high": ci.high,
                                             "n": ci.n, "values": xs}
    for m in present:
        if m == BASELINE or BASELINE not in present:
            continue
        seeds = sorted(set(by_method[m]) & set(by_method[BASELINE]))
        if not seeds:
            continue
        diffs = {k: paired_diff([float(by_method[m][s][k]) for s in seeds],
                                [float(by_method[BASELINE][s][k]) for s in seeds]).to_dict() for k in names}
        out["paired"].append({"method": m, "baseline": BASELINE, "seeds": seeds, "diffs": diffs})
    return out


def _label(name: str) -> str:
    return name.replace("_", " ")


def _cell(name: str, s: dict[str, Any]) -> str:
    if is_score(name):
        return fmt_pct(s)
    if not math.isfinite(s["mean"]):
        return "n/a"
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["n"] > 1 else "")


def table_md(summary: dict[str, Any], title: str) -> str:
    """The Markdown tables of `summarize` (the layout of ``flatlora compare``)."""
    names = summary["metrics"]
    lines = [f"{title}; mean ± std over seeds.", "",
             "| method | seeds | " + " | ".join(_label(k) + (" (%)" if is_score(k) else "") for k in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for m, entry in summary["methods"].items():
        lines.append(f"| {m} | {len(entry['seeds'])} | " + " | ".join(_cell(k, entry["stats"][k]) for k in names)
                     + " |")
    scores = [k for k in names if is_score(k)]
    others = [k for k in names if not is_score(k)]
    if summary["paired"] and scores:
        lines += ["", "Paired differences (same seeds, data order and initialisation), percentage points, "
                  "Student-t 95% CI over seeds:", "",
                  "| comparison | metric | mean diff (pp) | 95% CI (pp) | p (paired t) | seeds |",
                  "|---|---|---|---|---|---|"]
        for p in summary["paired"]:
            for k in scores:
                d = p["diffs"][k]
                ci, pv = ci_cells(d)
                lines.append(f"| {p['method']} − {p['baseline']} | {_label(k)} | {fmt_pp(d['mean'])} | {ci} | {pv} | "
                             f"{d['n']} |")
    if summary["paired"] and others:
        lines += ["", "Paired differences of losses (method − baseline, in their own units), Student-t 95% CI over "
                  "seeds:", "", "| comparison | metric | mean diff | 95% CI | p (paired t) | seeds |",
                  "|---|---|---|---|---|---|"]
        for p in summary["paired"]:
            for k in others:
                d = p["diffs"][k]
                ci, pv = ci_cells(d, fmt_units)
                lines.append(f"| {p['method']} − {p['baseline']} | {_label(k)} | {fmt_units(d['mean'])} | {ci} | {pv} | "
                             f"{d['n']} |")
    return "\n".join(lines) + "\n"


def report(runs: list[PlannedRun], methods: list[str], name: str) -> str:
    """Summarize the finished runs of recipe ``name``, write ``paired.json`` and ``table.md`` beside them; return
    the table."""
    by_method = read_metrics(runs)
    root = root_of(runs)
    if not by_method:
        raise ValueError(f"no finished runs under {root}")
    summary = summarize(by_method, methods)
    recipe = runs[0].recipe
    table = table_md(summary, f"Recipe `{name}` ({recipe.task.type}, {recipe.model.name_or_path}), runs in {root}")
    folders = {m: {str(r.seed): str(r.folder) for r in runs if r.method == m} for m in methods}
    write_json(root / "paired.json", {**summary, "runs": folders})
    write_text_atomic(root / "table.md", table)
    return table


__all__ = ["PlannedRun", "plan", "plan_text", "report", "run_all", "summarize", "table_md"]

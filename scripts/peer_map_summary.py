"""The peer map's condensed tables (docs/experiments.md), printed as Markdown from a compare's results.json.

    .venv/bin/python scripts/peer_map_summary.py runs/peer-map-vision/results.json

Per method: test and OOD accuracy (mean ± std over seeds), train loss, s/step, parameters; per paired
comparison: test, OOD and severity-slope differences with their 95% CI, the OOD p-value, expected sharpness.
Every number is read from results.json (written by `flatlora compare`); nothing is computed anew.
"""
import json
import sys

from flatlora.experiments.report import ci_cells, fmt_params, fmt_pct, fmt_pp


def _pp(d: dict) -> str:
    """A paired difference in percentage points with its 95% CI, as the report's per-set grid writes it."""
    return f"{fmt_pp(d['mean'])} {ci_cells(d)[0]}"


def _units(d: dict) -> str:
    """A flatness difference, two decimals, with its 95% CI."""
    two = "{:+.2f}".format
    return f"{two(d['mean'])} {ci_cells(d, two)[0]}"


r = json.load(open(sys.argv[1]))
print("| method | seeds | test acc (%) | OOD acc (%) | train loss | s/step | trainable params |")
print("|---|---|---|---|---|---|---|")
for k, m in r["methods"].items():
    print(f"| {k} | {len(m['seeds'])} | {fmt_pct(m['test_accuracy'])} | {fmt_pct(m['ood_accuracy'])} | "
          f"{m['train_loss']['mean']:.4f} | {m['step_s']['mean']:.3f} | {fmt_params(m)} |")
print()
print("| comparison | test (pp) | OOD (pp) | p (OOD) | OOD slope (pp/level) | expected sharpness |")
print("|---|---|---|---|---|---|")
for p in r["paired"]:
    d, f = p["diffs"], p.get("flatness_diffs")
    es = _units(f["expected_sharpness"]) if f else "–"
    print(f"| {p['name']} | {_pp(d['test_accuracy'])} | {_pp(d['ood_accuracy'])} | {d['ood_accuracy']['p_value']:.4f} | "
          f"{_pp(d['ood severity slope (per level)'])} | {es} |")

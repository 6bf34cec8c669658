"""The peer map's condensed tables (docs/experiments.md), printed as Markdown from a compare's results.json.

    .venv/bin/python scripts/peer_map_summary.py runs/peer-map-vision/results.json

Per method: test and OOD accuracy (mean ± std over seeds), train loss, s/step, parameters; per paired
comparison: test, OOD and severity-slope differences with their 95% CI, the OOD p-value, expected sharpness.
Every number is read from results.json (written by `flatlora compare`); nothing is computed anew.
"""
import json
import math
import sys

r = json.load(open(sys.argv[1]))
ms = r["methods"]
def pct(s): return f"{100*s['mean']:.2f} ± {100*s['std']:.2f}"
print("| method | seeds | test acc (%) | OOD acc (%) | train loss | s/step | trainable params |")
print("|---|---|---|---|---|---|---|")
for k, m in ms.items():
    extra = "".join(f" (+{v:,} {n.removesuffix('_params')})" for n, v in m.get("extra_params", {}).items())
    print(f"| {k} | {len(m['seeds'])} | {pct(m['test_accuracy'])} | {pct(m['ood_accuracy'])} | {m['train_loss']['mean']:.4f} | {m['step_s']['mean']:.3f} | {m['trainable_params']:,}{extra} |")
print()
def cell(d, scale=100, fmt="{:+.2f}"):
    if d["n"] < 2 or not math.isfinite(d["low"]): return fmt.format(scale*d["mean"])
    return f"{fmt.format(scale*d['mean'])} [{fmt.format(scale*d['low'])}, {fmt.format(scale*d['high'])}]"
print("| comparison | test (pp) | OOD (pp) | p (OOD) | OOD slope (pp/level) | expected sharpness |")
print("|---|---|---|---|---|---|")
for p in r["paired"]:
    d = p["diffs"]; f = p.get("flatness_diffs", {})
    es = cell(f["expected_sharpness"], 1, "{:+.2f}") if f else "–"
    print(f"| {p['name']} | {cell(d['test_accuracy'])} | {cell(d['ood_accuracy'])} | {d['ood_accuracy']['p_value']:.4f} | {cell(d['ood severity slope (per level)'])} | {es} |")

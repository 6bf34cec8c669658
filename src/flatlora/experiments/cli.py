"""``flatlora compare``: flags (generated from `ExperimentConfig`) -> config -> `compare`. Nothing else.

The result tables go to stdout (``flatlora compare > table.md``); the plan, progress and log to stderr."""

from __future__ import annotations

import argparse

from .. import _dataclass_io as dio
from .._extras import require


def register(subparsers) -> None:
    from .config import PRESETS, ExperimentConfig

    p = subparsers.add_parser(
        "compare", help="train LoRA, Flat-LoRA and SAM baselines on an embedded task and compare them",
        description="Train every method x rank x seed of a preset on an embedded offline task, with paired "
                    "seeds, and report accuracy (in-domain and out-of-domain), train loss, step time and memory "
                    "with 95% confidence intervals. Values: preset < --config file < flags. Resumes an "
                    "interrupted run folder. Field defaults shown below are the dataclass's; the chosen preset "
                    "overrides some of them (see --list or --dry-run).")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="starting values (default: ~15 min on a 2-core CPU; small-data; vision; smoke; ...)")
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of ExperimentConfig fields (e.g. a config.yaml)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: ./runs/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, run nothing")
    p.add_argument("--list", action="store_true", help="list tasks, methods and presets, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the log still prints)")
    group = p.add_argument_group("experiment fields (override the preset and --config)")
    dio.add_arguments(group, ExperimentConfig)
    p.set_defaults(func=run_compare)


def resolve(ns: argparse.Namespace):
    """The `ExperimentConfig` of parsed arguments: preset, then --config, then flags."""
    from .config import ExperimentConfig, preset

    values: dict = {}
    if ns.config:
        file_cfg = ExperimentConfig.load(ns.config)
        values.update(file_cfg.to_dict())
        values.pop("preset", None)
    values.update(dio.overrides(ns, ExperimentConfig))
    return preset(ns.preset, **values)


def run_compare(ns: argparse.Namespace) -> int:
    import yaml

    if ns.list:
        from .config import PRESETS
        from .methods import METHODS
        from .tasks import TASKS, get_task

        print("tasks:")
        for t in TASKS:
            task = get_task(t)
            print(f"  {t:14s} {task.description} (default rho {task.default_rho})")
        print("methods:")
        for name, spec in METHODS.items():
            print(f"  {name:14s} {spec.description}")
        print("presets:")
        for name, vals in PRESETS.items():
            print(f"  {name:14s} " + ", ".join(f"{k}={v}" for k, v in vals.items() if k != "name"))
        return 0
    cfg = resolve(ns)
    from .compare import compare, default_root, plan_text

    if ns.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        print(plan_text(cfg))
        print(f"run folder: {ns.out or default_root(cfg)}")
        return 0
    require("matplotlib", "flatlora compare")  # its figures: fail now, not after the runs
    results = compare(cfg, out=ns.out, progress=not ns.no_progress)
    print(results["table"], end="")
    return 0

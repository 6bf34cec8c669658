"""``flatlora sharpness`` and ``flatlora landscape``: flags (generated from the config dataclasses) -> config ->
`flatlora.analysis.runs`. Nothing else; torch, PEFT and the experiment harness are imported inside ``func``."""

from __future__ import annotations

import argparse
import sys

from .. import _dataclass_io as dio

_PATHS_HELP = ("run folders (<compare>/<method>/seed<k>), compare folders (every finished run under them) or a "
               "run's adapter/ folder")


def register(subparsers) -> None:
    from .config import LandscapeConfig, SharpnessConfig

    p = subparsers.add_parser(
        "sharpness", help="flatness of trained runs: expected (Flat-LoRA noise) and SAM sharpness, top Hessian "
                          "eigenvalue, in the full merged-weight space and the LoRA space",
        description="For each run: E[L(W+E)] - L(W) under Flat-LoRA's filter-wise noise (+- standard error), "
                    "L(theta + rho g/|g|) - L(theta) in the full space of merged weights W and in the LoRA space "
                    "(A, B) with their gap, and the top eigenvalue of the Hessian w.r.t. W (Lanczos) with its "
                    "residual. Prints a table; writes sharpness.json, sharpness.md and sharpness.png to --out. "
                    "Nothing is written into the models.",
        )
    _common(p, SharpnessConfig)
    p.set_defaults(func=run_sharpness)

    p = subparsers.add_parser(
        "landscape", help="1-D/2-D loss landscapes of trained runs along filter-normalised random directions",
        description="For each run and space (full merged weights W, LoRA factors A and B): the loss along a "
                    "filter-normalised random direction (Li et al. 2018), the same direction seed for every run, "
                    "so runs overlay on one plot. Writes landscape.json, landscape_1d.csv/png, landscape.md and "
                    "with --two-d landscape_2d.csv/png to --out.",
        )
    _common(p, LandscapeConfig)
    p.set_defaults(func=run_landscape)


def _common(p: argparse.ArgumentParser, cls: type) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_OR_ADAPTER", help=_PATHS_HELP)
    p.add_argument("--config", metavar="FILE", help=f"YAML/JSON file of {cls.__name__} fields (flags override it)")
    p.add_argument("--out", metavar="DIR", help="folder for the results (default: the first path)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    dio.add_arguments(p.add_argument_group(f"{cls.__name__} fields"), cls)


def _resolve(ns: argparse.Namespace, cls: type):
    values = cls.load(ns.config).to_dict() if ns.config else {}
    values.update(dio.overrides(ns, cls))
    return cls.from_dict(values)


def run_sharpness(ns: argparse.Namespace) -> int:
    from .config import SharpnessConfig
    from .runs import measure_sharpness, sharpness_table

    cfg = _resolve(ns, SharpnessConfig)
    rows, files = measure_sharpness(ns.paths, cfg, out=ns.out, progress=not ns.no_progress)
    print(sharpness_table(rows), end="")
    print("wrote " + ", ".join(str(f) for f in files.values()), file=sys.stderr)
    return 0


def run_landscape(ns: argparse.Namespace) -> int:
    from .config import LandscapeConfig
    from .runs import landscape_table, measure_landscapes

    cfg = _resolve(ns, LandscapeConfig)
    curves, _, files = measure_landscapes(ns.paths, cfg, out=ns.out, progress=not ns.no_progress)
    print(landscape_table(curves), end="")
    print("wrote " + ", ".join(str(f) for f in files.values()), file=sys.stderr)
    return 0

"""The ``flatlora`` command: parses arguments and calls the library, nothing else.

Each sub-command lives beside the code it drives and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace; returns an exit code). Modules are imported
only to register their flags: heavy imports happen inside ``func``.

Results (tables, listings) go to stdout, progress and logs to stderr. Bad input (a ``ValueError`` from the
library, e.g. a config file that is missing or malformed) ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._extras import MissingExtraError

# sub-command modules, in the order ``flatlora --help`` lists them
_COMMAND_MODULES = (
    "flatlora.experiments.cli",
    "flatlora.analysis.cli",
    "flatlora.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="flatlora",
        description="Flat-LoRA: LoRA fine-tuning in flat minima of the full weight space.")
    parser.add_argument("--version", action="version", version=f"flatlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, MissingExtraError) as exc:  # bad input or a missing extra: one clear line, no traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"flatlora {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

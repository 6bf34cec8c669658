"""``flatlora train RECIPE.yaml [--section.key value ...] [--dry-run]``: parse, resolve the recipe, call
`flatlora.train.runner.train`. Nothing else.

Results (the metrics as JSON; with ``--dry-run`` the resolved recipe as YAML) go to stdout; the Trainer's progress
and logs go to stderr (its log lines, which it prints to stdout, are sent to stderr while it runs)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap

from .._extras import require

_DESCRIPTION = (
    "Fine-tune a model with LoRA or Flat-LoRA from one YAML recipe, on transformers' Trainer / Seq2SeqTrainer or "
    "TRL's SFTTrainer (several GPUs: accelerate launch -m flatlora train RECIPE.yaml). Every recipe key is also a "
    "flag, --section.key value, and flags override the file. Writes the PEFT adapter, metrics.json, the resolved "
    "recipe and the Trainer's logs to output_dir; prints the metrics (JSON) to stdout.")


def register(subparsers) -> None:
    # every token after `train` goes to run_train as is (prefix_chars="+": argparse treats none of them as its own
    # options): the recipe keys are open-ended (--lora.<any LoraConfig field>), so they are parsed by the recipe
    p = subparsers.add_parser("train", help="fine-tune a model with LoRA / Flat-LoRA from a YAML recipe",
                              description=_DESCRIPTION, add_help=False, prefix_chars="+",
                              usage="flatlora train RECIPE.yaml [--dry-run] [--methods M ...] [--seeds S ...] "
                                    "[--section.key VALUE ...] (--help: keys)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the recipe file, then --dry-run and recipe keys")
    p.set_defaults(func=run_train)


def help_text() -> str:
    from .resolve import key_help

    options = [("--dry-run", "validate and print the resolved recipe (YAML) to stdout; load and write nothing "
                             "(with --methods/--seeds: print the plan of runs)"),
               ("--methods M [M ...]", "run each method (lora, flat-lora; default both) on each seed and print the "
                                       "paired table: mean ± std per method, flat-lora − lora with its Student-t 95% "
                                       "CI and p-value (as flatlora compare); finished runs are skipped, interrupted "
                                       "ones resume from their newest checkpoint"),
               ("--seeds S [S ...]", "the training seeds of --methods (default: the recipe's training.seed)"),
               ("-h, --help", "show this help")]
    lines = ["usage: flatlora train RECIPE.yaml [--dry-run] [--methods M ...] [--seeds S ...] "
             "[--section.key VALUE ...]", "", textwrap.fill(_DESCRIPTION, 100), "", "options:"]
    for flag, text in options:
        lines.append(textwrap.fill(text, 100, initial_indent=f"  {flag:<22}", subsequent_indent=" " * 24))
    lines += ["", "recipe keys (flags override the file; values are read as YAML, lists as several values):"]
    for flag, text in key_help():
        lines.append(f"  {flag}")
        lines.append(textwrap.fill(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines) + "\n"


def run_train(ns: argparse.Namespace) -> int:
    tokens = list(ns.args or [])
    if not tokens or any(t in ("-h", "--help") for t in tokens):
        print(help_text(), end="", file=sys.stdout if tokens else sys.stderr)
        return 0 if tokens else 2
    dry_run = "--dry-run" in tokens
    tokens = [t for t in tokens if t != "--dry-run"]
    if not tokens or tokens[0].startswith("-"):
        raise ValueError("give the recipe file first: flatlora train RECIPE.yaml [--section.key VALUE ...] "
                         "(recipes/ holds the paper's; flatlora train --help lists the keys)")
    recipe_path, tokens = tokens[0], tokens[1:]
    tokens, methods = _take(tokens, "--methods")
    tokens, seeds = _take(tokens, "--seeds")
    if methods is not None or seeds is not None:
        return _run_sweep(recipe_path, tokens, methods, seeds, dry_run)
    from .resolve import load_recipe

    recipe = load_recipe(recipe_path, tokens)
    if dry_run:
        from .data import check_local_files

        check_local_files(recipe)  # a look at the file system; nothing is loaded
        print(recipe.to_yaml(), end="")
        return 0
    require("datasets", "flatlora train")
    from .runner import train

    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log lines to stdout
        metrics = train(recipe)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun: once, from the main process
        print(json.dumps(metrics, indent=2, default=str))
        print(f"wrote the adapter, metrics.json and logs to {recipe.output_dir}", file=sys.stderr)
    return 0


def _take(tokens: list[str], flag: str) -> tuple[list[str], list[str] | None]:
    """Remove ``flag`` and its values (up to the next ``--`` flag) from ``tokens``; None when absent."""
    if flag not in tokens:
        return tokens, None
    i = tokens.index(flag)
    j = i + 1
    while j < len(tokens) and not tokens[j].startswith("--"):
        j += 1
    if j == i + 1:
        raise ValueError(f"{flag} needs values, e.g. --methods lora flat-lora --seeds 0 1 2")
    if flag in tokens[j:]:
        raise ValueError(f"{flag} given twice; give its values once")
    return tokens[:i] + tokens[j:], tokens[i + 1:j]


def _run_sweep(recipe_path: str, tokens: list[str], methods: list[str] | None, seeds: list[str] | None,
               dry_run: bool) -> int:
    """Every (seed, method) run of the recipe (finished ones skipped, interrupted ones resumed), then the paired
    table to stdout (see `flatlora.train.sweep`)."""
    from pathlib import Path

    from . import sweep
    from .resolve import load_recipe, parse_overrides

    overrides = parse_overrides(tokens)
    if methods is None or seeds is None:
        base = load_recipe(recipe_path, overrides)
        methods = methods or ["lora", "flat-lora"]
        seeds = seeds or [str(base.training_seed)]
    bad = [s for s in seeds if not s.isdigit()]
    if bad:
        raise ValueError(f"--seeds: {bad[0]!r} is not a seed; give integers >= 0, e.g. --seeds 0 1 2")
    runs = sweep.plan(recipe_path, overrides, methods, [int(s) for s in seeds])
    if dry_run:
        print(sweep.plan_text(runs), end="")
        return 0
    print(sweep.plan_text(runs), end="", file=sys.stderr)
    require("datasets", "flatlora train")
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log lines to stdout
        sweep.run_all(runs)
    if os.environ.get("RANK", "0") == "0":
        print(sweep.report(runs, methods, Path(recipe_path).name), end="")
    return 0

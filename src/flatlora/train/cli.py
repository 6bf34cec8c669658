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
                              usage="flatlora train RECIPE.yaml [--dry-run] [--section.key VALUE ...] (--help: keys)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the recipe file, then --dry-run and recipe keys")
    p.set_defaults(func=run_train)


def help_text() -> str:
    from .resolve import key_help

    lines = ["usage: flatlora train RECIPE.yaml [--dry-run] [--section.key VALUE ...]", "",
             textwrap.fill(_DESCRIPTION, 100), "",
             "options:", "  --dry-run             validate and print the resolved recipe (YAML) to stdout; load and "
             "write nothing", "  -h, --help            show this help", "",
             "recipe keys (flags override the file; values are read as YAML, lists as several values):"]
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

"""Flat-LoRA in LLaMA-Factory: the ``flat_lora_*`` keys of a training YAML, and the callbacks for ``run_exp``.

``llamafactory-cli train config.yaml`` passes no callbacks and rejects keys it does not know (unless
``ALLOW_EXTRA_ARGS=1``). LLaMA-Factory's Python entry point takes Trainer callbacks:
``llamafactory.train.tuner.run_exp(args=..., callbacks=[...])`` (0.9.5, src/llamafactory/train/tuner.py). `run`
takes the ``flat_lora_*`` keys (the names of `flatlora.FlatLoraArguments`) out of the arguments, builds
`FlatLoraCallback` from them, and hands the rest to ``run_exp``; examples/llamafactory_train.py is the command
line around it (``python examples/llamafactory_train.py config.yaml [key=value ...]``, as ``llamafactory-cli
train``).

With ``use_unsloth: true`` LLaMA-Factory loads the model through Unsloth, whose fused LoRA kernels bypass the
noise: the callbacks then include `flatlora.integrations.unsloth.PrepareCallback`, which puts PEFT's forwards
back on the perturbed layers at ``on_train_begin``.

``report_to`` integrations (W&B, TensorBoard) do not record ``flat_lora_sigma`` here: the Trainer runs them before
the callbacks of ``run_exp`` and LLaMA-Factory builds the Trainer out of reach of `FlatLoraCallback.attach`
(the callback warns); the console and ``trainer_state.json`` (``log_history``) carry it.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import FlatLoraConfig
from ..hf_args import PREFIX, FlatLoraArguments
from ._keys import config_from_keys, flat_lora_keys, reject_unknown

__all__ = ["callbacks", "prepare", "run", "split_args"]


def split_args(args: dict[str, Any] | list[str]) -> tuple[FlatLoraConfig, dict[str, Any] | list[str]]:
    """``(config, the other arguments)`` from LLaMA-Factory's arguments: a dict (a YAML file read by
    ``llamafactory.hparams.read_args``) or a command-line list (``--flat_lora_rho 0.05 --stage sft ...``).

    The input is not modified. Raises ``ValueError`` naming the key for an unknown ``flat_lora_*`` key or a bad
    value (LLaMA-Factory would only see the key disappear).
    """
    if isinstance(args, list):  # the command line: HfArgumentParser, as LLaMA-Factory parses the rest of it
        from transformers import HfArgumentParser

        flat_args, rest = HfArgumentParser(FlatLoraArguments, allow_abbrev=False).parse_args_into_dataclasses(
            args=args, return_remaining_strings=True)
        reject_unknown([item.partition("=")[0] for item in rest if item.startswith("--" + PREFIX)],
                       "LLaMA-Factory arguments")
        return flat_args.to_config(), rest
    if not isinstance(args, dict):
        raise ValueError(f"args must be a dict (a YAML config) or a list of command-line strings, got "
                         f"{type(args).__name__}")
    config = config_from_keys(args, "LLaMA-Factory arguments")
    return config, {k: v for k, v in args.items() if k not in flat_lora_keys(args)}


def callbacks(config: FlatLoraConfig, args: dict[str, Any] | list[str]) -> list:
    """`FlatLoraCallback`, and Unsloth's `PrepareCallback` when the arguments ask for ``use_unsloth``."""
    from ..callback import FlatLoraCallback

    found: list = [FlatLoraCallback(config)]
    if _use_unsloth(args):
        from .unsloth import PrepareCallback

        found.append(PrepareCallback(config))
    return found


def _use_unsloth(args: dict[str, Any] | list[str]) -> bool:
    """LLaMA-Factory's ``use_unsloth`` (a bool of its ``ModelArguments``), from a YAML dict or a command line."""
    from transformers.hf_argparser import string_to_bool

    if isinstance(args, dict):
        value = args.get("use_unsloth", False)
        return value if isinstance(value, bool) else string_to_bool(str(value))
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--use_unsloth", type=string_to_bool, nargs="?", const=True, default=False)
    return parser.parse_known_args(args)[0].use_unsloth


def _llamafactory():
    try:
        from llamafactory.hparams import read_args
        from llamafactory.train.tuner import run_exp
    except ImportError as exc:
        raise ImportError(f"flatlora.integrations.llamafactory needs LLaMA-Factory: pip install llamafactory "
                          f"(importing it failed with: {exc})") from exc
    return read_args, run_exp


def prepare(args: dict[str, Any] | list[str] | None = None) -> tuple[dict[str, Any] | list[str], list]:
    """``(arguments for run_exp, callbacks)``: ``args`` as ``run_exp`` takes them, or None to read ``sys.argv``
    as ``llamafactory-cli train`` does (``config.yaml [key=value ...]``, or ``--key value ...``)."""
    read_args, _ = _llamafactory()
    config, rest = split_args(read_args(args))
    return rest, callbacks(config, rest)


def run(args: dict[str, Any] | list[str] | None = None) -> list:
    """LLaMA-Factory's ``run_exp`` with Flat-LoRA (see `prepare`); returns the callbacks it passed, the
    `FlatLoraCallback` first."""
    rest, found = prepare(args)
    _, run_exp = _llamafactory()
    run_exp(args=rest, callbacks=list(found))  # run_exp appends its own callbacks to the list it is given
    return found

"""The ``flat_lora_*`` keys of a stack's config file -> `FlatLoraConfig` (Axolotl's YAML, LLaMA-Factory's YAML)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from ..config import FlatLoraConfig
from ..hf_args import PREFIX, FlatLoraArguments

KEYS = tuple(f.name for f in dataclasses.fields(FlatLoraArguments))


def flat_lora_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``flat_lora_*`` entries of ``values``."""
    return {k: v for k, v in values.items() if isinstance(k, str) and k.startswith(PREFIX)}


def config_from_keys(values: Mapping[str, Any], where: str) -> FlatLoraConfig:
    """The `FlatLoraConfig` of the ``flat_lora_*`` keys in ``values``; unset keys (absent or None) take
    `FlatLoraArguments`' defaults, other keys are ignored.

    Raises ``ValueError`` starting with ``where`` (e.g. ``"Axolotl config"``) for an unknown ``flat_lora_*`` key (the
    stack would drop or reject it without saying it is ours) or a bad value, naming the key.
    """
    given = flat_lora_keys(values)
    reject_unknown(given, where)
    try:
        return FlatLoraArguments(**{k: v for k, v in given.items() if v is not None}).to_config()
    except ValueError as exc:  # "--flat_lora_rho: rho=-1 ...": a config file's keys have no dashes
        raise ValueError(f"{where}: {str(exc).replace('--' + PREFIX, PREFIX)}") from None


def reject_unknown(names: Iterable[str], where: str) -> None:
    """Raise ``ValueError`` naming the first of ``names`` (``flat_lora_*`` keys, or ``--flat_lora_*`` flags) that
    is no `FlatLoraArguments` field."""
    unknown = sorted(n for n in names if n.lstrip("-") not in KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; the flat_lora_* keys are: {', '.join(KEYS)}")

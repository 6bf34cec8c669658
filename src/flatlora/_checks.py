"""Argument validators shared by the configs and the public functions: pure, each raising a ``ValueError``
that names the value and says what would be accepted.

``bool`` is never taken for a number (``True`` is an ``int`` to Python, but ``rho=True`` is a mistake).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def is_int(v: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (nan and inf included)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    """A finite real number (not a ``bool``)."""
    return is_real(v) and math.isfinite(v)


def check_int(name: str, v: Any) -> int:
    if not is_int(v):
        raise ValueError(f"{name}={v!r} must be an int")
    return v


def check_count(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
    """An integer ``>= minimum`` (``None`` too when ``optional``)."""
    if optional and value is None:
        return None
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{' or None' if optional else ''}")
    return value


def check_counts(name: str, values: Sequence[Any], minimum: int, maximum: int | None = None) -> list[int]:
    """Every value an integer in ``minimum..maximum`` (no upper bound when ``maximum`` is None)."""
    for v in values:
        if not is_int(v) or v < minimum or (maximum is not None and v > maximum):
            rng = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise ValueError(f"{name} value {v!r} must be an integer {rng}")
    return list(values)


def check_positive(name: str, value: Any) -> float:
    """A finite number ``> 0``, returned as a ``float``."""
    if not is_finite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0 (e.g. {name}=0.05)")
    return float(value)


def check_number(name: str, value: Any, low: float, high: float | None = None, *, above: bool = False,
                 optional: bool = False, note: str = "") -> Any:
    """A finite number ``>= low`` (``> low`` when ``above``), and ``< high`` when ``high`` is given: then the
    message reads ``in [low, high)``. ``None`` passes when ``optional``; ``note`` ends the message."""
    if optional and value is None:
        return None
    ok = is_finite(value) and (value > low if above else value >= low) and (high is None or value < high)
    if not ok:
        rng = f"a number {'>' if above else '>='} {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name}={value!r} must be {rng}{' or None' if optional else ''}{note}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")
    return value


def check_one_of(name: str, value: Any, choices: Sequence[str]) -> Any:
    """``value`` among ``choices``: ``unknown <name> 'x'; choose one of a, b, c``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_choice(name: str, value: Any, choices: Mapping[str, str]) -> Any:
    """``value`` among the keys of ``choices`` (value -> what it means), listed with their meaning."""
    if value not in choices:
        listed = [f"{k!r} ({what})" for k, what in choices.items()]
        options = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]
        raise ValueError(f"{name}={value!r} is unknown; choose {options}")
    return value


def check_batches(batches: Any) -> list:
    """A bounded, non-empty sequence of batches, as a list."""
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__len__"):
        raise ValueError(f"batches must be a list of batches (a bounded set), got {type(batches).__name__}; "
                         "pass e.g. list(itertools.islice(loader, 8))")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one batch on which to evaluate the loss")
    return batches


__all__: list[str] = []  # private plumbing of flatlora

"""Mean, sample standard deviation and standard error of the mean: the one definition every summary uses.

Sums are exact (``math.fsum``); ``std`` uses ``n - 1`` (the unbiased variance); undefined values (one
sample) are ``nan``.
"""

from __future__ import annotations

import math
from typing import Sequence


def mean(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("mean of an empty sample")
    return math.fsum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1); nan for fewer than 2 values."""
    n = len(xs)
    if n < 2:
        return math.nan
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))


def stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean, ``std / sqrt(n)``; nan for fewer than 2 values."""
    return std(xs) / math.sqrt(len(xs)) if len(xs) >= 2 else math.nan


__all__: list[str] = []  # private plumbing of flatlora

"""Small-sample statistics over seeds: mean and std (`flatlora._stats`), Student-t quantiles and paired-difference
intervals.

scipy is not a dependency, so the Student-t distribution is computed here: its CDF through the regularized
incomplete beta function (Lentz's continued fraction, as in Numerical Recipes 6.4),

    P(T <= t) = 1 - I_{nu / (nu + t^2)}(nu / 2, 1 / 2) / 2        (t >= 0),

and its quantile by bisection on the CDF (monotone; 200 halvings reach float precision). The tests check
them against published table values (t_{0.975} = 12.706 for nu = 1, 2.776 for nu = 4, 1.960 as nu -> inf).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

from .._stats import mean, std


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x}")
    if x in (0.0, 1.0):
        return x
    ln_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom (``df = inf``: the standard normal)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom df={df} must be > 0")
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    if t == 0:
        return 0.5
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (inverse of `t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level p={p} must be in (0, 1)")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket
        hi *= 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass
class Interval:
    """Mean of a sample with its two-sided t confidence interval and the paired t-test p-value vs 0."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    p_value: float
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` on ``xs``: ``sum (x - xm)(y - ym) / sum (x - xm)^2``; nan for fewer than two
    points or a single distinct ``x``."""
    if len(xs) != len(ys):
        raise ValueError(f"slope needs as many xs as ys, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        return math.nan
    xm, ym = mean(xs), mean(ys)
    sxx = sum((x - xm) ** 2 for x in xs)
    return sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sxx if sxx > 0 else math.nan


def mean_ci(xs: Sequence[float], level: float = 0.95) -> Interval:
    """``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` and the t-test p-value of mean 0.

    Undefined (nan bounds and p) for ``n < 2``, when a value is nan or infinite, and when every value is equal
    (``s = 0``: the t statistic is 0/0 or +-inf, and a zero-width interval would claim certainty that two to
    five seeds cannot give); values that differ only by floating-point rounding count as equal, and ``std``
    is then reported as 0.
    """
    xs = [float(x) for x in xs]
    return _interval(xs, level, scale=max((abs(x) for x in xs), default=0.0))


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Interval of the mean of ``a_i - b_i`` (the same seed i on both sides); undefined as `mean_ci` says,
    e.g. when every difference is equal (up to the rounding of the subtraction)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    a, b = [float(x) for x in a], [float(y) for y in b]
    return _interval([x - y for x, y in zip(a, b)], level, scale=max((abs(v) for v in a + b), default=0.0))


def all_equal(xs: Sequence[float], scale: float) -> bool:
    """Whether ``xs`` agree up to floating-point rounding of numbers of magnitude ``scale``: 0.85 - 0.80 and
    0.90 - 0.85 differ by 1.1e-16, an artefact of binary floats, not a difference between seeds."""
    return max(xs) - min(xs) <= 4 * sys.float_info.epsilon * scale


def _interval(xs: list[float], level: float, scale: float) -> Interval:
    n = len(xs)
    m = mean(xs)
    if n < 2 or not math.isfinite(m):  # one value, or an undefined one (nan, null in a run.json)
        return Interval(n, m, math.nan, math.nan, math.nan, math.nan, level)
    if all_equal(xs, scale):
        return Interval(n, m, 0.0, math.nan, math.nan, math.nan, level)
    s = std(xs)
    se = s / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    p = 2.0 * (1.0 - t_cdf(abs(m) / se, n - 1))
    return Interval(n, m, s, m - half, m + half, p, level)


__all__ = ["Interval", "all_equal", "betainc", "mean", "mean_ci", "paired_diff", "slope", "std", "t_cdf", "t_quantile"]

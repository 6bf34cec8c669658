"""Noise-scale schedules: sigma_t as a pure function of the optimizer step.

Flat-LoRA ramps the relative perturbation strength from 0 to ``rho`` over training so that the early,
fast-moving phase of fine-tuning is not disturbed (paper, Sec. 3.3):

    cosine:   sigma_t = rho * (1 - cos(pi * t / T)) / 2
    linear:   sigma_t = rho * t / T
    constant: sigma_t = rho

``t`` counts optimizer steps (never micro-batches or per-device batches), ``0 <= t <= T``.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def sigma_at(t: int, total_steps: int, rho: float, schedule: str = "cosine") -> float:
    """Return sigma_t for optimizer step ``t`` of ``total_steps``.

    >>> sigma_at(0, 10, 0.05), sigma_at(5, 10, 0.05), sigma_at(10, 10, 0.05)
    (0.0, 0.025, 0.05)
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r} must be a positive number of optimizer steps")
    if not 0 <= t <= total_steps:
        raise ValueError(
            f"step t={t!r} is outside [0, total_steps={total_steps}]; pass the index of the optimizer step "
            "(not of the micro-batch) and make total_steps the number of optimizer steps of the run"
        )
    frac = t / total_steps
    if schedule == "cosine":
        # round away the 1e-17 that cos(pi) leaves so sigma_T == rho exactly
        return rho * round((1.0 - math.cos(math.pi * frac)) / 2.0, 15)
    if schedule == "linear":
        return rho * frac
    if schedule == "constant":
        return float(rho)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")

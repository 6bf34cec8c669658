"""Interleaved step timing and its summary statistics.

Each round runs one step of every variant, in a fresh seeded random order (so no variant always runs right
after the same other one, whose cache and allocator state it would inherit), and slow drifts of a shared
machine hit all variants alike. Two clocks per
step: wall time (``perf_counter``, after a device synchronise on CUDA) and this process's CPU time
(``process_time``, all threads): on a loaded machine the wall time also counts the time the scheduler gave
to other processes, the CPU time much less so.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepCounter:
    """``t`` for each variant: 1, 2, ... (``total`` = the most steps any variant takes, the schedule's T)."""

    def __init__(self, names: list[str], total: int) -> None:
        self.total = total
        self._t = dict.fromkeys(names, 0)

    def next(self, name: str) -> int:
        self._t[name] += 1
        if self._t[name] > self.total:
            raise RuntimeError(f"variant {name!r} ran more than the planned {self.total} steps")
        return self._t[name]


def round_orders(names: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """A seeded random order of ``names`` for each round."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def run_rounds(steps: dict[str, Callable[[int], None]], counter: StepCounter, *, rounds: int, warmup: int,
               device: torch.device, progress: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Time ``rounds`` interleaved rounds after ``warmup`` untimed ones; ``{name: {"wall": [s], "cpu": [s]}}``."""
    names = list(steps)
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r, order in enumerate(round_orders(names, warmup + rounds)):
        for name in order:
            t = counter.next(name)
            synchronize(device)
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name](t)
            synchronize(device)
            w1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                out[name]["wall"].append(w1 - w0)
                out[name]["cpu"].append(c1 - c0)
        progress(f"round {r + 1}/{warmup + rounds}" + (" (warm-up)" if r < warmup else ""))
    return out


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min/max and count of a list of seconds, in milliseconds."""
    ms = sorted(1e3 * s for s in samples)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0], "max_ms": ms[-1],
            "n": len(ms)}


def paired_ratio(samples: list[float], reference: list[float]) -> float:
    """Median over rounds of the per-round ratio (variant / reference): the two ran seconds apart."""
    return statistics.median(a / b for a, b in zip(samples, reference))


def paired_ratio_ci(samples: list[float], reference: list[float], *, level: float = 0.95,
                    resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of `paired_ratio` (rounds resampled with replacement, seeded)."""
    ratios = [a / b for a, b in zip(samples, reference)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * (resamples - 1))]
    hi = meds[int((1 + level) / 2 * (resamples - 1))]
    return lo, hi


def time_call(fn: Callable[[], object], *, repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn()`` (one untimed call first), synchronising around each call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class TimedCalls:
    """Wraps a function so every call adds its wall time to ``seconds`` (reset it between measurements):
    ``noise.add_filter_noise = timer.wrap(noise.add_filter_noise)`` times the noise inside real steps."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

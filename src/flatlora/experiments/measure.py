"""What a run measures about itself: wall-clock seconds of its phases and steps, and peak memory.

Step times leave out the first step (one-off allocations) from their mean; peak memory is the CUDA allocator's
``max_memory_allocated`` on a GPU, and on a CPU the process's peak resident set size sampled every 20 ms.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from typing import Any, Iterator

import torch

from .._stats import mean


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or sampled peak RSS of this process (MiB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = math.nan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mib = self.rss_mib()

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self.peak_mib = max(self.peak_mib, self.rss_mib())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, self.rss_mib())


class Stopwatch:
    """Wall-clock seconds of the named phases of a run, as ``{"build_s": ..., "train_s": ..., ...}``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[f"{name}_s"] = time.perf_counter() - t0


def timings(clock: Stopwatch, step_times: list[float], mem: PeakMemory, device: torch.device) -> dict[str, Any]:
    """run.json's ``timings``: the phases, the mean step time without the first step, the first step, the peak
    memory and where it was measured."""
    timed = step_times[1:] or step_times  # the first step includes one-off allocations
    return {**clock.seconds, "step_s_mean": mean(timed), "step_s_first": step_times[0],
            "peak_memory_mib": mem.peak_mib, "memory_kind": "cuda_allocated" if device.type == "cuda" else
            "process_rss", "device": str(device), "threads": torch.get_num_threads()}


__all__ = ["PeakMemory", "Stopwatch", "timings"]

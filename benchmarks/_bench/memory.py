"""Peak memory of one training step, per variant.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` around one step: every
  tensor alive at the peak (model, optimizer state, activations, transient buffers).
* CPU, ``tensor``: the same quantity from torch's own allocation records. The process-wide RSS high-water
  mark cannot be reset between variants of one process and counts what glibc keeps after ``free``, so
  here one step runs under ``torch.profiler`` with ``profile_memory=True``; its memory timeline
  (``torch.profiler._memory_profiler``, the code behind ``export_memory_timeline``) gives the peak of the
  bytes allocated during the step, to which we add the bytes held before it (unique storages of the
  parameters, buffers and optimizer state). A private module: if it is missing the value is ``None``.
* CPU, ``rss``: the RSS high-water mark (``VmHWM``) of a fresh process per variant (``overhead.py
  --rss-worker``): build, two warm-up steps, reset the mark (``/proc/self/clear_refs`` <- 5), two steps,
  read it, with glibc's mmap threshold pinned (see `rss_in_fresh_process`). Includes the interpreter and
  libraries (~0.5 GB), so its ratios are diluted towards 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable

import torch
from torch import nn


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_bytes(model: nn.Module, optimizers: list[torch.optim.Optimizer] = ()) -> int:
    """Bytes of the unique storages of the model's parameters, buffers, gradients and optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for opt in optimizers:
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _storage_bytes(tensors)


def cuda_peak(step: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def cpu_step_peak(step: Callable[[], None]) -> int | None:
    """Peak of the bytes allocated (and not yet freed) by ``step``, from the profiler's memory timeline."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    try:
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    except Exception:  # a private API: report "not measured" rather than fail the benchmark
        return None
    return max((sum(s) for s in sizes), default=0)


def read_hwm_bytes() -> int | None:
    """This process's RSS high-water mark (Linux ``VmHWM``), or ``None`` elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); ``False`` if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_in_fresh_process(script: str, args: list[str], variant: str, timeout: float,
                         mmap_threshold: int) -> dict:
    """Run ``script --rss-worker VARIANT args`` in a new interpreter; its last stdout line is JSON.

    ``mmap_threshold`` pins glibc's ``MALLOC_MMAP_THRESHOLD_``: allocations above it are mapped and unmapped
    on free, so the high-water mark follows the live tensors instead of what the heap kept from earlier
    (0: leave glibc's dynamic threshold).
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run([sys.executable, script, "--rss-worker", variant, *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])

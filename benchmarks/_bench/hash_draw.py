"""A counter-based CPU draw compiled by inductor: the candidate for "a faster, vectorised generator" (issue 15).

``E[i, j]`` from a hash of the element's index and the seed (two rounds of Wellons' ``lowbias32`` per 32-bit
number, int64 lanes), Box-Muller (cos and sin of one pair), row scale and ``W + E``, all in one function that
``torch.compile`` fuses into one C++ loop (vectorised, OpenMP over both cores). No generator state, like the
GPU kernel. Measured only (benchmarks/levers.py ``--hash-draw``): on this machine it was slower than torch's
mt19937 path at one thread and far slower at two (docs/cost.md), so nothing here is used by the library.
"""

from __future__ import annotations

import functools

import torch

_M1, _M2, _MASK = 0x7FEB352D, 0x846CA68B, 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


def w_plus_e(w: torch.Tensor, scale: torch.Tensor, key: int) -> torch.Tensor:
    """``W + E`` for a 2-D fp32 ``w`` ``(m, n)``, ``scale`` ``(m,)``, ``key`` < 2**32 (eager; see `compiled`)."""
    m, n = w.shape
    i = torch.arange(m, dtype=torch.int64)[:, None]
    j = torch.arange(0, n, 2, dtype=torch.int64)[None, :]
    c = i * n + j
    a = _lowbias32(_lowbias32(c ^ key) ^ 0x5BD1E995)
    b = _lowbias32(_lowbias32((c + 1) ^ key) ^ 0x5BD1E995)
    u1 = ((a >> 8) + 1).float() * (1.0 / 16777216.0)  # (0, 1]
    u2 = (b >> 8).float() * (1.0 / 16777216.0)
    r = torch.sqrt(-2.0 * torch.log(u1))
    th = 6.283185307179586 * u2
    z = torch.stack([r * torch.cos(th), r * torch.sin(th)], dim=-1).reshape(m, -1)[:, :n]
    return w + z * scale[:, None]


@functools.lru_cache(maxsize=None)
def compiled():
    return torch.compile(w_plus_e, dynamic=False)

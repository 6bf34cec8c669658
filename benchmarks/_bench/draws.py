"""Count the noise draws of a step and the backend that made each, by wrapping the library's two draw functions.

Every draw of ``E`` in flatlora goes through `flatlora.noise.filter_noise` (``E`` alone) or
`flatlora.noise.add_filter_noise` (``W +/- E``): the eager exact op and the in-place mode through
`flatlora.noise.NoiseSpec` (which calls the module's functions), the compiled custom op through the names it
imported into `flatlora._compiled`. Both places are wrapped for the duration of `count_draws`; a draw that calls
the other function (torch's CUDA path of ``add_filter_noise`` materialises ``E`` with ``filter_noise``) counts
once. Each draw records `flatlora.noise.backend_for` its device and dtype, i.e. which generator drew it.
Backward may run on autograd's device threads: the nesting depth is per thread, the counts under a lock.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter
from typing import Iterator

import torch

from flatlora import _compiled, noise


class DrawCount:
    """Draws seen so far: ``total`` and ``backends`` (``Counter`` of backend name -> draws)."""

    def __init__(self) -> None:
        self.backends: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._depth = threading.local()

    @property
    def total(self) -> int:
        return sum(self.backends.values())

    def wrap(self, fn, where):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                device, dtype = where(*args, **kwargs)
                name = noise.backend_for(device, dtype)
                with self._lock:
                    self.backends[name] += 1
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
        return counted


def _noise_where(shape, scale, seed, dtype=None):
    return scale.device, dtype or torch.float32


def _add_where(weight, *args, **kwargs):
    return weight.device, weight.dtype


@contextlib.contextmanager
def count_draws() -> Iterator[DrawCount]:
    """``with count_draws() as c: step()`` -> ``c.total`` draws of ``E``, ``c.backends`` by generator."""
    count = DrawCount()
    patched = [(mod, name, getattr(mod, name)) for mod in (noise, _compiled)
               for name in ("filter_noise", "add_filter_noise")]
    try:
        for mod, name, fn in patched:
            setattr(mod, name, count.wrap(fn, _noise_where if name == "filter_noise" else _add_where))
        yield count
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)

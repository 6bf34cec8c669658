"""Filter-wise Gaussian noise, generated from seeds: pure tensor functions.

For a weight ``W`` in its logical layout ``(m, *fan_in_dims)`` (row ``i`` = output filter ``i``,
``n = prod(fan_in_dims)``), Flat-LoRA draws

    E[i, ...] ~ N(0, sigma^2 * ||W[i, :]||^2 / n * I)

The ``1/n`` keeps the growth of each output's variance at ``(1 + sigma^2)`` whatever the width. Noise is a
function of a 63-bit seed only: the same seed, shape and device always give the same ``E`` (it is drawn in
fp32 and cast, so every weight dtype sees the same sample), which is what lets the exact mode keep nothing
but the seed between forward and backward, and lets the in-place mode subtract what it added.

On CPU the rows are drawn, scaled and (in `add_filter_noise`) added to the weight in cache-sized blocks
that continue one generator: the same numbers as one draw of the whole shape, without three passes over a
full ``m x n`` buffer and without a full ``E`` beside ``W + E``. torch's CPU generator is sequential, so each
draw runs on the thread that asks for it, on one core: inside a training step torch's OpenMP workers keep the
other cores busy (docs/cost.md gives the measurements, benchmarks/levers.py the benchmark).

On CUDA, when Triton is importable, one kernel draws ``E`` and writes ``W + E`` (or ``W - E``, or ``E`` alone)
in one pass from a counter-based generator (Philox keyed by the 63-bit seed, counter = the element's
(row, column)): `flatlora._triton_noise` holds the exact definition. With ``FLATLORA_NOISE_BACKEND=inductor`` /
`set_backend` ``("inductor")`` CPU tensors draw that same Philox ``E`` (to the last bit or two of ``log``/``cos``)
from a loop compiled by ``torch.compile``'s inductor (`flatlora._cpu_philox`; an opt-in: no faster than torch's
generator at one thread, compiled once per layer shape, docs/cost.md). Elsewhere, or with
``FLATLORA_NOISE_BACKEND=torch`` / `set_backend` ``("torch")``, torch's generators draw it (the fallback). Philox
and torch's generators draw different samples of the same distribution, each deterministic for a seed: runs on
torch's generators (CPU by default, CUDA without Triton) are not sample-for-sample comparable with Philox runs.
`backend_for` says which one a device uses; change it only between optimizer steps (forward and backward of a
step must draw alike).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

_LOCAL = threading.local()  # this library's generators, per thread: concurrent draws never share one
_BACKENDS = ("auto", "torch", "triton", "inductor")
# what "auto" draws with on CPU: "torch" (mt19937) or "inductor" (the Triton kernel's Philox, compiled; see
# docs/cost.md for why it is not the default yet)
_AUTO_CPU = "torch"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _env_backend() -> str:
    name = os.environ.get("FLATLORA_NOISE_BACKEND", "auto")
    if name not in _BACKENDS:
        raise ValueError(f"FLATLORA_NOISE_BACKEND={name!r}; choose one of {', '.join(_BACKENDS)}")
    return name


_state = {"backend": _env_backend(), "probed": {}, "errors": {}}


def set_backend(name: str) -> str:
    """Choose how noise is drawn; returns the previous choice. ``"auto"`` (default, or the environment variable
    ``FLATLORA_NOISE_BACKEND``): the Triton kernel on CUDA when triton imports and runs, torch's generators
    elsewhere; ``"torch"``: torch everywhere; ``"triton"``: the kernel everywhere (CPU tensors only under
    ``TRITON_INTERPRET=1``, for tests); ``"inductor"``: on CPU tensors the kernel's Philox draw compiled by
    ``torch.compile``'s inductor (`flatlora._cpu_philox`: the GPU's samples on CPU; needs a C++ compiler, an
    error without one), other devices as under ``"auto"``. Change it between optimizer steps only."""
    if name not in _BACKENDS:
        raise ValueError(f"noise backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    previous, _state["backend"] = _state["backend"], name
    return previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`set_backend` for a block (benchmarks, tests)."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_module():
    """`flatlora._triton_noise`, or None when triton does not import (imported on first use only)."""
    if "module" not in _state:
        try:
            from . import _triton_noise
        except Exception:  # ImportError, or a triton without randn4x/interleave (< 3.0)
            _triton_noise = None
        _state["module"] = _triton_noise
    return _state["module"]


def _cpu_module():
    """`flatlora._cpu_philox` (imported on first use only: it loads nothing heavy until it compiles)."""
    from . import _cpu_philox

    return _cpu_philox


def _name(mod) -> str:
    """The backend name of a kernel module: ``"inductor"`` for `flatlora._cpu_philox`, else ``"triton"``."""
    return "inductor" if getattr(mod, "__name__", "") == "flatlora._cpu_philox" else "triton"


def _kernel_runs(mod, device: torch.device, *, forced: bool = False) -> bool:
    """Whether the kernel compiles and runs on ``device`` (tried once per device and kernel, on a tiny draw): in
    ``"auto"`` a failure warns and leaves the device on torch's generators for the whole process, so forward and
    backward never draw with different backends; a ``forced`` backend raises instead."""
    name = _name(mod)
    key = str(device) if name == "triton" else f"{device}:{name}"
    if key not in _state["probed"]:
        try:
            mod.probe(device)
            _state["probed"][key] = True
        except Exception as exc:  # no driver, no compiler: stay on torch
            _state["probed"][key], _state["errors"][key] = False, exc
            if not forced:
                warnings.warn(f"flatlora: the {name} noise kernel failed on {device} ({exc!r}); drawing with torch")
    if forced and not _state["probed"][key]:
        exc = _state["errors"].get(key)
        raise RuntimeError(f"noise backend {_state['backend']!r}: the {name} noise kernel failed on {device} "
                           f"({exc!r}); inductor needs a C++ compiler (g++ or clang++), or choose "
                           "FLATLORA_NOISE_BACKEND=torch") from exc
    return _state["probed"][key]


def _kernel(device: torch.device, dtype: torch.dtype | None):
    """The kernel module that draws for (``device``, ``dtype``) (`flatlora._triton_noise` or
    `flatlora._cpu_philox`), or None for torch's generators (see `set_backend`)."""
    name = _state["backend"]
    if name == "torch" or dtype not in _KERNEL_DTYPES:
        return None
    if device.type == "cpu" and (name == "inductor" or (name == "auto" and _AUTO_CPU == "inductor")):
        mod = _cpu_module()
        return mod if _kernel_runs(mod, device, forced=name == "inductor") else None
    if name == "inductor":  # other devices as under "auto": on CUDA the Triton kernel draws the same numbers
        name = "auto"
    if name == "auto" and device.type != "cuda":
        return None
    mod = _triton_module()
    if name == "triton":
        if mod is None:
            raise RuntimeError("noise backend 'triton' but triton does not import (pip install triton>=3.0)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton noise kernel on CPU tensors runs only under Triton's interpreter: "
                               "set TRITON_INTERPRET=1 before triton is imported")
        return mod
    return mod if mod is not None and _kernel_runs(mod, device) else None


def backend_for(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """``"triton"``, ``"inductor"`` or ``"torch"``: which draws ``E`` for a weight of ``dtype`` on ``device``
    now (the first two draw the same Philox samples; torch's generators others)."""
    mod = _kernel(torch.device(device), dtype)
    return "torch" if mod is None else _name(mod)


def layer_seed(seed: int, step: int, rank: int, layer: int) -> int:
    """Mix (seed, step, rank, layer) into one 63-bit seed (blake2b: no correlation between neighbours)."""
    for name, v in (("seed", seed), ("step", step), ("rank", rank), ("layer", layer)):
        if not 0 <= int(v) < 2**63:
            raise ValueError(f"{name}={v!r} must be a non-negative 63-bit integer")
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, rank, layer), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator private to this library (one per thread and device), reseeded for every draw; never the
    global RNG."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gens = _LOCAL.__dict__.setdefault("generators", {})
    gen = gens.get(device)
    if gen is None:
        gen = gens[device] = torch.Generator(device=device)
    return gen.manual_seed(seed)


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norm of each output filter: ``(m, ...) -> (m,)``."""
    return torch.linalg.vector_norm(weight.detach().reshape(weight.shape[0], -1).float(), dim=1)


def row_scale(weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-row noise std ``sigma * ||W[i, :]|| / sqrt(n)`` in fp32, shape ``(m,)``."""
    n = weight[0].numel() if weight.shape[0] else 1
    return row_norms(weight) * (float(sigma) / n**0.5)


# Elements per CPU block: 128 KiB of fp32, drawn, scaled and added while in cache. Below torch's parallel
# grain (32768 elements), so a block's ops run on the thread that calls them, without an OpenMP hand-off.
_BLOCK = 32767
# With one torch thread no op is handed to OpenMP, and a draw up to this size is fastest in one piece
# (the same numbers as its blocks, see `_block_rows`).
_ONE_PIECE = 1 << 18


def _block_rows(shape: tuple[int, ...]) -> list[int]:
    """Rows per cache-sized block of a CPU draw of ``shape`` (rows first).

    Every block but the last holds a multiple of 16 elements and the last one at least 16 (or the whole
    draw): torch's CPU kernel draws normals 16 at a time and redraws a short tail, so consecutive draws of
    such blocks from one generator give exactly the numbers of one draw of the whole shape.
    """
    m = shape[0] if shape else 1
    row = math.prod(shape[1:])
    if m * row <= _BLOCK or row == 0:
        return [m]
    step = 16 // math.gcd(row, 16)  # rows per block must be a multiple of this
    rows = max(step, (_BLOCK // row) // step * step)
    sizes = [rows] * (m // rows) + ([m % rows] if m % rows else [])
    if sizes[-1] * row < 16:  # a tail shorter than 16 elements joins the block before it
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return sizes


def _rows_view(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale.view(-1, *([1] * (ndim - 1)))


def _cpu_draw(shape: tuple[int, ...], scale: torch.Tensor, seed: int, weight: torch.Tensor | None,
              out: torch.Tensor, subtract: bool) -> None:
    """``out = E`` (``weight is None``, ``out`` fp32) or ``out = weight +/- E`` (in ``weight``'s dtype), block
    by block from one generator; ``out`` may be ``weight`` (in place)."""
    gen = _generator(out.device, seed)
    m = shape[0] if shape else 1
    one_piece = torch.get_num_threads() == 1 and out.numel() <= _ONE_PIECE
    blocks = [m] if one_piece else _block_rows(shape)
    s = _rows_view(scale, len(shape))
    op = torch.sub if subtract else torch.add
    if len(blocks) == 1:  # one piece (small layers): the same numbers without the block loop's overhead
        z = out if weight is None else torch.empty(shape, dtype=torch.float32)
        z.normal_(generator=gen).mul_(s)
        if weight is not None:
            op(weight, z if weight.dtype == torch.float32 else z.to(weight.dtype), out=out)
        return
    if weight is None:  # materialise E: draw straight into the output
        for z, sb in zip(out.split(blocks), s.split(blocks)):
            z.normal_(generator=gen).mul_(sb)
        return
    buf = torch.empty((max(blocks), *shape[1:]), dtype=torch.float32)
    for ob, wb, sb in zip(out.split(blocks), weight.split(blocks), s.split(blocks)):
        z = buf if ob.shape[0] == buf.shape[0] else buf[: ob.shape[0]]
        z.normal_(generator=gen).mul_(sb)
        op(wb, z if wb.dtype == torch.float32 else z.to(wb.dtype), out=ob)


def filter_noise(shape: torch.Size | tuple[int, ...], scale: torch.Tensor, seed: int,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Draw ``E`` of ``shape`` (logical layout, rows first) with row std ``scale`` (fp32, ``(m,)``).

    Drawn in fp32 on ``scale.device`` from a generator seeded with ``seed`` (on CPU in blocks, see the module
    docstring), then cast to ``dtype``; on CUDA with Triton by the one-pass kernel, straight into ``dtype``.
    """
    shape = tuple(shape)
    mod = _kernel(scale.device, dtype or torch.float32) if shape else None
    if mod is not None:
        return mod.noise(shape, scale, seed, dtype or torch.float32)
    z = torch.empty(shape, device=scale.device, dtype=torch.float32)
    if z.device.type == "cpu":
        _cpu_draw(shape, scale, seed, None, z, False)
    else:
        z.normal_(generator=_generator(z.device, seed)).mul_(_rows_view(scale, len(shape)))
    return z if dtype in (None, torch.float32) else z.to(dtype)


def add_filter_noise(weight: torch.Tensor, scale: torch.Tensor, seed: int, *, subtract: bool = False,
                     inplace: bool = False) -> torch.Tensor:
    """``weight + E`` (or ``weight - E``) with ``E = filter_noise(weight.shape, scale, seed, weight.dtype)``.

    Bit-identical to adding the materialised ``E`` in the weight's dtype (on either backend), but on CPU
    computed block by block (see the module docstring) and on CUDA with Triton in one pass, so neither a full
    ``E`` nor a full fp32 buffer is allocated. ``weight`` in
    logical layout ``(m, ...)``, any strides; ``inplace=True`` writes into ``weight`` and returns it,
    otherwise the result is a new tensor.
    """
    shape = tuple(weight.shape)
    mod = _kernel(weight.device, weight.dtype) if shape else None
    if mod is not None:  # one pass: read W, write W +/- E (flatlora._triton_noise)
        return mod.add_noise(weight, scale, seed, subtract=subtract, inplace=inplace)
    if weight.device.type == "cpu":
        out = weight if inplace else torch.empty(shape, dtype=weight.dtype)
        _cpu_draw(shape, scale, seed, weight, out, subtract)
        return out
    e = filter_noise(shape, scale, seed, weight.dtype)  # one piece: fewest kernels
    if inplace:
        return weight.sub_(e) if subtract else weight.add_(e)
    return weight - e if subtract else weight + e


@dataclass(frozen=True)
class NoiseSpec:
    """Everything needed to regenerate one layer's noise: a seed and the fp32 row std (``(m,)``).

    This is all the exact mode keeps between forward and backward: no ``E`` and no copy of ``W``. Unless
    ``keep=True``: then the eager exact op (`flatlora.exact.PerturbedOp`) keeps forward's ``W + E`` for its
    backward instead of drawing it again, one draw per layer and micro-batch instead of two, for one
    ``W + E`` per layer held from its forward to its backward (an opt-in for CPUs, where the draw is the
    cost: docs/cost.md; ``FlatLoraConfig(keep_noisy_weight=True)``; the compiled custom op redraws either way).
    """

    seed: int
    scale: torch.Tensor
    shape: tuple[int, ...]
    keep: bool = False

    def sample(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return filter_noise(self.shape, self.scale, self.seed, dtype)

    def add_to(self, weight: torch.Tensor, *, subtract: bool = False, inplace: bool = False) -> torch.Tensor:
        """``weight +/- E`` in the weight's dtype without materialising ``E`` (see `add_filter_noise`)."""
        return add_filter_noise(weight, self.scale, self.seed, subtract=subtract, inplace=inplace)


def layer_noise_spec(weight: torch.Tensor, sigma: float, *, seed: int, step: int, rank: int, layer: int,
                     keep: bool = False) -> NoiseSpec:
    """Flat-LoRA's noise convention for one layer at one step, as a `NoiseSpec`.

    ``weight``: the layer's merged weight in logical layout ``(m, *fan_in)`` (read for its row norms only; any
    dtype, taken in fp32); ``sigma``: ``sigma_t`` of the step; ``seed``/``step``/``rank``/``layer``: the run's
    noise seed, the optimizer step ``t``, the rank entering the seed and the layer's noise index. The spec
    draws ``E`` of ``weight``'s shape with

        E[i, ...] ~ N(0, sigma^2 ||W[i, :]||^2 / n I),   from the 63-bit seed layer_seed(seed, step, rank, layer)

    (`row_scale`, `layer_seed`). The training engine (`flatlora.FlatLora`) and the sharpness diagnostics
    (`flatlora.analysis`) both build their specs here, so they draw the same ``E`` for the same four integers.
    """
    return NoiseSpec(layer_seed(seed, step, rank, layer), row_scale(weight, sigma), tuple(weight.shape), keep)

"""Filter-wise Gaussian noise, generated from seeds: pure tensor functions.

For a weight ``W`` in its logical layout ``(m, *fan_in_dims)`` (row ``i`` = output filter ``i``,
``n = prod(fan_in_dims)``), Flat-LoRA draws

    E[i, ...] ~ N(0, sigma^2 * ||W[i, :]||^2 / n * I)

The ``1/n`` keeps the growth of each output's variance at ``(1 + sigma^2)`` whatever the width. Noise is a
function of a 63-bit seed only: the same seed, shape and device always give the same ``E`` (it is drawn in
fp32 and cast, so every weight dtype sees the same sample), which is what lets the exact mode keep nothing
but the seed between forward and backward, and lets the in-place mode subtract what it added.

On CPU, large draws run in blocks of rows (`_BLOCK` elements): every block is drawn, scaled and, in
`add_filter_noise`, added to the weight while it is still in cache, instead of three passes over a full
``m x n`` buffer, and no full ``E`` is allocated beside ``W + E``. The blocks stay below torch's parallel
grain, so with several intra-op threads no op waits for the others (on a loaded 2-core machine that took a
768 x 768 ``W + E`` from 22 ms to 6 ms; with one thread blocks win only on large layers, see
benchmarks/levers.py). The blocks continue one generator stream and hold multiples of 16 elements, so on
torch's CPU kernel (which fills 16 normals at a time) any split gives exactly the numbers of one
``torch.randn(shape)``: ``E`` does not depend on the split (tests/test_noise_blocks.py checks it). Other
devices draw in one piece.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

_GENERATORS: dict[torch.device, torch.Generator] = {}


def layer_seed(seed: int, step: int, rank: int, layer: int) -> int:
    """Mix (seed, step, rank, layer) into one 63-bit seed (blake2b: no correlation between neighbours)."""
    for name, v in (("seed", seed), ("step", step), ("rank", rank), ("layer", layer)):
        if not 0 <= int(v) < 2**63:
            raise ValueError(f"{name}={v!r} must be a non-negative 63-bit integer")
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, rank, layer), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator private to this library (one per device), reseeded for every draw; never the global RNG."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norm of each output filter: ``(m, ...) -> (m,)``."""
    return torch.linalg.vector_norm(weight.detach().reshape(weight.shape[0], -1).float(), dim=1)


def row_scale(weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-row noise std ``sigma * ||W[i, :]|| / sqrt(n)`` in fp32, shape ``(m,)``."""
    n = weight[0].numel() if weight.shape[0] else 1
    return row_norms(weight) * (float(sigma) / n**0.5)


# Elements per CPU block: 128 KiB of fp32, drawn, scaled and added while in cache. Below torch's parallel
# grain (32768 elements), so the block's ops run on the calling thread: no OpenMP hand-off per op, which on
# a busy machine costs a scheduler time slice whenever the other thread is not running.
_BLOCK = 32767
# With one intra-op thread there is no hand-off to avoid, and up to this size one piece is as fast.
_ONE_PIECE = 1 << 18


def _block_rows(shape: tuple[int, ...], device: torch.device) -> list[int]:
    """Rows per block, splitting a draw of ``shape`` over dim 0 into cache-sized blocks (or one piece).

    Every block but the last holds a multiple of 16 elements and the last one at least 16 (or the whole
    tensor): torch's CPU kernel draws normals 16 at a time and redraws a short tail, so consecutive draws of
    such blocks from one generator give exactly the numbers of one draw of the whole shape.
    """
    m = shape[0] if shape else 1
    row = math.prod(shape[1:])
    one_piece = _ONE_PIECE if torch.get_num_threads() == 1 else _BLOCK
    if device.type != "cpu" or m * row <= one_piece or row == 0:
        return [m]
    step = 16 // math.gcd(row, 16)  # rows per block must be a multiple of this
    rows = max(step, (_BLOCK // row) // step * step)
    sizes = [rows] * (m // rows) + ([m % rows] if m % rows else [])
    if sizes[-1] * row < 16:  # a tail shorter than 16 elements joins the block before it
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return sizes


def _rows_view(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale.view(-1, *([1] * (ndim - 1)))


def filter_noise(shape: torch.Size | tuple[int, ...], scale: torch.Tensor, seed: int,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Draw ``E`` of ``shape`` (logical layout, rows first) with row std ``scale`` (fp32, ``(m,)``).

    Drawn in fp32 on ``scale.device`` from a generator seeded with ``seed``, then cast to ``dtype``.
    """
    shape = tuple(shape)
    gen = _generator(scale.device, seed)
    z = torch.empty(shape, device=scale.device, dtype=torch.float32)
    sizes = _block_rows(shape, z.device)
    for block, s in zip(z.split(sizes), _rows_view(scale, len(shape)).split(sizes)):
        block.normal_(generator=gen)  # contiguous slices of z, in order: one generator stream
        block.mul_(s)
    return z if dtype in (None, torch.float32) else z.to(dtype)


def add_filter_noise(weight: torch.Tensor, scale: torch.Tensor, seed: int, *, subtract: bool = False,
                     inplace: bool = False) -> torch.Tensor:
    """``weight + E`` (or ``weight - E``) with ``E = filter_noise(weight.shape, scale, seed, weight.dtype)``.

    Bit-identical to adding the materialised ``E`` in the weight's dtype, but computed block by block (see the
    module docstring), so neither a full ``E`` nor a full fp32 buffer is allocated. ``weight`` in logical
    layout ``(m, ...)``, any strides; ``inplace=True`` writes into ``weight`` and returns it, otherwise the
    result is a new tensor.
    """
    shape = tuple(weight.shape)
    sizes = _block_rows(shape, weight.device)
    if len(sizes) == 1:  # small, or not on CPU: one piece, fewest ops
        e = filter_noise(shape, scale, seed, weight.dtype)
        if inplace:
            return weight.sub_(e) if subtract else weight.add_(e)
        return weight - e if subtract else weight + e
    gen = _generator(scale.device, seed)
    out = weight if inplace else torch.empty(shape, dtype=weight.dtype, device=weight.device)
    buf = torch.empty((max(sizes), *shape[1:]), device=scale.device, dtype=torch.float32)
    blocks = zip(sizes, weight.split(sizes), out.split(sizes), _rows_view(scale, len(shape)).split(sizes))
    for rows, w, o, s in blocks:
        z = buf if rows == buf.shape[0] else buf[:rows]
        z.normal_(generator=gen)
        z.mul_(s)
        e = z if weight.dtype == torch.float32 else z.to(weight.dtype)
        if inplace:
            o.sub_(e) if subtract else o.add_(e)
        else:
            torch.sub(w, e, out=o) if subtract else torch.add(w, e, out=o)
    return out


@dataclass(frozen=True)
class NoiseSpec:
    """Everything needed to regenerate one layer's noise: a seed and the fp32 row std (``(m,)``).

    This is all the exact mode keeps between forward and backward: no ``E`` and no copy of ``W``.
    """

    seed: int
    scale: torch.Tensor
    shape: tuple[int, ...]

    def sample(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return filter_noise(self.shape, self.scale, self.seed, dtype)

    def add_to(self, weight: torch.Tensor, *, subtract: bool = False, inplace: bool = False) -> torch.Tensor:
        """``weight +/- E`` in the weight's dtype without materialising ``E`` (see `add_filter_noise`)."""
        return add_filter_noise(weight, self.scale, self.seed, subtract=subtract, inplace=inplace)

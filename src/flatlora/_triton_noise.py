"""Filter noise on GPU in one pass: a Triton kernel writes ``W + E``, ``W - E`` or ``E`` alone.

Definition (what the kernel computes, whatever its tiles): for a weight in logical layout ``(m, n)``
(``n`` = the flattened fan-in; a conv weight ``(m, c, kh, kw)`` has ``n = c*kh*kw``), element ``(i, j)`` is

    E[i, j] = s[i] * N_{j mod 4}(i, j // 4)
    (N_0, N_1, N_2, N_3)(i, g) = tl.randn4x(seed, (i << 32) | g)

i.e. Philox-4x32-10 (Salmon et al. 2011, Random123) with key ``(seed mod 2**32, seed >> 32)`` and counter
``(g, i, 0, 0)``; its four 32-bit outputs become four normals by two Box-Muller transforms (Triton's
``pair_uniform_to_normal``: ``u1`` clamped at 1e-7, so ``|N| <= 5.68``, a tail of probability 1.3e-8 cut).
``s`` is the fp32 row std ``sigma * ||W[i, :]|| / sqrt(n)`` (`flatlora.noise.row_scale`).

Why this shape of definition:

* every element is a pure function of (layer seed, ``i``, ``j``): no generator state, so forward and backward
  (and the in-place mode's add and subtract) regenerate the same ``E`` tile by tile, in any tile order;
* the 63-bit layer seed is the whole 64-bit Philox key (low and high 32-bit words): nothing is folded away;
* the counter holds the *logical* (row, column) indices, not memory offsets: a transposed GPT-2 ``Conv1D``
  weight (stored ``(in, out)``), a sliced or channels-last weight draw the same ``E`` as a contiguous copy;
* four normals per Philox call (``randn4x``), as torch's own CUDA ``normal_`` (``curand_normal4``): a call of
  ``tl.randn`` per element would run four times the Philox rounds for the same numbers of normals.

Arithmetic: ``E`` in fp32 (``z * s``); ``W +/- E`` rounds ``E`` to W's dtype first, then adds in fp32 (fp64 for
fp64 weights) and rounds once to W's dtype, which is exactly what ``W + E.to(W.dtype)`` does in torch: so
``add_noise(W) == W + noise(W.dtype)`` bit for bit, as on the torch path (`flatlora.noise`).

Memory traffic per weight element and draw, bf16: read ``W`` and write ``W + E`` (4 bytes; E alone: 2 bytes),
against ~24 for the torch path's ``normal_`` (write fp32) -> ``mul_`` (read, write) -> cast (read fp32, write
bf16) -> ``W + e`` (read two, write one), and no ``m x n`` fp32 buffer.

The samples differ from the torch path's (CPU: mt19937; CUDA: torch's Philox stream), which
`flatlora.noise.noise_backend` selects; each is deterministic for a seed. The GPU's ``log``/``cos`` may differ
from another GPU model's or from the interpreter's in the last bit, so "the same E" means the same on one
machine and Triton version. On CPU tensors this module runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported): the tests use that.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Tiles (performance only: the numbers do not depend on them). ~4k elements per program; rows-major tiles
# for weights whose rows are contiguous, column-major ones for transposed storage (GPT-2 Conv1D), so that
# the loads and stores run along the contiguous axis. BLOCK_N must be a multiple of 4 (one Philox call
# gives 4 neighbouring columns).
ROW_TILE = (8, 512)
COL_TILE = (256, 16)
NUM_WARPS = 4
# Compile options of every launch. No multiply-add fusion: Triton fuses by default (through 3.9), which turns
# fp32 ``w + z * s`` into ``fma(z, s, w)``, one rounding where torch's ``W + E`` rounds twice (``E``, then the
# sum): issue 22 found ~16% of the tests' fp32 elements would differ from adding the kernel's own ``E``
# (tests/test_triton_ptx.py checks the compiled PTX). The draw's own ``log``/``cos`` (libdevice) keep their
# explicit fma either way.
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
# Row and column indices are int32 in the kernel: the last tile's must stay below 2**31.
MAX_ROWS = 2**31 - max(ROW_TILE[0], COL_TILE[0])
MAX_COLS = 2**31 - max(ROW_TILE[1], COL_TILE[1])
# The probe's seed: 63 bits, like every layer seed (`flatlora.noise.layer_seed`), so that Triton types it
# int64 and the probe compiles the variant real steps launch (a seed below 2**31 would compile an int32 one).
PROBE_SEED = 2**63 - 1 - 0x5EED
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 ``x`` to ``dtype``, rounding to nearest even. bf16 by integer rounding of the bit pattern (as
    torch's ``round_to_nearest_even``; the GPU's own conversion rounds the same way, but Triton's interpreter
    truncates, and the tests run there): one code path everywhere."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(w_ptr, out_ptr, scale_ptr, seed, m, n, sw0, sw1, so0, so1, tiles_n,
                  HAS_W: tl.constexpr, SUBTRACT: tl.constexpr, F64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One ``(BLOCK_M, BLOCK_N)`` tile: ``out = w +/- E`` (``HAS_W``) or ``out = E``; strides in elements."""
    pid = tl.program_id(0)
    pm = pid // tiles_n
    pn = pid % tiles_n
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = pn * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
    counter = (rows.to(tl.int64)[:, None] << 32) | groups.to(tl.int64)[None, :]
    z0, z1, z2, z3 = tl.randn4x(seed, counter)
    # columns 4g, 4g+1, 4g+2, 4g+3 <- z0, z1, z2, z3
    z = tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    mask = row_ok[:, None] & (cols < n)[None, :]
    s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    e = z * s[:, None]
    r = rows.to(tl.int64)[:, None]
    c = cols.to(tl.int64)[None, :]
    if HAS_W:
        w = tl.load(w_ptr + r * sw0 + c * sw1, mask=mask, other=0.0)
        if F64:
            wa = w.to(tl.float64)
            ea = e.to(tl.float64)
        else:
            wa = w.to(tl.float32)
            ea = _cast(e, w.dtype).to(tl.float32)  # E rounded to W's dtype, as torch's W + E.to(W.dtype)
        res = wa - ea if SUBTRACT else wa + ea
    else:
        res = e
    tl.store(out_ptr + r * so0 + c * so1, _cast(res, out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as an ``(m, n)`` view (no copy), or None when its layout has none (e.g. channels-last conv)."""
    try:
        return t.view(t.shape[0], -1)
    except RuntimeError:
        return None


def _launch(w: torch.Tensor | None, out: torch.Tensor, scale: torch.Tensor, seed: int, subtract: bool) -> None:
    m, n = out.shape
    if m == 0 or n == 0:
        return
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} must fit 64 bits")
    if m > MAX_ROWS or n > MAX_COLS:
        raise ValueError(f"weight of {m} rows x {n} columns (fan-in) exceeds the kernel's int32 indices: rows <= "
                         f"{MAX_ROWS} and columns <= {MAX_COLS} (2**31 minus a tile); use the torch backend "
                         f"(flatlora.noise.set_backend('torch')) for it")
    ref = w if w is not None else out
    bm, bn = COL_TILE if (ref.stride(0) < ref.stride(1) and m > 1) else ROW_TILE
    tiles_n = triton.cdiv(n, bn)
    grid = (triton.cdiv(m, bm) * tiles_n,)
    scale = scale.to(device=out.device, dtype=torch.float32).contiguous()
    f64 = w is not None and w.dtype == torch.float64
    ctx = torch.cuda.device(out.device) if out.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _noise_kernel[grid](w if w is not None else out, out, scale, seed, m, n,
                            *(w.stride() if w is not None else (0, 0)), *out.stride(), tiles_n,
                            HAS_W=w is not None, SUBTRACT=subtract, F64=f64, BLOCK_M=bm, BLOCK_N=bn,
                            **LAUNCH_OPTIONS)


def noise(shape: tuple[int, ...], scale: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``E`` of ``shape`` (logical, rows first) in ``dtype``, on ``scale.device``: computed in fp32, cast once."""
    out = torch.empty(shape, dtype=dtype, device=scale.device)
    if out.dim() == 0:
        raise ValueError("filter noise needs a weight of at least one dimension (rows first)")
    _launch(None, out.view(out.shape[0], -1), scale, seed, False)
    return out


def add_noise(weight: torch.Tensor, scale: torch.Tensor, seed: int, *, subtract: bool = False,
              inplace: bool = False) -> torch.Tensor:
    """``weight +/- E`` in one pass (read ``W``, write the result), ``weight`` in logical layout, any strides.

    ``inplace=True`` writes into ``weight`` and returns it; otherwise a new tensor with ``weight``'s strides
    (``torch.empty_like``), so a transposed ``Conv1D`` weight gives a transposed result, as cheap to use.
    A layout without an ``(m, n)`` view (channels-last conv weights) goes through a contiguous copy.
    """
    if weight.dim() == 0:
        raise ValueError("filter noise needs a weight of at least one dimension (rows first)")
    out = weight if inplace else torch.empty_like(weight)
    w2, o2 = _rows(weight), _rows(out)
    if w2 is None or o2 is None:
        res = add_noise(weight.contiguous(), scale, seed, subtract=subtract)
        return weight.copy_(res) if inplace else res
    _launch(w2, o2, scale, seed, subtract)
    return out


def probe(device: torch.device) -> None:
    """Compile and run the kernel once on ``device``: a bf16 ``W + E`` of 16 x 1024 with a 63-bit seed, the
    variant real steps launch first (bf16 weights, int64 seed), so the probe also warms it. Raises whatever
    stops it there."""
    add_noise(torch.zeros((16, 1024), dtype=torch.bfloat16, device=device), torch.ones(16, device=device),
              PROBE_SEED)

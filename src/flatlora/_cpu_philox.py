"""The GPU kernel's noise on CPU: the same Philox draw as `flatlora._triton_noise`, compiled by inductor.

Definition (the Triton kernel's, `flatlora._triton_noise`): for a weight in logical layout ``(m, n)`` (``n`` =
the flattened fan-in), element ``(i, j)`` is

    E[i, j] = s[i] * N_{j mod 4}(i, j // 4)

with ``(N_0, N_1, N_2, N_3)(i, g)`` the four normals of one Philox-4x32-10 call (key = the 63-bit seed's low and
high 32-bit words, counter ``(g, i, 0, 0)``), each 32-bit output made uniform as Triton's
``uint_to_uniform_float`` and paired by Box-Muller (``u1`` clamped at 1e-7). ``W +/- E`` rounds ``E`` to W's
dtype first, then adds in fp32 (fp64 for fp64 weights) and rounds once: ``W + E.to(W.dtype)``, as torch.

How: the draw is written as tensor operations (`_philox`, `_box_muller`) over one flat index of the
``m * ceil(n / 4)`` Philox calls, and ``torch._inductor.compile`` turns the whole graph (counter, ten rounds,
Box-Muller, row scale, ``W +/- E``) into one C++ loop, vectorised (AVX2/AVX-512 through ``at::vec``) and split
over torch's threads (OpenMP): it reads ``W`` and writes the result once, four columns per Philox call. The
32x32 -> 64-bit products of Philox are int64 multiplies whose low 64 bits are exact (inductor emits vector
multiplies, which wrap, also for the loop's tail; the tests check every element against a reference); the
arithmetic shift and a 32-bit mask take the high word. One graph is compiled per (shape, strides, dtypes, operation, threads),
once per process (inductor's on-disk FX graph cache makes later processes load it in a fraction of the time).

The samples are the GPU kernel's: the Philox words and uniforms are equal bit for bit; ``log``/``cos``/``sin``
/``sqrt`` come from SLEEF's vectorised functions here (1 ulp), from NumPy under Triton's interpreter and from
the GPU's libdevice there, so about a quarter of the elements differ from the interpreter's by 1 ulp and a few
percent by 2-4 ulp (docs/cost.md gives the measured figures). Forward and backward of one step run the same compiled code: the same ``E`` bit for bit.

Needs inductor's C++ toolchain (a C++ compiler); `probe` says whether it works (`flatlora.noise` falls back to
torch's generator with a warning when it does not).
"""

from __future__ import annotations

import math
import threading

import torch

# Philox-4x32-10 (Salmon et al. 2011; Random123): round multipliers and the key's Weyl increments
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF
_ROUNDS = 10
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _xor(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a ^ b`` with None for a known zero."""
    return b if a is None else a if b is None else a ^ b


def _philox(c0: torch.Tensor, c1: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of counters ``(c0, c1, 0, 0)`` (int64 tensors holding 32-bit values) under ``key``
    (``(2,)`` int64: low, high word): four int64 tensors of 32-bit outputs.

    Round: ``(hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))``, then ``k += (W0, W1)``. Products
    of two 32-bit words wrap in int64 with exact low 64 bits; ``>> 32`` (arithmetic) and a mask take the high
    word. The low words ``c1``/``c3`` are left unmasked between rounds (they only enter through an xor that is
    masked): one ``&`` fewer per word and round.
    """
    k0, k1 = key[0], key[1]
    c2 = c3 = None  # zero in the first round (and c1 in the second: M1 * 0)
    for r in range(_ROUNDS):
        kr0 = (k0 + r * _W0) & _MASK
        kr1 = (k1 + r * _W1) & _MASK
        p0 = c0 * _M0
        p1 = None if c2 is None else c2 * _M1
        n0 = (_xor(None if p1 is None else p1 >> 32, c1) ^ kr0) & _MASK
        n2 = (_xor(p0 >> 32, c3) ^ kr1) & _MASK
        c0, c1, c2, c3 = n0, p1, n2, p0
    return c0, c1 & _MASK, c2, c3 & _MASK


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: the word as int32, negatives complemented (``~x`` = ``x ^ MASK`` on
    the unsigned word), times 2^-31, in fp32: in [0, 1)."""
    x = torch.where(x >= 2**31, x ^ _MASK, x)
    return x.to(torch.float32) * 4.6566127342e-10


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal`` of two words, fp32."""
    u1 = torch.clamp_min(_uniform(a), 1e-7)
    th = 6.283185307179586 * _uniform(b)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def _normals(m: int, groups: int, key: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(N_0, .., N_3)`` of every Philox call ``(i, g)``, ``i < m``, ``g < groups``, flat (row-major), fp32.

    One flat index rather than a 2-D grid: inductor then keeps the rounds, Box-Muller and the stores in one loop
    (a 2-D grid made it split the work into several loops with int64 buffers between them)."""
    idx = torch.arange(m * groups, dtype=torch.int64)
    row = idx // groups
    z0, z1, z2, z3 = _philox(idx - row * groups, row, key)
    return (*_box_muller(z0, z1), *_box_muller(z2, z3))


def _row_scale_flat(scale: torch.Tensor, m: int, groups: int) -> torch.Tensor:
    # an index expression (row = idx // groups) for inductor, not a gather with a bounds check
    return scale[:, None].expand(m, groups).reshape(m * groups)


def _combine(w: torch.Tensor, e: torch.Tensor, subtract: bool) -> torch.Tensor:
    """``w +/- e.to(w.dtype)`` with torch's rounding, the casts written out: fp32 ``e`` rounded to W's dtype, the
    sum in fp32 (fp64 for fp64) rounded once (inductor keeps the first rounding only with
    ``emulate_precision_casts``, set in `_compiled`)."""
    if w.dtype in (torch.float32, torch.float64):
        ea = e.to(w.dtype)
        return w - ea if subtract else w + ea
    wa, ea = w.to(torch.float32), e.to(w.dtype).to(torch.float32)
    return (wa - ea if subtract else wa + ea).to(w.dtype)


def _interleaved(parts: list[torch.Tensor], m: int, n: int) -> torch.Tensor:
    """Columns ``4g + k`` <- ``parts[k][i * groups + g]``: the ``(m, n)`` matrix of four flat parts."""
    return torch.stack(parts, dim=-1).view(m, -1)[:, :n]


def _e_graph(scale: torch.Tensor, key: torch.Tensor, *, m: int, n: int, dtype: torch.dtype):
    groups = -(-n // 4)
    s = _row_scale_flat(scale, m, groups)
    return (_interleaved([z * s for z in _normals(m, groups, key)], m, n).to(dtype),)


def _add_graph(w: torch.Tensor, scale: torch.Tensor, key: torch.Tensor, *, m: int, n: int, subtract: bool):
    groups = -(-n // 4)
    s = _row_scale_flat(scale, m, groups)
    zs = _normals(m, groups, key)
    if n % 4 == 0 and w.stride() == (n, 1):  # one pass: four columns of W per Philox call
        w4 = w.view(m * groups, 4)
        return (_interleaved([_combine(w4[:, k], z * s, subtract) for k, z in enumerate(zs)], m, n),)
    return (_combine(w, _interleaved([z * s for z in zs], m, n), subtract),)


def _compiled(kind: str, example: list[torch.Tensor], **static):
    """The inductor-compiled graph of ``_e_graph``/``_add_graph`` for these example inputs (cached per shape,
    strides, dtypes, options and torch's thread count, which inductor bakes into the loop)."""
    key = (kind, *((tuple(t.shape), t.stride(), t.dtype) for t in example), tuple(sorted(static.items())),
           torch.get_num_threads())
    fn = _CACHE.get(key)
    if fn is None:
        with _LOCK:
            fn = _CACHE.get(key)
            if fn is None:
                from torch._inductor import compile as inductor_compile
                from torch._inductor import config
                from torch.fx.experimental.proxy_tensor import make_fx

                graph = _e_graph if kind == "e" else _add_graph
                with torch.no_grad():
                    gm = make_fx(lambda *args: graph(*args, **static))(*example)
                # keep E's rounding to a half-precision W's dtype, which inductor otherwise skips inside a loop
                with config.patch(emulate_precision_casts=True):
                    fn = _CACHE[key] = inductor_compile(gm, example)
    return fn


def _key(seed: int) -> torch.Tensor:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} must fit 64 bits")
    return torch.tensor([seed & _MASK, seed >> 32], dtype=torch.int64)


def _check_shape(m: int, n: int) -> None:
    if m >= 2**32 or n >= 2**34:  # the counter's words: row < 2**32, column group < 2**32
        raise ValueError(f"shape {(m, n)} exceeds the counter range (rows < 2**32, columns < 2**34)")


def noise(shape: tuple[int, ...], scale: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``E`` of ``shape`` (logical, rows first) in ``dtype`` on CPU: computed in fp32, cast once."""
    if len(shape) == 0:
        raise ValueError("filter noise needs a weight of at least one dimension (rows first)")
    m, n = shape[0], math.prod(shape[1:])
    if m == 0 or n == 0:
        return torch.empty(shape, dtype=dtype)
    _check_shape(m, n)
    scale = scale.detach().to(dtype=torch.float32).contiguous()
    key = _key(seed)
    with torch.no_grad():
        (e,) = _compiled("e", [scale, key], m=m, n=n, dtype=dtype)(scale, key)
    return e.reshape(shape)


def add_noise(weight: torch.Tensor, scale: torch.Tensor, seed: int, *, subtract: bool = False,
              inplace: bool = False) -> torch.Tensor:
    """``weight +/- E`` (``weight`` on CPU in logical layout, any strides) in one pass where the rows are
    contiguous and ``n`` is a multiple of 4 (else ``E`` is formed inside the compiled graph and added there).

    ``inplace=True`` writes the result into ``weight`` (a copy after the compiled pass) and returns it; otherwise
    a new contiguous tensor. A layout without an ``(m, n)`` view (channels-last convs) goes through a copy. No
    autograd graph is recorded (flatlora draws on detached weights).
    """
    if weight.dim() == 0:
        raise ValueError("filter noise needs a weight of at least one dimension (rows first)")
    m, n = weight.shape[0], math.prod(weight.shape[1:])
    if m == 0 or n == 0:
        return weight if inplace else weight.clone()
    _check_shape(m, n)
    try:
        w2 = weight.view(m, n)
    except RuntimeError:  # e.g. channels-last conv weights
        w2 = weight.reshape(m, n)
    w2, scale, key = w2.detach(), scale.detach().to(dtype=torch.float32).contiguous(), _key(seed)
    with torch.no_grad():
        (out,) = _compiled("add", [w2, scale, key], m=m, n=n, subtract=subtract)(w2, scale, key)
    out = out.view(weight.shape)
    return weight.copy_(out) if inplace else out


def probe(device: torch.device | str = "cpu") -> None:
    """Compile and run the draw once (a bf16 ``W + E`` of 2 x 8 and a 63-bit seed); raises whatever stops it
    (no C++ compiler, an inductor error)."""
    w = torch.zeros(2, 8, dtype=torch.bfloat16)
    out = add_noise(w, torch.ones(2), 2**62 + 1)
    if not torch.isfinite(out.float()).all() or out.abs().sum() == 0:
        raise RuntimeError("the compiled Philox draw gave no finite noise")

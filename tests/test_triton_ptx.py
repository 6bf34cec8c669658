"""The Triton noise kernel as the GPU will run it, checked on CPU: compiled for a CUDA target, and launched.

No GPU is needed: ``triton.compile`` lowers the kernel to PTX for ``GPUTarget("cuda", 90, 32)`` (sm_90, an
H100/H200) on any machine with the triton wheel (its ``ptxas`` ships in ``triton/backends/nvidia/bin`` for the
last stage). The kernel's launches are recorded instead of run (a stand-in for ``_noise_kernel[grid]``), so
the checks see exactly the arguments and compile options `flatlora._triton_noise` passes, then compile those.

What the interpreter cannot show: with multiply-add fusion (Triton's default through 3.9) fp32 ``w + z * s``
becomes ``fma(z, s, w)``, one rounding instead of torch's two (``w + round(z * s)``), and ``W + E`` stops being
bit-identical to adding the kernel's own ``E``. The reference here is the kernel's ``E``-only variant: the
``W + E`` path must add no ``fma`` to it (Box-Muller's ``log``/``cos`` from libdevice hold explicit ones, the
same in both), and, as a control, the same launch compiled *with* fusion must add some.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel, not interpreted"),
]

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


class _Recorder:
    """Stands in for ``_noise_kernel``: ``kernel[grid](*args, **kwargs)`` records the launch, runs nothing."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@pytest.fixture
def recorder(monkeypatch):
    from flatlora import _triton_noise

    rec = _Recorder(_triton_noise._noise_kernel)
    monkeypatch.setattr(_triton_noise, "_noise_kernel", rec)
    return rec


def _arg_type(v) -> str:
    """Triton's type for a launch argument (pointers by dtype; ints by range, as its launcher picks)."""
    if isinstance(v, torch.Tensor):
        return "*" + _TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    return "i32" if -2**31 <= v < 2**31 else ("i64" if v < 2**63 else "u64")


def _ptx(kernel, launch, **override) -> str:
    """PTX of one recorded launch for sm_90, with its own compile options (``override`` replaces some)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, args, kwargs = launch
    names = kernel.arg_names
    constexprs = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names} | override
    signature = {name: _arg_type(v) for name, v in zip(names, args)} | {k: "constexpr" for k in constexprs}
    src = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _fmas(ptx: str) -> int:
    return len(re.findall(r"^\s*fma\.", ptx, flags=re.M))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w_plus_e_compiles_without_fused_multiply_add(recorder, dtype):
    from flatlora import _triton_noise

    w = torch.randn(64, 2048).to(dtype)
    scale = torch.rand(64)
    _triton_noise.add_noise(w, scale, 2**62 + 12345)
    _triton_noise.add_noise(w, scale, 2**62 + 12345, subtract=True)
    _triton_noise.noise(tuple(w.shape), scale, 2**62 + 12345, dtype)
    kernel, (add, sub, e_only) = recorder.kernel, recorder.launches
    assert (add[2]["HAS_W"], sub[2]["SUBTRACT"], e_only[2]["HAS_W"]) == (True, True, False)
    base = _fmas(_ptx(kernel, e_only))
    assert base > 0  # libdevice's log/cos: the count is read from real PTX
    added = {"W + E": _fmas(_ptx(kernel, add)) - base, "W - E": _fmas(_ptx(kernel, sub)) - base}
    assert added == {"W + E": 0, "W - E": 0}, "fused multiply-adds: launch with enable_fp_fusion=False"
    if dtype == torch.float32:  # control: fusion on turns fp32 w + z * s into fma, so the check above can fail
        assert _fmas(_ptx(kernel, add, enable_fp_fusion=True)) > base


def test_the_probe_compiles_the_variant_real_steps_use(recorder):
    """A bf16 ``W + E`` with a 63-bit seed (an int64 argument: a seed below 2**31 compiles an int32 variant)."""
    from flatlora import _triton_noise

    _triton_noise.probe(torch.device("cpu"))
    (_, args, kwargs), = recorder.launches
    seed = args[recorder.kernel.arg_names.index("seed")]
    assert args[0].dtype == torch.bfloat16 and kwargs["HAS_W"] and not kwargs["SUBTRACT"]
    assert _arg_type(seed) == "i64" and seed >= 2**62
    assert kwargs.get("enable_fp_fusion") is False


@pytest.mark.parametrize("shape", [(2**31 - 1, 4), (2**31 - 200, 4), (4, 2**31 - 1), (4, 2**31 - 400)])
def test_shapes_past_the_int32_indices_are_refused(recorder, shape):
    """Rows and columns are int32 in the kernel: the last tile's indices must stay below 2**31."""
    from flatlora import _triton_noise

    w = torch.zeros(1, dtype=torch.bfloat16).expand(*shape)  # no memory: stride 0, written in place
    with pytest.raises(ValueError, match=r"2\*\*31"):
        _triton_noise.add_noise(w, torch.ones(1).expand(shape[0]), 1, inplace=True)
    assert recorder.launches == []


def test_the_largest_admitted_shapes_launch(recorder):
    """The widest admitted weight launches (the tallest would need an 8 GiB row-std vector: its bound is
    checked against the tiles instead)."""
    from flatlora import _triton_noise

    w = torch.zeros(1, dtype=torch.bfloat16).expand(4, _triton_noise.MAX_COLS)
    _triton_noise.add_noise(w, torch.ones(4), 1, inplace=True)
    assert len(recorder.launches) == 1
    tiles = (_triton_noise.ROW_TILE, _triton_noise.COL_TILE)
    assert _triton_noise.MAX_ROWS + max(t[0] for t in tiles) <= 2**31
    assert _triton_noise.MAX_COLS + max(t[1] for t in tiles) <= 2**31

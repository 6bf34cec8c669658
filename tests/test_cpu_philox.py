"""The noise backend "inductor" (flatlora._cpu_philox): the Triton kernel's Philox draw, compiled for CPU.

References, independent of the code under test:

* the NumPy Philox-4x32-10 of tests/test_triton_noise.py (checked there on Random123's known-answer vectors)
  with Triton's uniform and Box-Muller conversions: the 32-bit words bit for bit, ``E`` to a few ulp (the
  ``log``/``cos``/``sin`` are SLEEF's here, NumPy's there);
* the Triton kernel itself under Triton's interpreter (in a subprocess, as tests/test_triton_noise.py runs it);
* torch's ``W +/- E.to(W.dtype)`` with the backend's own materialised ``E``, bit for bit, in every dtype and
  layout; forward and backward of the exact op against one materialised ``E``.

Each distinct (shape, dtype, operation) compiles once (a few seconds): the cases are few and tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from flatlora import _cpu_philox, noise
from flatlora.noise import layer_seed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_triton_noise import philox4x32, reference_noise  # noqa: E402

MAX_ULP = 4  # measured: 72% of 1M elements equal, 24% 1 ulp, 3% 2 ulp, 0.2% 3 ulp, 2e-5 4 ulp (docs/cost.md)
DEF_CASES = {"odd": ((37, 53), 3), "one-row": ((1, 3), 2**40 + 3), "wide-tail": ((5, 1030), 2**63 - 1),
             "conv": ((6, 3, 3, 3), layer_seed(0, 1, 0, 4)), "fours": ((9, 44), layer_seed(1, 2, 3, 4))}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@pytest.fixture(autouse=True)
def inductor_backend(monkeypatch):
    monkeypatch.setitem(noise._state, "backend", "inductor")
    monkeypatch.setitem(noise._state, "probed", {})


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _scale(m, seed=1):
    return torch.rand(m, generator=_g(seed)) + 0.1


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two fp32 tensors of the same signs (int32 bit patterns)."""
    assert a.dtype == b.dtype == torch.float32
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


# --- the definition ---------------------------------------------------------------------------------------
def test_the_philox_words_are_the_references_bit_for_bit():
    """The int64 formulation (wrapping products, lazy masks) against the NumPy Philox on random counters and
    keys, including words >= 2**31 and the all-ones key."""
    gen = np.random.default_rng(0)
    c0 = gen.integers(0, 2**32, 500, dtype=np.uint64)
    c1 = gen.integers(0, 2**32, 500, dtype=np.uint64)
    for key in [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0x12345678, 0x7FFFFFFF), (3, 2**31 + 5)]:
        want = philox4x32((c0, c1, 0 * c0, 0 * c0), key)
        got = _cpu_philox._philox(torch.from_numpy(c0.astype(np.int64)), torch.from_numpy(c1.astype(np.int64)),
                                  torch.tensor(key, dtype=torch.int64))
        for g, w in zip(got, want):
            assert torch.equal(g, torch.from_numpy(w.astype(np.int64)))


@pytest.mark.parametrize("case", list(DEF_CASES))
def test_noise_is_the_philox_definition_element_by_element(case):
    """Odd shapes (n mod 4 = 1, 2, 3 and 0), a conv shape, one row, seeds whose high 32 bits matter: within a
    few ulp of the reference everywhere (a wrong element would be O(1) away)."""
    shape, seed = DEF_CASES[case]
    scale = _scale(shape[0])
    e = noise.filter_noise(shape, scale, seed)
    assert e.shape == shape and e.dtype == torch.float32
    ref = reference_noise(shape, scale, seed)
    assert int(ulp_distance(e, ref).max()) <= MAX_ULP
    assert (e == ref).float().mean() > 0.3  # most elements equal bit for bit


def test_the_high_half_of_the_seed_is_part_of_the_key():
    shape, seed = DEF_CASES["one-row"]
    scale = _scale(shape[0])
    e = noise.filter_noise(shape, scale, seed)
    assert not torch.allclose(e, reference_noise(shape, scale, seed & 0xFFFFFFFF))


def test_the_numbers_do_not_depend_on_torchs_thread_count():
    """inductor splits the loop over the threads (and compiles per thread count): every element is a function of
    (seed, row, column) only."""
    w = torch.randn(64, 520, generator=_g(2))
    scale = noise.row_scale(w, 0.1)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(noise.add_filter_noise(w, scale, 17))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


# --- W +/- E, dtypes and layouts --------------------------------------------------------------------------
def _layout(w: torch.Tensor, layout: str) -> torch.Tensor:
    sys.path.insert(0, str(HERE))
    import _triton_runner

    return _triton_runner._layout(w, layout)


@pytest.mark.parametrize("sub", [False, True], ids=["add", "sub"])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_w_plus_minus_e_is_adding_the_materialised_e(dname, sub):
    """One pass over W (n a multiple of 4, rows contiguous), new tensor: bit-identical to torch's
    ``W +/- E.to(W.dtype)`` with the backend's own ``E`` in that dtype (itself the fp32 draw cast once)."""
    dtype = DTYPES[dname]
    w = (torch.randn(19, 44, generator=_g(3)) * 0.02).to(dtype)
    scale = noise.row_scale(w, 0.2)
    seed = layer_seed(3, 7, 1, 2)
    e = noise.filter_noise(w.shape, scale, seed, dtype)
    assert torch.equal(e, noise.filter_noise(w.shape, scale, seed).to(dtype))
    got = noise.add_filter_noise(w, scale, seed, subtract=sub)
    assert got.dtype == dtype and torch.equal(got, w - e if sub else w + e)


@pytest.mark.parametrize("layout", ["transposed", "strided", "odd-columns"])
@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_other_layouts_and_widths_in_place(dname, layout):
    """GPT-2 Conv1D's transposed storage, a column slice inside a frame (left untouched) and a width that is
    not a multiple of 4 (E formed inside the compiled graph): in place, bit-identical to adding E."""
    dtype = DTYPES[dname]
    shape = (19, 45) if layout == "odd-columns" else (19, 44)
    w0 = (torch.randn(shape, generator=_g(4)) * 0.02).to(dtype)
    w = _layout(w0, "contiguous" if layout == "odd-columns" else layout)
    frame = w._base.clone() if layout == "strided" else None
    scale = noise.row_scale(w0, 0.2)
    e = noise.filter_noise(shape, scale, 11, dtype)
    out = noise.add_filter_noise(w, scale, 11, inplace=True)
    assert out is w and torch.equal(w, w0 + e)
    if frame is not None:
        mask = torch.ones_like(frame, dtype=torch.bool)
        mask[2:2 + shape[0], 1:1 + 2 * shape[1]:2] = False
        assert torch.equal(w._base[mask], frame[mask])


def test_conv_weights_in_any_memory_format_draw_the_same_e():
    conv = torch.randn(4, 3, 2, 3, generator=_g(5))
    scale = noise.row_scale(conv, 0.3)
    last = conv.contiguous(memory_format=torch.channels_last)
    a = noise.add_filter_noise(conv.clone(), scale, 11)
    b = noise.add_filter_noise(last, scale, 11, inplace=True)
    assert b is last and torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)


def test_add_then_subtract_restores_fp32_weights_to_rounding():
    """The in-place mode's round trip."""
    w = torch.randn(16, 32, generator=_g(6)) * 0.02
    scale = noise.row_scale(w, 0.5)
    back = noise.add_filter_noise(noise.add_filter_noise(w.clone(), scale, 5, inplace=True), scale, 5,
                                  subtract=True, inplace=True)
    e = noise.filter_noise(w.shape, scale, 5)
    assert ((back - w).abs() <= 2 * torch.finfo(torch.float32).eps * (w.abs() + e.abs())).all()


# --- inside the exact op ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_forward_and_backward_draw_the_same_e(path):
    """``PerturbedOp`` (eager) and ``flatlora::perturbed`` under torch.compile draw ``E`` in forward and again
    in backward with this backend: output and input gradient equal ``F.linear(x, W + E)`` and ``g @ (W + E)``
    with one materialised ``E``."""
    import _triton_runner

    job = {"kind": "exact", "x": torch.randn(2, 5, 24, generator=_g(7)), "w": torch.randn(10, 24, generator=_g(8)),
           "b": torch.randn(10, generator=_g(9)), "g": torch.randn(2, 5, 10, generator=_g(10)),
           "seed": layer_seed(0, 3, 0, 1), "scale": torch.rand(10, generator=_g(11)) + 0.1,
           "compiled": path == "compiled"}
    res = _triton_runner._run(job, "cpu")
    y, gx = res[path]
    y_ref, gx_ref = res["reference"]
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    e = res["e"]
    assert torch.equal(e, noise.filter_noise((10, 24), job["scale"], job["seed"]))  # the backend's E
    assert int(ulp_distance(e, reference_noise((10, 24), job["scale"], job["seed"])).max()) <= MAX_ULP


# --- against the Triton kernel under its interpreter ------------------------------------------------------
def test_the_same_e_as_the_triton_kernel():
    """The Triton kernel under ``TRITON_INTERPRET=1`` (its own subprocess) and this backend: the same samples,
    to a few ulp of ``log``/``cos``/``sin``, as ``E`` alone and as ``W + E`` in bf16."""
    pytest.importorskip("triton")
    import tempfile

    w = torch.randn(6, 36, generator=_g(12)) * 0.05
    scale = noise.row_scale(w, 0.3)
    jobs = {"e": {"kind": "noise", "shape": (7, 30), "seed": 2**62 + 9, "dtype": torch.float32,
                  "scale": _scale(7)},
            "w": {"kind": "add", "w": w.bfloat16(), "scale": scale, "seed": 21, "subtract": False,
                  "inplace": False}}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(jobs, f"{tmp}/jobs.pt")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, str(HERE / "_triton_runner.py"), f"{tmp}/jobs.pt", f"{tmp}/out.pt"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        triton_out = torch.load(f"{tmp}/out.pt", weights_only=False)
    mine = noise.filter_noise((7, 30), jobs["e"]["scale"], jobs["e"]["seed"])
    assert int(ulp_distance(mine, triton_out["e"]).max()) <= MAX_ULP
    assert (mine == triton_out["e"]).float().mean() > 0.3
    got = noise.add_filter_noise(w.bfloat16(), scale, 21).float()
    # one bf16 ulp at most, where an fp32 ulp of E tips the rounding of W + E
    tri = triton_out["w"]["out"].float()
    assert ((got - tri).abs() <= 2 ** -7 * tri.abs()).all() and (got == tri).float().mean() > 0.9


# --- choosing the backend, and the fallback ---------------------------------------------------------------
def test_backend_for_says_inductor_and_the_environment_variable_selects_it():
    assert noise.backend_for("cpu") == "inductor"
    assert noise.backend_for("cpu", torch.float8_e4m3fn) == "torch"  # no kernel dtype: torch
    code = "import flatlora.noise as n; print(n.backend_for('cpu'))"
    env = {**os.environ, "FLATLORA_NOISE_BACKEND": "inductor", "PYTHONPATH": str(HERE.parent / "src")}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0 and got.stdout.strip() == "inductor", got.stderr[-2000:]


def test_without_a_compiler_forced_inductor_is_a_clear_error_and_auto_falls_back(tmp_path):
    """No C++ compiler (``CXX`` pointing nowhere, inductor's caches empty): ``"inductor"`` raises naming the
    fix; ``"auto"`` with the CPU default set to inductor warns once and draws with torch's generator."""
    code = """
import warnings, torch
import flatlora.noise as n
try:
    n.filter_noise((2, 8), torch.ones(2), 1)
    print("no error")
except RuntimeError as exc:
    print("error:", exc)
n.set_backend("auto")
n._AUTO_CPU = "inductor"
n._state["probed"].clear()  # as a fresh process would start
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    e = n.filter_noise((2, 8), torch.ones(2), 1)
    print("backend:", n.backend_for("cpu"), "warnings:", len(caught))
want = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
print("torch draw:", torch.equal(e, want))
"""
    env = {**os.environ, "FLATLORA_NOISE_BACKEND": "inductor", "CXX": str(tmp_path / "no-such-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "PYTHONPATH": str(HERE.parent / "src")}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    lines = got.stdout.strip().splitlines()
    assert lines[0].startswith("error: noise backend 'inductor'") and "C++ compiler" in lines[0], lines
    assert lines[1] == "backend: torch warnings: 1" and lines[2] == "torch draw: True", lines


def test_a_failing_probe_in_auto_leaves_cpu_on_torch_for_good(monkeypatch):
    calls = []

    def failing(device="cpu"):
        calls.append(device)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(_cpu_philox, "probe", failing)
    monkeypatch.setattr(noise, "_AUTO_CPU", "inductor")
    monkeypatch.setitem(noise._state, "backend", "auto")
    with pytest.warns(UserWarning, match="inductor noise kernel failed"):
        assert noise.backend_for("cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert noise.backend_for("cpu") == "torch"  # probed once: no second warning
    assert len(calls) == 1

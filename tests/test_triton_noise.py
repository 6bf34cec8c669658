"""The Triton noise kernel (flatlora._triton_noise) against independent references.

On a GPU the kernel runs compiled, in this process; on CPU under Triton's interpreter in one subprocess
(``TRITON_INTERPRET=1`` must precede triton's first import, see tests/_triton_runner.py) that runs every job
below at once; each test then checks its job's output here. References:

* a NumPy Philox-4x32-10 written from the Random123 paper (checked on its known-answer vectors) with Triton's
  uniform and Box-Muller conversions: the definition ``E[i, j] = s[i] * N_{j mod 4}(seed, i, j // 4)``
  element by element, at odd shapes and 63-bit seeds;
* the kernel's own materialised ``E`` (E-only mode) for ``W +/- E`` in bf16/fp16/fp32/fp64: bit-identical to
  torch's ``W + E.to(W.dtype)`` computed here, in every memory layout;
* sample statistics for the distribution and the independence across layers and steps.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flatlora import noise
from flatlora.noise import layer_seed

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
SIGMA = 0.05
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton; the dev extra has it)")


# --- the reference: Philox-4x32-10 (Salmon et al., SC'11; Random123) and Triton's conversions, in NumPy -------
def philox4x32(counter, key, rounds=10):
    """Four uint32 outputs per (counter, key); arrays broadcast. Round: ``(hi(M1*c2)^c1^k0, lo(M1*c2),
    hi(M0*c0)^c3^k1, lo(M0*c0))``, then the key is bumped by the Weyl constants."""
    m0, m1, w0, w1, mask = (np.uint64(v) for v in (0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF))
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    for _ in range(rounds):
        p0, p1 = m0 * c0, m1 * c2
        hi1, hi0 = p1 >> np.uint64(32), p0 >> np.uint64(32)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0) & mask, p1 & mask, (hi0 ^ c3 ^ k1) & mask, p0 & mask
        k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    return c0, c1, c2, c3


def _uniform(x):
    """Triton's uint_to_uniform_float: the int32 bit pattern, negatives complemented, times 2^-31 (fp32)."""
    i = x.astype(np.uint32).view(np.int32)
    i = np.where(i < 0, ~i, i)
    return i.astype(np.float32) * np.float32(4.6566127342e-10)


def _box_muller(u1, u2):
    u1 = np.maximum(np.float32(1e-7), u1)
    th = np.float32(6.283185307179586) * u2
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return r * np.cos(th), r * np.sin(th)


def reference_noise(shape, scale, seed):
    """``E`` by the definition in flatlora._triton_noise, in fp32 NumPy."""
    m, n = shape[0], math.prod(shape[1:])
    i, j = np.meshgrid(np.arange(m, dtype=np.uint64), np.arange(n, dtype=np.uint64), indexing="ij")
    zero = np.zeros_like(i)
    out = philox4x32((j // np.uint64(4), i, zero, zero), (seed & 0xFFFFFFFF, seed >> 32))
    n0, n1 = _box_muller(_uniform(out[0]), _uniform(out[1]))
    n2, n3 = _box_muller(_uniform(out[2]), _uniform(out[3]))
    k = (j % np.uint64(4)).astype(np.int64)
    z = np.choose(k, [n0, n1, n2, n3])
    return torch.from_numpy((z * scale.numpy()[:, None]).astype(np.float32)).reshape(shape)


def test_philox_reference_matches_random123_known_answers():
    """Random123's kat_vectors for philox4x32_10: the reference generator is Philox, not a look-alike."""
    f = 0xFFFFFFFF
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((f, f, f, f), (f, f), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        assert tuple(int(v) for v in philox4x32(counter, key)) == want


# --- the jobs, run once per module ------------------------------------------------------------------------
def _g(seed):
    return torch.Generator().manual_seed(seed)


DEF_CASES = {"odd": ((37, 53), 3), "one-row": ((1, 3), 2**40 + 3), "wide-tail": ((5, 1030), 2**63 - 1),
             "conv": ((6, 3, 3, 3), layer_seed(0, 1, 0, 4))}
STAT_SHAPE = (64, 4096)
STAT_SEEDS = {"t1-l0": layer_seed(0, 1, 0, 0), "t1-l1": layer_seed(0, 1, 0, 1), "t2-l0": layer_seed(0, 2, 0, 0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LAYOUTS = ["contiguous", "transposed", "strided"]


def _jobs() -> dict:
    jobs = {}
    for name, (shape, seed) in DEF_CASES.items():
        jobs[f"def-{name}"] = {"kind": "noise", "shape": shape, "seed": seed, "dtype": torch.float32,
                               "scale": torch.rand(shape[0], generator=_g(1)) + 0.1}
    w_stat = torch.randn(STAT_SHAPE, generator=_g(2)) * torch.logspace(-2, 1, STAT_SHAPE[0]).unsqueeze(1)
    for name, seed in STAT_SEEDS.items():
        jobs[f"stat-{name}"] = {"kind": "noise", "shape": STAT_SHAPE, "seed": seed, "dtype": torch.float32,
                                "scale": noise.row_scale(w_stat, SIGMA)}
    shape, seed = (19, 45), layer_seed(3, 7, 1, 2)
    w32 = torch.randn(shape, generator=_g(3)) * 0.02
    scale = noise.row_scale(w32, 0.2)
    for dname, dtype in DTYPES.items():
        w = w32.to(dtype)
        jobs[f"e-{dname}"] = {"kind": "noise", "shape": shape, "seed": seed, "dtype": dtype, "scale": scale}
        for layout in LAYOUTS:
            for sub in (False, True):
                for inplace in (False, True):
                    jobs[f"add-{dname}-{layout}-{'sub' if sub else 'add'}-{'inplace' if inplace else 'new'}"] = {
                        "kind": "add", "w": w, "scale": scale, "seed": seed, "subtract": sub, "inplace": inplace,
                        "layout": layout}
    conv = torch.randn(4, 3, 2, 3, generator=_g(4))
    for layout in ("contiguous", "channels_last"):
        jobs[f"conv-{layout}"] = {"kind": "add", "w": conv, "scale": noise.row_scale(conv, 0.3), "seed": 11,
                                  "subtract": False, "inplace": True, "layout": layout}
    w = torch.randn(21, 70, generator=_g(5))
    jobs["tiles"] = {"kind": "tiles", "w": w, "scale": noise.row_scale(w, 0.1), "seed": 99,
                     "tiles": [(8, 512), (1, 4), (4, 32), (32, 16)]}
    jobs["exact"] = {"kind": "exact", "x": torch.randn(2, 5, 24, generator=_g(6)),
                     "w": torch.randn(10, 24, generator=_g(7)),
                     "b": torch.randn(10, generator=_g(8)), "g": torch.randn(2, 5, 10, generator=_g(9)),
                     "seed": layer_seed(0, 3, 0, 1), "scale": torch.rand(10, generator=_g(10)) + 0.1, "compiled": True}
    jobs["cast"] = {"kind": "cast_bf16", "x": _rounding_cases()}
    return jobs


def _rounding_cases() -> torch.Tensor:
    """fp32 values for the bf16 rounding: exact ties (low 16 bits 0x8000, odd and even), just off ties, a wide
    range of magnitudes, subnormals, zeros, infinities and NaN."""
    hi = torch.randint(0, 2**16, (2000,), generator=_g(11), dtype=torch.int64) << 16
    low = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0001, 0xFFFF]).repeat(400)
    bits = (hi | low).to(torch.int64)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    wide = torch.randn(2000, generator=_g(12)) * torch.logspace(-40, 38, 2000)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -3e-39])
    return torch.cat([bits.view(torch.float32), wide, special])


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    jobs = _jobs()
    if CUDA:
        sys.path.insert(0, str(HERE))
        import _triton_runner

        return _triton_runner.run(jobs, "cuda")
    tmp = tmp_path_factory.mktemp("triton")
    torch.save(jobs, tmp / "jobs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(HERE / "_triton_runner.py"), str(tmp / "jobs.pt"), str(tmp / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(tmp / "out.pt", weights_only=False)


# --- the definition ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(DEF_CASES))
def test_noise_is_the_philox_definition_element_by_element(out, case):
    """Odd shapes (not multiples of any tile), a conv shape, one row, and seeds whose high 32 bits matter."""
    shape, seed = DEF_CASES[case]
    e = out[f"def-{case}"]
    scale = _jobs()[f"def-{case}"]["scale"]
    assert e.shape == shape and e.dtype == torch.float32
    # the interpreter's log/cos are NumPy's; a GPU's may be approximations a few ulp off (an error of ~1e-4 near
    # r = 0, where Box-Muller's sqrt amplifies it): still far below any wrong element (O(1))
    rtol, atol = (1e-4, 1e-4) if CUDA else (2e-5, 2e-6)
    torch.testing.assert_close(e, reference_noise(shape, scale, seed), rtol=rtol, atol=atol)


def test_the_high_half_of_the_seed_is_part_of_the_key(out):
    """Seeds equal in their low 32 bits draw different noise: the 63-bit seed is the whole Philox key."""
    shape, seed = DEF_CASES["one-row"]
    scale = _jobs()["def-one-row"]["scale"]
    low_only = reference_noise(shape, scale, seed & 0xFFFFFFFF)
    assert not torch.allclose(out["def-one-row"], low_only)


def test_tiles_do_not_change_the_numbers(out):
    first, *others = out["tiles"]
    assert all(torch.equal(first, o) for o in others)


# --- the distribution -------------------------------------------------------------------------------------
def test_row_std_and_mean_follow_the_formula(out):
    """``E[i, :] ~ N(0, sigma^2 ||W[i, :]||^2 / n)``: rows spanning three decades of norm, n = 4096 per row."""
    w = torch.randn(STAT_SHAPE, generator=_g(2)) * torch.logspace(-2, 1, STAT_SHAPE[0]).unsqueeze(1)
    expected = SIGMA * w.norm(dim=1) / math.sqrt(STAT_SHAPE[1])
    for name in STAT_SEEDS:
        e = out[f"stat-{name}"]
        ratio = e.std(dim=1) / expected  # s.e. of a row std ~ 1/sqrt(2n) = 1.1%
        assert (ratio - 1).abs().max() < 0.05 and abs(ratio.mean().item() - 1) < 0.01
        assert ((e.mean(dim=1) / (expected / math.sqrt(STAT_SHAPE[1]))).abs() < 5).all()


def test_standardised_noise_is_normal(out):
    """Pooled over 262k draws: moments of N(0, 1) and the Kolmogorov distance to its CDF."""
    z = torch.cat([(out[f"stat-{n}"] / out[f"stat-{n}"].std(dim=1, keepdim=True)).flatten() for n in STAT_SEEDS])
    z = z.double()
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs((z**3).mean().item()) < 0.05 and abs((z**4).mean().item() - 3) < 0.1
    srt = z.sort().values
    cdf = 0.5 * (1 + torch.erf(srt / math.sqrt(2)))
    ks = (cdf - torch.arange(1, z.numel() + 1, dtype=torch.float64) / z.numel()).abs().max().item()
    assert ks < 1.63 / math.sqrt(z.numel())  # 1% critical value


def test_independent_across_layers_steps_and_neighbouring_elements(out):
    """Correlations below 5 standard errors (1/sqrt(N)): other layer, other step, and within one draw the
    neighbours that share a Philox call (columns 4g..4g+3), a Box-Muller pair, or the counter's row word."""
    zs = {n: out[f"stat-{n}"] / out[f"stat-{n}"].std(dim=1, keepdim=True) for n in STAT_SEEDS}

    def corr(a, b):
        a, b = a.flatten().double(), b.flatten().double()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    bound = 5 / math.sqrt(zs["t1-l0"].numel() / 2)
    assert abs(corr(zs["t1-l0"], zs["t1-l1"])) < bound
    assert abs(corr(zs["t1-l0"], zs["t2-l0"])) < bound
    z = zs["t1-l0"]
    for lag in (1, 2, 3, 4):
        assert abs(corr(z[:, :-lag], z[:, lag:])) < bound, lag
    assert abs(corr(z[:-1], z[1:])) < bound  # next row, same columns
    assert abs(corr(z[:, 0::4] ** 2, z[:, 1::4] ** 2)) < bound  # cos/sin of one Box-Muller pair: radius shared


# --- W +/- E, dtypes and layouts --------------------------------------------------------------------------
@pytest.mark.parametrize("dname", list(DTYPES))
def test_e_only_in_a_dtype_is_the_fp32_draw_cast_once(out, dname):
    assert torch.equal(out[f"e-{dname}"], out["e-fp32"].to(DTYPES[dname]))


@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
@pytest.mark.parametrize("sub", [False, True], ids=["add", "sub"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dname", list(DTYPES))
def test_w_plus_minus_e_is_adding_the_materialised_e(out, dname, layout, sub, inplace):
    """Bit-identical to torch's ``W +/- E.to(W.dtype)`` with ``E`` the kernel's own E-only output, in contiguous,
    transposed (GPT-2 Conv1D) and strided (a column slice inside a frame) layouts, new tensor or in place."""
    name = f"add-{dname}-{layout}-{'sub' if sub else 'add'}-{'inplace' if inplace else 'new'}"
    job, res = _jobs()[name], out[name]
    e = out[f"e-{dname}"]
    want = job["w"] - e if sub else job["w"] + e
    assert res["out"].dtype == DTYPES[dname] and torch.equal(res["out"], want)
    assert res["same_object"] is inplace
    if layout == "transposed" or inplace:  # the result keeps the weight's layout
        assert res["stride"] == res["w_stride"]
    if layout == "strided":  # only the view's elements were written
        frame_mask = torch.ones_like(res["frame_after"], dtype=torch.bool)
        m, n = job["w"].shape
        frame_mask[2:2 + m, 1:1 + 2 * n:2] = False
        assert torch.equal(res["frame_after"][frame_mask], res["frame_before"][frame_mask])


def test_add_then_subtract_restores_fp32_weights_to_rounding(out):
    """The in-place mode's round trip ``(W + E) - E`` (both from the kernel) against ``W``: fp32 rounding."""
    w = _jobs()["add-fp32-contiguous-add-new"]["w"]
    e = out["e-fp32"]
    noisy = out["add-fp32-contiguous-add-new"]["out"]
    back = noisy - e  # what the kernel's subtract computes, checked bitwise above
    assert torch.equal(out["add-fp32-contiguous-sub-new"]["out"], w - e)
    tol = 2 * torch.finfo(torch.float32).eps * (w.abs() + e.abs())
    assert ((back - w).abs() <= tol).all()
    assert torch.allclose(noisy - w, e, rtol=0, atol=float(tol.max()))


def test_conv_weights_in_any_memory_format_draw_the_same_e(out):
    contiguous, channels_last = out["conv-contiguous"]["out"], out["conv-channels_last"]["out"]
    assert torch.equal(contiguous, channels_last)
    assert out["conv-channels_last"]["same_object"]  # in place through a contiguous copy, written back
    assert out["conv-channels_last"]["stride"] == out["conv-channels_last"]["w_stride"]


def test_bf16_rounding_is_torchs_round_to_nearest_even(out):
    """Triton's interpreter truncates fp32 -> bf16; the kernel rounds by hand, to torch's result bit for bit."""
    x = _rounding_cases()
    got, want = out["cast"], x.bfloat16()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


# --- inside the exact op ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_forward_and_backward_draw_the_same_e(out, path):
    """``PerturbedOp`` (eager) and ``flatlora::perturbed`` under torch.compile draw ``E`` in forward and again in
    backward: output and input gradient equal ``F.linear(x, W + E)`` and ``g @ (W + E)`` with one materialised
    ``E`` (a different backward draw would change the gradient)."""
    y, gx = out["exact"][path]
    y_ref, gx_ref = out["exact"]["reference"]
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert out["exact"]["e"].abs().sum() > 0

"""Closed forms on a PEFT model whose loss is an exact quadratic in the merged weight (see _quadratic.py):
the Hessian is known, so eigenvalue, expected sharpness, SAM sharpness and landscapes have exact answers."""

import math

import pytest
import torch

from _threads import single_thread  # noqa: F401  (autouse: one thread per test module)
from _quadratic import loss_at, mean_hessian, merged, quadratic_batches, quadratic_loss, quadratic_model
from flatlora.analysis import (expected_sharpness, loss_landscape_1d, loss_landscape_2d, sam_sharpness,
                               top_hessian_eigenvalue)
from flatlora.analysis.landscape import filter_normalized_direction


@pytest.fixture(scope="module")
def problem():
    model = quadratic_model(n=10, m=8)
    w = merged(model)
    batches = quadratic_batches(w.numel(), n_batches=2)
    h = mean_hessian(batches)
    g = sum(b["H"] @ (w.reshape(-1) - b["c"]) for b in batches) / len(batches)
    return model, w, batches, h, g


def _noise_cov_diag(w: torch.Tensor, rho: float) -> torch.Tensor:
    """Flat-LoRA noise: entry (i, j) has variance rho^2 ||W_i||^2 / n, independent entries (row-major vec)."""
    return (rho**2 * w.pow(2).sum(1) / w.shape[1]).repeat_interleave(w.shape[1])


def test_top_eigenvalue_matches_the_true_top_eigenvalue(problem):
    model, _, batches, h, _ = problem
    true = torch.linalg.eigvalsh(h)
    lz = top_hessian_eigenvalue(model, quadratic_loss, batches, method="lanczos", iters=30, tol=1e-6,
                                progress=False)
    assert lz.converged and lz.value == pytest.approx(float(true[-1]), rel=1e-8)
    assert lz.residual < 1e-5 and lz.space == "full"
    # power iteration: slower; whatever it reached, the residual bounds its distance to an eigenvalue
    pw = top_hessian_eigenvalue(model, quadratic_loss, batches, method="power", iters=15, tol=1e-6,
                                progress=False)
    assert min(abs(float(ev) - pw.value) for ev in true) <= pw.residual + 1e-12
    assert pw.value == pytest.approx(float(true[-1]), rel=2e-2)


def test_expected_sharpness_matches_half_trace_of_h_times_the_noise_covariance(problem):
    model, w, batches, h, g = problem
    rho, k = 0.1, 300
    res = expected_sharpness(model, quadratic_loss, batches, rho=rho, n_samples=k, seed=4, progress=False)
    cov = _noise_cov_diag(w, rho)
    closed = 0.5 * float((torch.diag(h) * cov).sum())
    assert abs(res.sharpness - closed) < 4 * res.stderr
    # the standard error is the true one: Var[g.E + E^T H E / 2] = g^T C g + tr((H C)^2) / 2 for Gaussian E
    hc = h * cov  # H C with C diagonal (columns scaled)
    var = float(g @ (cov * g)) + 0.5 * float(torch.trace(hc @ hc))
    assert res.stderr == pytest.approx(math.sqrt(var / k), rel=0.25)
    assert res.loss == pytest.approx(loss_at(batches, w), rel=1e-12)
    assert len(res.samples) == k and res.perturbed_loss == pytest.approx(res.loss + res.sharpness, rel=1e-12)


def test_sam_sharpness_in_the_full_space_is_rho_g_plus_half_rho2_curvature(problem):
    model, _, batches, h, g = problem
    for rho in (0.05, 0.2):
        res = sam_sharpness(model, quadratic_loss, batches, rho=rho, space="full", progress=False)
        u = g / g.norm()
        closed = rho * float(g.norm()) + 0.5 * rho**2 * float(u @ h @ u)  # exact for a quadratic
        assert res.sharpness == pytest.approx(closed, rel=1e-9)
        assert res.grad_norm == pytest.approx(float(g.norm()), rel=1e-10)
        assert res.first_order == pytest.approx(rho * float(g.norm()), rel=1e-10)


def test_sam_sharpness_in_the_lora_space_moves_a_and_b_along_their_own_gradient(problem):
    """Reference by hand: G = dL/dW, dL/dA = s B^T G, dL/dB = s G A^T; evaluate at W0 + s(B + e_B)(A + e_A)."""
    model, w, batches, _, g = problem
    layer = model.base_model.model.fc
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    w0 = layer.base_layer.weight.detach()
    gw = g.reshape(w.shape)
    ga, gb = s * b.T @ gw, s * gw @ a.T
    rho = 0.05
    nrm = math.sqrt(float(ga.pow(2).sum() + gb.pow(2).sum()))
    w_new = w0 + s * (b + rho * gb / nrm) @ (a + rho * ga / nrm)
    res = sam_sharpness(model, quadratic_loss, batches, rho=rho, space="lora", progress=False)
    assert res.grad_norm == pytest.approx(nrm, rel=1e-10)
    assert res.sharpness == pytest.approx(loss_at(batches, w_new) - loss_at(batches, w), rel=1e-9)


def test_landscape_is_the_loss_at_the_centre_and_symmetric_for_a_quadratic(problem):
    model, w, batches, h, g = problem
    lz = loss_landscape_1d(model, quadratic_loss, batches, span=0.3, steps=9, seed=2, progress=False)
    l0 = loss_at(batches, w)
    assert lz.center_loss == l0  # offset 0 adds exactly 0
    assert lz.alphas == tuple(-a for a in reversed(lz.alphas))
    # for a quadratic, f(a) + f(-a) - 2 f(0) = a^2 d^T H d: symmetric part known exactly, odd part = 2 a g.d
    d = filter_normalized_direction(model, "full", seed=2)[0].reshape(-1)
    for a, fa, fm in zip(lz.alphas, lz.losses, reversed(lz.losses)):
        assert fa + fm - 2 * l0 == pytest.approx(a * a * float(d @ h @ d), rel=1e-9, abs=1e-9)
        assert fa - fm == pytest.approx(2 * a * float(g @ d), rel=1e-9, abs=1e-9)
    # at the minimiser of the quadratic (g = 0) the curve itself is symmetric (on a fresh copy of the model)
    centre = torch.linalg.solve(mean_hessian(batches), sum(b["H"] @ b["c"] for b in batches) / len(batches))
    model = quadratic_model(n=10, m=8)
    with torch.no_grad():
        base = model.base_model.model.fc.base_layer.weight
        delta = model.base_model.model.fc.get_delta_weight("default")
        base.copy_(centre.reshape(w.shape) - delta)
    sym = loss_landscape_1d(model, quadratic_loss, batches, span=0.3, steps=9, seed=2, progress=False)
    for fa, fm in zip(sym.losses, reversed(sym.losses)):
        assert fa == pytest.approx(fm, rel=1e-9)
    assert min(sym.losses) == sym.center_loss


def test_2d_landscape_centre_equals_the_loss_and_rows_are_quadratic(problem):
    model, w, batches, h, _ = problem
    surf = loss_landscape_2d(model, quadratic_loss, batches, span=0.2, steps=5, seed=1, progress=False)
    assert surf.center_loss == loss_at(batches, w)
    d1 = filter_normalized_direction(model, "full", seed=1, index=0)[0].reshape(-1)
    d2 = filter_normalized_direction(model, "full", seed=1, index=1)[0].reshape(-1)
    for i, a in enumerate(surf.alphas):
        for j, b in enumerate(surf.betas):
            want = loss_at(batches, w + (a * d1 + b * d2).reshape(w.shape))
            assert surf.losses[i][j] == pytest.approx(want, rel=1e-10)
    # filter-normalised: each row of D has the norm of the row of W (read in fp32 by Target.merged_weight)
    torch.testing.assert_close(d1.reshape(w.shape).norm(dim=1), w.norm(dim=1), rtol=1e-6, atol=0)
    assert not torch.allclose(d1, d2)

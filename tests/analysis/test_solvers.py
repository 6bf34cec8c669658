"""The eigen-solvers as pure functions on explicit symmetric matrices, against torch.linalg.eigh."""

import pytest
import torch

from _threads import single_thread  # noqa: F401  (autouse: one thread per test module)
from flatlora.analysis import lanczos, power_iteration


def _matrix(eigs: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return (q * torch.tensor(eigs, dtype=torch.float64)) @ q.T


def _matvec(a: torch.Tensor):
    """The operator on a vector split into two tensors (as the model's spaces are: one tensor per layer)."""
    k = a.shape[0] // 2

    def mv(v):
        y = a @ torch.cat([v[0].reshape(-1), v[1].reshape(-1)])
        return [y[:k].reshape(v[0].shape), y[k:]]

    return mv


def _start(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    return [x[: n // 2].reshape(2, -1), x[n // 2:]]


def test_lanczos_finds_the_largest_algebraic_eigenvalue_with_a_true_residual():
    eigs = torch.linspace(-3.0, 2.0, 40).tolist()
    eigs[-1] = 2.05  # small gap: hard for power iteration, easy for Lanczos
    eigs[0] = -4.0  # and the largest magnitude is negative
    a = _matrix(eigs)
    res = lanczos(_matvec(a), _start(40), iters=30, tol=1e-5)
    assert res.value == pytest.approx(2.05, abs=1e-8)
    y = torch.cat([t.reshape(-1) for t in res.vector])
    assert float(y.norm()) == pytest.approx(1.0)
    assert res.residual == pytest.approx(float((a @ y - res.value * y).norm()), rel=1e-6, abs=1e-12)
    assert res.converged and res.iterations <= 31


def test_power_iteration_finds_the_largest_magnitude_and_its_residual_bounds_the_error():
    a = _matrix([-4.0, 1.0, 0.5, 0.2, -0.1, 0.3, 0.7, 0.9])
    res = power_iteration(_matvec(a), _start(8), iters=200, tol=1e-9)
    assert res.converged and res.value == pytest.approx(-4.0, abs=1e-8)
    short = power_iteration(_matvec(_matrix([2.0, 1.9, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6])), _start(8), iters=5,
                            tol=1e-12)
    assert not short.converged and short.iterations == 5 and len(short.history) == 5
    assert min(abs(short.value - e) for e in (2.0, 1.9, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6)) <= short.residual


def test_an_exact_krylov_space_stops_lanczos_early():
    a = _matrix([3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two distinct eigenvalues: Krylov dim 2
    res = lanczos(_matvec(a), _start(8), iters=20, tol=1e-10)
    assert res.value == pytest.approx(3.0, abs=1e-10) and res.iterations <= 4


def test_a_zero_start_vector_is_refused():
    with pytest.raises(ValueError, match="start vector"):
        lanczos(_matvec(_matrix([1.0, 2.0])), [torch.zeros(1, 1, dtype=torch.float64),
                                               torch.zeros(1, dtype=torch.float64)])

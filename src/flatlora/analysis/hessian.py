"""Top eigenvalue of the loss Hessian w.r.t. the merged weights, from Hessian-vector products only.

``H = d^2 L / dW^2`` over all LoRA layers' merged weights at once (``W`` of every layer concatenated), or
over the adapter parameters (``space="lora"``). ``H v`` is computed exactly by double backward (see
`flatlora.analysis._space.Objective.hvp`), or (``hvp="central"``) by central differences of exact gradients,
``(g(eps v) - g(-eps v)) / 2 eps`` with ``eps = 1e-4 ||theta||`` (``theta``: the space's current values): two
ordinary backward passes, cheaper than a double backward through attention (~1.5x on MiniLM, CPU), with an
error of order ``eps^2`` plus fp32 rounding (tested against the exact product). ``H`` itself (``(sum mn)^2``
entries) is never formed.

Two solvers, both pure functions of a ``matvec`` on lists of tensors:

* `lanczos` (default): ``k`` Krylov steps with full re-orthogonalisation, then the largest Ritz value of the
  ``k x k`` tridiagonal matrix: the largest *algebraic* eigenvalue. It converges much faster than power
  iteration when the top eigenvalues are close. Keeps ``k`` vectors of the space's size.
* `power_iteration`: ``v <- Hv / ||Hv||``: the eigenvalue of largest *magnitude* (which can be a negative
  one away from a minimum). Keeps two vectors.

Both return the Rayleigh quotient ``lambda = v^T H v`` of a unit vector ``v`` and the measured residual
``r = ||H v - lambda v||`` (one extra product for Lanczos). For symmetric ``H`` some eigenvalue lies within
``r`` of ``lambda``: the residual certifies the estimate, whatever the solver's own stopping rule said.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._checks import check_batches, check_count, check_positive
from ..noise import layer_seed
from ._progress import bar
from ._space import LossFn, Objective, Space, Vector, axpy, check_space, dot, norm, scale

Matvec = Callable[[Vector], Vector]


@dataclass(frozen=True)
class EigenResult:
    """What a solver found: ``value`` (Rayleigh quotient of the unit ``vector``) and its residual."""

    value: float
    vector: Vector
    residual: float  # ||H v - value v||
    iterations: int  # products H v used (Lanczos: Krylov steps + 1 for the residual)
    converged: bool  # residual <= tol * |value|
    history: tuple[float, ...]  # the estimate after each step


def power_iteration(matvec: Matvec, v0: Vector, iters: int = 50, tol: float = 1e-3) -> EigenResult:
    """Dominant eigenpair of the symmetric operator ``matvec`` by power iteration from ``v0``.

    Stops when ``||Hv - lambda v|| <= tol |lambda|`` or after ``iters`` products.
    """
    iters = check_count("iters", iters)
    tol = check_positive("tol", tol)
    v = scale(v0, 1.0 / _nonzero_norm(v0))
    history: list[float] = []
    lam, r = 0.0, float("inf")
    for k in range(1, iters + 1):
        w = matvec(v)
        lam = dot(v, w)
        r = norm(axpy(-lam, v, w))
        history.append(lam)
        if r <= tol * abs(lam):
            return EigenResult(lam, v, r, k, True, tuple(history))
        w_norm = norm(w)
        if w_norm == 0.0:  # v is in the null space: H v = 0 exactly
            return EigenResult(0.0, v, 0.0, k, True, tuple(history))
        v = scale(w, 1.0 / w_norm)
    return EigenResult(lam, v, r, iters, False, tuple(history))


def lanczos(matvec: Matvec, v0: Vector, iters: int = 20, tol: float = 1e-3) -> EigenResult:
    """Largest algebraic eigenpair of the symmetric operator ``matvec`` by Lanczos from ``v0``.

    Step ``k`` extends the orthonormal Krylov basis ``V`` (full re-orthogonalisation, twice, so rounding does
    not create ghost eigenvalues) and the tridiagonal ``T = V^T H V``. The Ritz estimate of the residual,
    ``beta_k |s_k|``, stops the loop at ``tol |theta|``; the returned residual is then measured with one more
    product: ``||H y - (y^T H y) y||`` for the Ritz vector ``y = V s``.
    """
    iters = check_count("iters", iters)
    tol = check_positive("tol", tol)
    basis = [scale(v0, 1.0 / _nonzero_norm(v0))]
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    s = torch.ones(1, dtype=torch.float64)
    for k in range(iters):
        w = matvec(basis[k])
        alphas.append(dot(w, basis[k]))
        for _ in range(2):
            for q in basis:
                w = axpy(-dot(w, q), q, w)
        beta = norm(w)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta, s = float(evals[-1]), evecs[:, -1]
        history.append(theta)
        if beta * abs(float(s[-1])) <= tol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-30):
            break
        if k + 1 < iters:
            betas.append(beta)
            basis.append(scale(w, 1.0 / beta))
    y = [torch.zeros_like(x) for x in basis[0]]
    for c, q in zip(s.tolist(), basis):
        y = axpy(c, q, y)
    y = scale(y, 1.0 / _nonzero_norm(y))
    hy = matvec(y)
    value = dot(y, hy)
    r = norm(axpy(-value, y, hy))
    return EigenResult(value, y, r, len(history) + 1, r <= tol * abs(value), tuple(history))


def _nonzero_norm(v: Vector) -> float:
    n = norm(v)
    if n == 0.0 or not math.isfinite(n):
        raise ValueError(f"the start vector has norm {n}; it must be finite and non-zero")
    return n


@dataclass(frozen=True)
class TopEigenvalue:
    """Top Hessian eigenvalue of the loss in ``space`` with its convergence residual."""

    space: str
    method: str
    value: float  # Rayleigh quotient v^T H v of the returned unit vector
    residual: float  # ||H v - value v||: an eigenvalue of H lies within this of value
    iterations: int
    converged: bool
    n_batches: int
    history: tuple[float, ...]

    @property
    def relative_residual(self) -> float:
        return self.residual / abs(self.value) if self.value else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = list(self.history)
        d["relative_residual"] = self.relative_residual if math.isfinite(self.relative_residual) else None
        return d


def random_unit_vector(space: Space, seed: int = 0, stream: int = 0) -> Vector:
    """A Gaussian unit vector of the space, drawn on CPU from local generators (same on every device)."""
    out = []
    for j, (shape, device, dtype) in enumerate(zip(space.shapes(), space.devices(), space.dtypes())):
        gen = torch.Generator().manual_seed(layer_seed(seed, stream, 0, j))
        out.append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype))
    return scale(out, 1.0 / _nonzero_norm(out))


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, batches: Sequence, vector: Vector,
                           space: str = "full") -> Vector:
    """``H v`` of the batch-mean loss in ``space``; ``vector`` lists one tensor per coordinate (one per LoRA
    layer in logical layout ``(out, *fan_in)`` for ``"full"``, one per adapter parameter for ``"lora"``)."""
    obj = Objective(Space(model, check_space(space)), loss_fn, batches)
    shapes = obj.space.shapes()
    if len(vector) != len(shapes) or any(tuple(v.shape) != tuple(s) for v, s in zip(vector, shapes)):
        raise ValueError(f"vector has shapes {[tuple(v.shape) for v in vector]}, the {space} space needs "
                         f"{[tuple(s) for s in shapes]}")
    return obj.hvp(list(vector))


HVP_KINDS = ("exact", "central")
CENTRAL_REL_EPS = 1e-4  # central-difference step, relative to ||theta||


def top_hessian_eigenvalue(model: nn.Module, loss_fn: LossFn, batches: Sequence, *, space: str = "full",
                           method: str = "lanczos", iters: int = 20, tol: float = 1e-3, seed: int = 0,
                           progress: bool = True, hvp: str = "exact") -> TopEigenvalue:
    """Top eigenvalue of ``d^2 L / dW^2`` (merged weights of all LoRA layers, or the LoRA space).

    Args:
        method: ``"lanczos"`` (largest algebraic eigenvalue; default) or ``"power"`` (largest magnitude).
        iters: Hessian-vector products at most (each is one double-backward pass over every batch).
        tol: stop when the relative residual is below it.
        seed: seed of the random start vector.
        hvp: ``"exact"`` (double backward) or ``"central"`` (central differences of gradients, see above).
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method={method!r} is unknown; choose 'lanczos' or 'power'")
    if hvp not in HVP_KINDS:
        raise ValueError(f"hvp={hvp!r} is unknown; choose 'exact' (double backward) or 'central' (differences)")
    batches = check_batches(batches)
    iters = check_count("iters", iters)
    tol = check_positive("tol", tol)
    sp = Space(model, check_space(space))
    total = (iters + (method == "lanczos")) * len(batches)
    with bar(progress, total, f"Hessian eigenvalue ({space})") as pbar:
        obj = Objective(sp, loss_fn, batches, pbar)
        v0 = random_unit_vector(sp, check_count("seed", seed, 0))
        solver = lanczos if method == "lanczos" else power_iteration
        matvec = obj.hvp
        if hvp == "central":
            eps = CENTRAL_REL_EPS * norm(sp.values())
            if not eps > 0:
                raise ValueError("hvp='central' needs non-zero weights to scale its step; use hvp='exact'")
            matvec = lambda v: obj.hvp_central(v, eps)  # noqa: E731
        res = solver(matvec, v0, iters, tol)
    return TopEigenvalue(space=space, method=method, value=res.value, residual=res.residual,
                         iterations=res.iterations, converged=res.converged, n_batches=len(obj.batches),
                         history=res.history)


__all__ = ["EigenResult", "HVP_KINDS", "TopEigenvalue", "hessian_vector_product", "lanczos", "power_iteration",
           "random_unit_vector", "top_hessian_eigenvalue"]

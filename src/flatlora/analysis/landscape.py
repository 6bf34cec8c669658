"""1-D and 2-D loss landscapes along filter-normalised random directions (Li et al., NeurIPS 2018).

A direction ``D`` has one tensor per coordinate of the space (`flatlora.analysis._space`): per LoRA layer's
merged weight ``W`` (``space="full"``) or per adapter parameter (``space="lora"``). Filter normalisation
draws ``Z ~ N(0, I)`` and rescales each row (output filter) to the norm of the same row of the weight,

    D[i, :] = Z[i, :] * ||W[i, :]|| / ||Z[i, :]||,

so the plot is invariant to the scale of each filter and comparable across models. 1-D parameters (DoRA's
magnitude) get a zero direction, as Li et al. do for biases and norms. The landscape is then

    f(a) = L(W + a D)                (1-D)        f(a, b) = L(W + a D1 + b D2)   (2-D)

on a symmetric grid ``a, b in [-span, span]`` with the trained weights at the centre. Along a filter-
normalised direction, ``a = 0.05`` moves every filter by 5% of its norm: the size of Flat-LoRA's noise at
``rho = 0.05`` (``||E[i, :]|| ~ rho ||W[i, :]||``). In the LoRA space ``a`` scales ``A`` and ``B`` by
``(1 + a)``-sized moves, which changes ``W`` only through ``s(B dA + dB A)``: the LoRA-space landscape of a
minimum is typically far flatter than the full-space one; plotting both shows by how much.

Directions are drawn on CPU from local generators seeded by ``layer_seed(seed, direction, 0, coordinate)``,
so they are the same on every device and for every run of the same architecture.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .._checks import check_batches, check_count, check_positive
from ..noise import layer_seed
from ._progress import bar
from ._space import LossFn, Objective, Space, Vector, check_space


def filter_normalized_direction(model: nn.Module, space: str = "full", seed: int = 0, index: int = 0) -> Vector:
    """Direction ``index`` (0, 1, ...) of ``seed``: one tensor per coordinate, rows scaled to the weight's rows."""
    return _direction(Space(model, check_space(space)), check_count("seed", seed, 0), check_count("index", index, 0))


def _direction(sp: Space, seed: int, index: int) -> Vector:
    out = []
    for j, (w, dtype) in enumerate(zip(sp.values(), sp.dtypes())):
        if w.dim() < 2:
            out.append(torch.zeros_like(w, dtype=dtype))
            continue
        gen = torch.Generator().manual_seed(layer_seed(seed, index, 0, j))
        # drawn in fp32 on CPU (the same stream everywhere), normalised in the coordinate's dtype (>= fp32)
        z = torch.randn(tuple(w.shape), generator=gen, dtype=torch.float32).to(device=w.device, dtype=dtype)
        z_rows = torch.linalg.vector_norm(z.reshape(z.shape[0], -1), dim=1)
        w_rows = torch.linalg.vector_norm(w.to(dtype).reshape(w.shape[0], -1), dim=1)
        factor = torch.where(z_rows > 0, w_rows / z_rows.clamp_min(torch.finfo(dtype).tiny), 0.0)
        out.append(z * factor.view(-1, *([1] * (w.dim() - 1))))
    return out


def grid(span: float, steps: int) -> tuple[float, ...]:
    """``steps`` (odd, >= 3) points from ``-span`` to ``span``, symmetric (``g[i] == -g[-1-i]``), centre exactly 0."""
    span = check_positive("span", span)
    steps = check_count("steps", steps, 3)
    if steps % 2 == 0:
        raise ValueError(f"steps={steps} must be odd so that the trained weights (0) are on the grid, e.g. {steps + 1}")
    c = (steps - 1) // 2
    return tuple(span * (i - c) / c for i in range(steps))


@dataclass(frozen=True)
class Landscape1D:
    """``losses[i] = L(theta + alphas[i] D)`` along one filter-normalised direction of ``space``."""

    space: str
    seed: int
    alphas: tuple[float, ...]
    losses: tuple[float, ...]
    label: str = ""

    @property
    def center_loss(self) -> float:
        return self.losses[len(self.losses) // 2]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "space": self.space, "seed": self.seed, "alphas": list(self.alphas),
                "losses": list(self.losses)}

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["label", "space", "alpha", "loss"])
        for a, loss in zip(self.alphas, self.losses):
            w.writerow([self.label, self.space, repr(a), repr(loss)])
        return buf.getvalue()


@dataclass(frozen=True)
class Landscape2D:
    """``losses[i][j] = L(theta + alphas[i] D1 + betas[j] D2)`` on a grid of ``space``."""

    space: str
    seed: int
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    losses: tuple[tuple[float, ...], ...]
    label: str = ""

    @property
    def center_loss(self) -> float:
        return self.losses[len(self.alphas) // 2][len(self.betas) // 2]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "space": self.space, "seed": self.seed, "alphas": list(self.alphas),
                "betas": list(self.betas), "losses": [list(r) for r in self.losses]}

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["label", "space", "alpha", "beta", "loss"])
        for a, row in zip(self.alphas, self.losses):
            for b, loss in zip(self.betas, row):
                w.writerow([self.label, self.space, repr(a), repr(b), repr(loss)])
        return buf.getvalue()


def loss_landscape_1d(model: nn.Module, loss_fn: LossFn, batches: Sequence, *, space: str = "full",
                      span: float = 1.0, steps: int = 21, seed: int = 0, label: str = "",
                      progress: bool = True) -> Landscape1D:
    """``L(theta + a D)`` for ``a`` on `grid(span, steps)`, ``D`` = filter-normalised direction 0 of ``seed``.

    Li et al. plot ``span=1``; around a fine-tuned minimum ``span`` of 0.1-0.3 shows the basin.
    """
    batches = check_batches(batches)
    alphas = grid(span, steps)
    sp = Space(model, check_space(space))
    d = _direction(sp, check_count("seed", seed, 0), 0)
    with bar(progress, steps * len(batches), f"landscape 1-D ({space})") as pbar:
        obj = Objective(sp, loss_fn, batches, pbar)
        losses = tuple(obj.value([a * x for x in d]) for a in alphas)
    return Landscape1D(space, seed, alphas, losses, label)


def loss_landscape_2d(model: nn.Module, loss_fn: LossFn, batches: Sequence, *, space: str = "full",
                      span: float = 1.0, steps: int = 11, seed: int = 0, label: str = "",
                      progress: bool = True) -> Landscape2D:
    """``L(theta + a D1 + b D2)`` on the ``steps x steps`` grid; ``D1, D2`` = directions 0 and 1 of ``seed``
    (independent Gaussians, nearly orthogonal in high dimension, as in Li et al.)."""
    batches = check_batches(batches)
    alphas = grid(span, steps)
    sp = Space(model, check_space(space))
    seed = check_count("seed", seed, 0)
    d1, d2 = _direction(sp, seed, 0), _direction(sp, seed, 1)
    with bar(progress, steps * steps * len(batches), f"landscape 2-D ({space})") as pbar:
        obj = Objective(sp, loss_fn, batches, pbar)
        losses = tuple(tuple(obj.value([a * x + b * y for x, y in zip(d1, d2)]) for b in alphas) for a in alphas)
    return Landscape2D(space, seed, alphas, alphas, losses, label)


__all__ = ["Landscape1D", "Landscape2D", "filter_normalized_direction", "grid", "loss_landscape_1d",
           "loss_landscape_2d"]

"""Sharpness of a PEFT model's minimum in the full space of its merged weights (and in the LoRA space).

Two measures, both on ``L(W) = mean_b loss_fn(model, batch_b)`` over a bounded list of batches:

* **Expected sharpness** (what Flat-LoRA minimises): ``E_E[L(W + E)] - L(W)`` with Flat-LoRA's filter-wise
  noise at strength ``rho``, ``E[i, :] ~ N(0, rho^2 ||W[i, :]||^2 / n I)`` for every LoRA layer's merged weight
  ``W`` (``n`` = fan-in). Monte-Carlo over ``K`` samples, reported with the standard error of the mean.
  To second order it is ``0.5 tr(H Cov(E))``, the curvature along the noise, which is what a flat
  minimum keeps small. Sample ``k`` of layer ``j`` is exactly the noise Flat-LoRA trains with at step ``k`` of
  a constant-``rho`` schedule: ``FlatLora(model, FlatLoraConfig(rho=rho, seed=seed, schedule="constant"),
  total_steps=K).noise(k)`` (same seeds, same generator).
* **Worst-case (SAM) sharpness**: ``L(theta + rho g / ||g||) - L(theta)`` with ``g = dL/dtheta`` (one global
  norm over all coordinates), in the full space (``theta`` = all merged weights) or the LoRA space
  (``theta`` = the adapter parameters). For small ``rho`` it is ``rho ||g|| + rho^2/2 g^T H g / ||g||^2 + O(rho^3)``.
  LoRA-space SAM only reaches the merged-weight directions ``s(B dA + dB A)``: a minimum can look flat there
  and be sharp in the full space; `sharpness_report` prints both and their gap.

Every function evaluates in eval mode, never writes a weight (see `flatlora.analysis._space`), restores the
train/eval flags, leaves ``.grad`` untouched, and is deterministic given ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .._jsonio import to_jsonable
from ..noise import NoiseSpec, layer_noise_spec
from ._progress import bar
from .._checks import check_batches, check_count, check_positive
from ._space import LossFn, Objective, Space, check_space, norm, scale


@dataclass(frozen=True)
class ExpectedSharpness:
    """``E[L(W + E)] - L(W)`` under Flat-LoRA noise at ``rho``: ``sharpness`` +- ``stderr`` (``K`` samples)."""

    rho: float
    n_samples: int
    seed: int
    loss: float  # L(W)
    perturbed_loss: float  # mean_k L(W + E_k)
    sharpness: float  # perturbed_loss - loss
    stderr: float  # standard error of the mean over the K samples (nan for K = 1)
    samples: tuple[float, ...]  # L(W + E_k) - L(W), k = 1..K

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


@dataclass(frozen=True)
class SamSharpness:
    """``L(theta + rho g/||g||) - L(theta)`` in ``space`` (``"full"``: merged weights, ``"lora"``: A, B)."""

    space: str
    rho: float
    loss: float
    perturbed_loss: float
    sharpness: float
    grad_norm: float  # ||g||, the global norm over the space
    first_order: float  # rho * ||g||: the sharpness of a linear loss

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def _noise_samples(space: Space, rho: float, seed: int, samples: Sequence[int]) -> list[list[NoiseSpec]]:
    """``out[i][j]``: layer ``j``'s `NoiseSpec` of sample ``samples[i]``, the core engine's noise of step
    ``samples[i]`` at ``sigma = rho`` on rank 0 (`flatlora.noise.layer_noise_spec`). Each merged weight is read
    once; the specs keep its ``(m,)`` row std only and are drawn lazily, one layer at a time."""
    per_layer = []
    for target in space.targets:
        w = target.merged_weight()
        per_layer.append([layer_noise_spec(w, rho, seed=seed, step=k, rank=0, layer=target.index) for k in samples])
    return [list(specs) for specs in zip(*per_layer)]


def flat_lora_noise(model: nn.Module, rho: float, sample: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Materialise sample ``sample`` (>= 1) of the noise `expected_sharpness` uses: ``{layer name: E}`` (fp32,
    logical layout), equal to Flat-LoRA's noise of step ``sample`` at constant ``sigma = rho``."""
    space = Space(model, "full")
    rho, sample = check_positive("rho", rho), check_count("sample", sample)
    specs, = _noise_samples(space, rho, check_count("seed", seed, 0), [sample])
    return {t.name: spec.sample() for t, spec in zip(space.targets, specs)}


def expected_sharpness(model: nn.Module, loss_fn: LossFn, batches: Sequence, rho: float = 0.05,
                       n_samples: int = 8, seed: int = 0, progress: bool = True) -> ExpectedSharpness:
    """Monte-Carlo ``E_E[L(W + E)] - L(W)`` under Flat-LoRA's filter-wise noise at ``rho`` (see module docstring).

    Args:
        model: a model with PEFT LoRA layers (``ValueError`` otherwise).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: a non-empty list; the loss is their mean.
        rho: relative noise strength ``sigma`` (> 0); the paper trains with 0.05 (text) / 0.15 (vision).
        n_samples: ``K >= 1`` noise samples (the standard error needs ``K >= 2``).
        seed: noise seed; sample ``k`` uses Flat-LoRA's noise of step ``k``.
    """
    batches = check_batches(batches)
    rho = check_positive("rho", rho)
    n_samples = check_count("n_samples", n_samples)
    seed = check_count("seed", seed, 0)
    space = Space(model, "full")
    with bar(progress, (n_samples + 1) * len(batches), "expected sharpness") as pbar:
        obj = Objective(space, loss_fn, batches, pbar)
        base = obj.value()
        samples = [obj.value(specs) - base for specs in _noise_samples(space, rho, seed, range(1, n_samples + 1))]
    mean = math.fsum(samples) / n_samples
    if n_samples > 1:
        var = math.fsum((s - mean) ** 2 for s in samples) / (n_samples - 1)
        stderr = math.sqrt(var / n_samples)
    else:
        stderr = float("nan")
    return ExpectedSharpness(rho=rho, n_samples=n_samples, seed=seed, loss=base, perturbed_loss=base + mean,
                             sharpness=mean, stderr=stderr, samples=tuple(samples))


def sam_sharpness(model: nn.Module, loss_fn: LossFn, batches: Sequence, rho: float = 0.05, space: str = "full",
                  progress: bool = True) -> SamSharpness:
    """Worst-case first-order sharpness ``L(theta + rho g/||g||) - L(theta)`` in ``space`` ("full" or "lora").

    ``g`` is the exact gradient of the batch-mean loss w.r.t. the merged weights (full space: a zero offset
    with ``requires_grad`` added through forward hooks, so ``dL/dW`` also for DoRA) or w.r.t. the adapter
    parameters. ``rho`` is an absolute L2 radius over the whole space. A zero gradient gives sharpness 0.
    """
    batches = check_batches(batches)
    rho = check_positive("rho", rho)
    sp = Space(model, check_space(space))
    with bar(progress, 2 * len(batches), f"SAM sharpness ({space})") as pbar:
        obj = Objective(sp, loss_fn, batches, pbar)
        loss, grad = obj.value_and_grad()
        g_norm = norm(grad)
        if g_norm == 0.0:
            return SamSharpness(space, rho, loss, loss, 0.0, 0.0, 0.0)
        perturbed = obj.value(scale(grad, rho / g_norm))
    return SamSharpness(space=space, rho=rho, loss=loss, perturbed_loss=perturbed, sharpness=perturbed - loss,
                        grad_norm=g_norm, first_order=rho * g_norm)


@dataclass(frozen=True)
class SharpnessReport:
    """All sharpness measures of one model (what ``flatlora sharpness`` prints per run)."""

    label: str
    expected: ExpectedSharpness
    sam_full: SamSharpness
    sam_lora: SamSharpness
    hessian: Any = None  # a flatlora.analysis.hessian.TopEigenvalue, or None when skipped

    @property
    def sam_gap(self) -> float:
        """Full-space minus LoRA-space SAM sharpness: how much sharper the minimum is outside the LoRA space."""
        return self.sam_full.sharpness - self.sam_lora.sharpness

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "loss": self.expected.loss, "expected": self.expected.to_dict(),
                "sam_full": self.sam_full.to_dict(), "sam_lora": self.sam_lora.to_dict(),
                "sam_gap": self.sam_gap, "hessian": None if self.hessian is None else self.hessian.to_dict()}


def sharpness_report(model: nn.Module, loss_fn: LossFn, batches: Sequence, *, label: str = "model",
                     rho: float = 0.05, n_samples: int = 8, sam_rho: float = 0.05, seed: int = 0,
                     hessian_iters: int = 20, hessian_batches: int | None = None, hessian_tol: float = 1e-3,
                     progress: bool = True, hessian_hvp: str = "exact") -> SharpnessReport:
    """Expected sharpness, SAM sharpness in both spaces and (``hessian_iters > 0``) the top Hessian eigenvalue
    of the merged weights by Lanczos on the first ``hessian_batches`` batches (all when ``None``), with
    Hessian-vector products ``hessian_hvp`` (``"exact"`` or ``"central"``, see `top_hessian_eigenvalue`)."""
    from .hessian import top_hessian_eigenvalue

    batches = check_batches(batches)
    check_count("hessian_iters", hessian_iters, 0)
    if hessian_batches is not None:
        check_count("hessian_batches", hessian_batches)
    expected = expected_sharpness(model, loss_fn, batches, rho, n_samples, seed, progress)
    full = sam_sharpness(model, loss_fn, batches, sam_rho, "full", progress)
    lora = sam_sharpness(model, loss_fn, batches, sam_rho, "lora", progress)
    eig = None
    if hessian_iters > 0:
        hb = batches if hessian_batches is None else batches[: check_count("hessian_batches", hessian_batches)]
        eig = top_hessian_eigenvalue(model, loss_fn, hb, iters=hessian_iters, tol=hessian_tol, seed=seed,
                                     progress=progress, hvp=hessian_hvp)
    return SharpnessReport(label, expected, full, lora, eig)


__all__ = ["ExpectedSharpness", "SamSharpness", "SharpnessReport", "expected_sharpness", "flat_lora_noise",
           "sam_sharpness", "sharpness_report"]

"""Flatness diagnostics for PEFT LoRA models, in the full space of the merged weights ``W = W_base + delta``.

Flat-LoRA's claim is that a LoRA minimum can look flat in the space of the factors ``(A, B)`` and still be
sharp in the full weight space. These functions measure both, never writing a weight:

* `expected_sharpness`: ``E_E[L(W + E)] - L(W)`` under Flat-LoRA's filter-wise noise, with a standard error;
* `sam_sharpness`: ``L(theta + rho g/||g||) - L(theta)`` in the full (``W``) or the LoRA (``A, B``) space;
* `top_hessian_eigenvalue`: Lanczos/power iteration on exact Hessian-vector products, with its residual;
* `loss_landscape_1d` / `loss_landscape_2d`: losses along filter-normalised random directions (Li et al.);
* `plot_landscapes_1d` / `plot_landscapes_2d` / `plot_sharpness`: matplotlib PNGs, several runs per figure.

Each takes ``model``, ``loss_fn(model, batch) -> scalar tensor`` and a list of batches (the loss is their
mean), evaluates in eval mode, restores the model bit-identically (also when ``loss_fn`` raises) and is
deterministic given ``seed``. ``flatlora sharpness`` / ``flatlora landscape`` run them on experiment runs.
"""

from __future__ import annotations

from .hessian import TopEigenvalue, hessian_vector_product, lanczos, power_iteration, top_hessian_eigenvalue
from .landscape import Landscape1D, Landscape2D, filter_normalized_direction, loss_landscape_1d, loss_landscape_2d
from .sharpness import (ExpectedSharpness, SamSharpness, SharpnessReport, expected_sharpness, flat_lora_noise,
                        sam_sharpness, sharpness_report)

__all__ = [
    "ExpectedSharpness",
    "Landscape1D",
    "Landscape2D",
    "SamSharpness",
    "SharpnessReport",
    "TopEigenvalue",
    "expected_sharpness",
    "filter_normalized_direction",
    "flat_lora_noise",
    "hessian_vector_product",
    "lanczos",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscapes_1d",
    "plot_landscapes_2d",
    "plot_sharpness",
    "power_iteration",
    "sam_sharpness",
    "sharpness_report",
    "top_hessian_eigenvalue",
]


def __getattr__(name: str):
    # matplotlib is imported only by users of the plots
    if name in ("plot_landscapes_1d", "plot_landscapes_2d", "plot_sharpness"):
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'flatlora.analysis' has no attribute {name!r}")

"""Typed, validated settings of ``flatlora sharpness`` and ``flatlora landscape`` (they drive the flags too).

Both round-trip through ``to_dict``/``from_dict`` and ``save``/``load`` (``.json``, ``.yaml``); the resolved
settings are written into the JSON results, so a result file says how it was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import _dataclass_io as dio
from .._checks import check_bool, check_count, check_positive
from ._space import SPACES


@dataclass
class SharpnessConfig(dio.DataclassIO):
    """What ``flatlora sharpness`` measures on each run."""

    rho: float = dio.help_field(0.2, "noise strength sigma of the expected sharpness (Flat-LoRA's rho; it trains "
                                     "with 0.05 text / 0.15 vision). The signal grows as rho^2, its Monte-Carlo "
                                     "error as rho: a probe above the training rho resolves more; one value for "
                                     "every run, so runs compare")
    samples: int = dio.help_field(8, "noise samples K of the expected sharpness (its standard error needs K >= 2)")
    sam_rho: float = dio.help_field(0.05, "radius of the worst-case (SAM) perturbation, used in both the full and "
                                          "the LoRA space (an absolute L2 norm over the space)")
    hessian_iters: int = dio.help_field(10, "Lanczos steps for the top Hessian eigenvalue of the merged weights "
                                            "(each is one double-backward pass; 0 = skip)")
    hessian_batches: int = dio.help_field(2, "batches for the Hessian-vector products (the first ones)")
    hessian_hvp: str = dio.help_field("exact", "Hessian-vector products: exact (double backward) or central "
                                               "(central differences of gradients: cheaper, error ~eps^2)")
    batches: int = dio.help_field(8, "training batches the loss is averaged over")
    batch_size: int = dio.help_field(32, "examples per batch")
    seed: int = dio.help_field(0, "seed of the noise and of the Lanczos start vector")

    def __post_init__(self) -> None:
        check_positive("rho", self.rho)
        check_count("samples", self.samples)
        check_positive("sam_rho", self.sam_rho)
        check_count("hessian_iters", self.hessian_iters, 0)
        check_count("hessian_batches", self.hessian_batches)
        if self.hessian_hvp not in ("exact", "central"):
            raise ValueError(f"hessian_hvp={self.hessian_hvp!r} is unknown; choose exact or central")
        check_count("batches", self.batches)
        check_count("batch_size", self.batch_size)
        check_count("seed", self.seed, 0)


@dataclass
class LandscapeConfig(dio.DataclassIO):
    """What ``flatlora landscape`` draws for each run."""

    spaces: list[str] = dio.help_field(["full", "lora"], "spaces to scan: full (merged weights W), lora (A, B)")
    span: float = dio.help_field(0.5, "the grid runs over [-span, span] along filter-normalised directions "
                                      "(alpha = rho moves every filter by rho of its norm, as Flat-LoRA's noise)")
    steps: int = dio.help_field(21, "points of the 1-D curves (odd: the trained weights are the centre)")
    two_d: bool = dio.help_field(False, "also scan a 2-D grid (steps_2d^2 loss evaluations per space)")
    steps_2d: int = dio.help_field(9, "points per axis of the 2-D grid (odd)")
    batches: int = dio.help_field(4, "training batches the loss is averaged over")
    batch_size: int = dio.help_field(32, "examples per batch")
    seed: int = dio.help_field(0, "seed of the random directions (the same for every run)")

    def __post_init__(self) -> None:
        if isinstance(self.spaces, str):
            self.spaces = [self.spaces]
        self.spaces = list(self.spaces)
        bad = [s for s in self.spaces if s not in SPACES]
        if not self.spaces or bad:
            raise ValueError(f"spaces={self.spaces!r} must be a non-empty list of {', '.join(SPACES)}")
        check_positive("span", self.span)
        for name in ("steps", "steps_2d"):
            v = check_count(name, getattr(self, name), 3)
            if v % 2 == 0:
                raise ValueError(f"{name}={v} must be odd so that the trained weights are on the grid, e.g. {v + 1}")
        check_bool("two_d", self.two_d)
        check_count("batches", self.batches)
        check_count("batch_size", self.batch_size)
        check_count("seed", self.seed, 0)


__all__ = ["LandscapeConfig", "SharpnessConfig"]

"""`FlatLoraConfig`: every knob of the method in one validated, serialisable dataclass."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from . import _dataclass_io as dio
from ._checks import check_bool, check_one_of, is_int, is_real
from .schedule import SCHEDULES

MODES = ("auto", "exact", "inplace")


@dataclass
class FlatLoraConfig(dio.DataclassIO):
    """Configuration of Flat-LoRA's random weight perturbation.

    The noise of layer ``l`` at optimizer step ``t`` is ``E[i, :] ~ N(0, sigma_t^2 ||W[i, :]||^2 / n I)``
    with ``W`` the merged weight, ``n`` its fan-in and ``sigma_t`` given by ``schedule`` and ``rho``.
    """

    rho: float = dio.help_field(
        0.05, "relative noise strength reached at the last step (paper: 0.05 text, 0.15 vision; 0 = plain LoRA)")
    schedule: str = dio.help_field("cosine", f"how sigma ramps from 0 to rho over the run: {', '.join(SCHEDULES)}")
    seed: int = dio.help_field(0, "noise seed; the noise of (step, rank, layer) is a pure function of it")
    mode: str = dio.help_field(
        "auto",
        "exact: never write base weights, regenerate the noise in backward (any dtype, quantized, sharded); "
        "inplace: add/subtract the noise in the fp32 base weights (the paper's way); auto: exact")
    target_modules: list[str] | None = dio.help_field(
        None,
        "regexes (re.search on module names) choosing the perturbed layers; default: every LoRA layer. "
        "A pattern may also select plain Linear/Conv/Embedding modules to widen the perturbation")
    exclude_modules: list[str] = dio.help_field([], "regexes of module names never perturbed (None: none)")
    allow_unperturbed: list[str] = dio.help_field(
        [],
        "exact mode: regexes of perturbed layers that may go through a step without computing with their noise "
        "(mixture-of-experts experts, unused branches): no warning names them. A step where no layer did "
        "still raises (None: none)")
    same_noise_across_ranks: bool = dio.help_field(
        False, "draw the same noise on every data-parallel rank (default: an independent sample per rank)")
    keep_noisy_weight: bool = dio.help_field(
        False,
        "exact mode: keep each layer's W + E from its forward for its backward instead of redrawing it (one noise "
        "draw per micro-batch instead of two; holds one weight copy per layer meanwhile; measured 0.96x of the "
        "two-draw step time on CPU, docs/cost.md)")

    def __post_init__(self) -> None:
        if not is_real(self.rho):
            raise ValueError(f"rho={self.rho!r} must be a number >= 0, e.g. 0.05")
        if not math.isfinite(self.rho) or self.rho < 0:
            raise ValueError(f"rho={self.rho!r} must be finite and >= 0 (paper: 0.05 for text, 0.15 for vision)")
        self.rho = float(self.rho)
        check_one_of("schedule", self.schedule, SCHEDULES)
        check_one_of("mode", self.mode, MODES)
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**63): it is mixed into a 63-bit noise seed")
        for name in ("exclude_modules", "allow_unperturbed"):
            if getattr(self, name) is None:  # "none", as the default []
                setattr(self, name, [])
        for name in ("target_modules", "exclude_modules", "allow_unperturbed"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for name in ("target_modules", "exclude_modules", "allow_unperturbed"):
            pats = getattr(self, name)
            if pats is None:
                continue
            if not isinstance(pats, (list, tuple)):
                raise ValueError(f"{name}={pats!r} must be a list of regular expressions (or one string)")
            pats = list(pats)
            for p in pats:
                try:
                    re.compile(p)
                except (re.error, TypeError) as exc:
                    raise ValueError(f"{name} pattern {p!r} is not a valid regular expression: {exc}") from None
            setattr(self, name, pats)
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules=[] selects nothing; use None for every LoRA layer")
        check_bool("same_noise_across_ranks", self.same_noise_across_ranks)
        check_bool("keep_noisy_weight", self.keep_noisy_weight)

"""Filter-wise Gaussian noise, generated from seeds: pure tensor functions.

For a weight ``W`` in its logical layout ``(m, *fan_in_dims)`` (row ``i`` = output filter ``i``,
``n = prod(fan_in_dims)``), Flat-LoRA draws

    E[i, ...] ~ N(0, sigma^2 * ||W[i, :]||^2 / n * I)

The ``1/n`` keeps the growth of each output's variance at ``(1 + sigma^2)`` whatever the width. Noise is a
function of a 63-bit seed only: the same seed, shape and device always give the same ``E`` (it is drawn in
fp32 and cast, so every weight dtype sees the same sample), which is what lets the exact mode keep nothing
but the seed between forward and backward, and lets the in-place mode subtract what it added.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

_GENERATORS: dict[torch.device, torch.Generator] = {}


def layer_seed(seed: int, step: int, rank: int, layer: int) -> int:
    """Mix (seed, step, rank, layer) into one 63-bit seed (blake2b: no correlation between neighbours)."""
    for name, v in (("seed", seed), ("step", step), ("rank", rank), ("layer", layer)):
        if not 0 <= int(v) < 2**63:
            raise ValueError(f"{name}={v!r} must be a non-negative 63-bit integer")
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, rank, layer), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator private to this library (one per device), reseeded for every draw; never the global RNG."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norm of each output filter: ``(m, ...) -> (m,)``."""
    return torch.linalg.vector_norm(weight.detach().reshape(weight.shape[0], -1).float(), dim=1)


def row_scale(weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-row noise std ``sigma * ||W[i, :]|| / sqrt(n)`` in fp32, shape ``(m,)``."""
    n = weight[0].numel() if weight.shape[0] else 1
    return row_norms(weight) * (float(sigma) / n**0.5)


def filter_noise(shape: torch.Size | tuple[int, ...], scale: torch.Tensor, seed: int,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Draw ``E`` of ``shape`` (logical layout, rows first) with row std ``scale`` (fp32, ``(m,)``).

    Drawn in fp32 on ``scale.device`` from a generator seeded with ``seed``, then cast to ``dtype``.
    """
    gen = _generator(scale.device, seed)
    z = torch.randn(tuple(shape), generator=gen, device=scale.device, dtype=torch.float32)
    z.mul_(scale.view(-1, *([1] * (len(shape) - 1))))
    return z if dtype in (None, torch.float32) else z.to(dtype)


@dataclass(frozen=True)
class NoiseSpec:
    """Everything needed to regenerate one layer's noise: a seed and the fp32 row std (``(m,)``).

    This is all the exact mode keeps between forward and backward: no ``E`` and no copy of ``W``.
    """

    seed: int
    scale: torch.Tensor
    shape: tuple[int, ...]

    def sample(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return filter_noise(self.shape, self.scale, self.seed, dtype)

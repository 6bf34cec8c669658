"""How much of the intended noise E survives when W + E is formed in bf16 (what README's "How it works" states).

The exact mode computes ``W + E`` in the weight's dtype (`NoiseSpec.add_to`). For a bf16 weight an entry of ``E``
below half a bf16 ulp of ``W[i, j]`` rounds away, so at small sigma the realized noise
``bf16(W + E) - W`` (taken in fp32) is much smaller than ``E``; fp32 weights keep ``E`` to fp32 rounding.
The intended ``E`` is drawn separately with `filter_noise` from the same seed and row std.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlora import FlatLora, FlatLoraConfig
from flatlora.noise import NoiseSpec, add_filter_noise, filter_noise, row_scale
from flatlora.schedule import sigma_at

SEED = 12345


def weight(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A realistic 256x256 weight, entries ~ N(0, 0.02^2)."""
    return (torch.randn(256, 256, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def realized_vs_intended(w: torch.Tensor, sigma: float) -> tuple[float, float, float]:
    """(norm ratio ||R|| / ||E||, cosine(R, E), fraction of nonzero E entries with R == 0) for R = (W + E) - W."""
    scale = row_scale(w, sigma)
    intended = filter_noise(w.shape, scale, SEED)  # fp32
    noisy = NoiseSpec(SEED, scale, tuple(w.shape)).add_to(w)
    assert noisy.dtype == w.dtype and torch.equal(noisy, add_filter_noise(w, scale, SEED))
    r = noisy.float() - w.float()
    ratio = float(r.norm() / intended.norm())
    cos = float((r * intended).sum() / (r.norm() * intended.norm()))
    lost = float(((r == 0) & (intended != 0)).float().mean())
    return ratio, cos, lost


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_loses_small_noise_and_keeps_large_noise(seed):
    w = weight(torch.bfloat16, seed)
    ratio, cos, lost = realized_vs_intended(w, 5e-4)
    assert ratio < 0.8 and cos < 0.6 and lost > 0.8, (ratio, cos, lost)  # measured: 0.60, 0.46, 0.885
    ratio, cos, lost = realized_vs_intended(w, 1e-3)
    assert ratio < 0.9 and cos < 0.7 and lost > 0.7, (ratio, cos, lost)  # measured: 0.82, 0.63, 0.78
    ratio, cos, lost = realized_vs_intended(w, 5e-3)
    assert 0.95 < ratio < 1.1 and 0.9 < cos < 0.97 and 0.25 < lost < 0.4, (ratio, cos, lost)  # 1.04, 0.95, 0.32
    ratio, cos, lost = realized_vs_intended(w, 0.05)
    assert 0.99 < ratio < 1.01 and cos > 0.998 and lost < 0.05, (ratio, cos, lost)  # 1.0006, 0.9994, 0.035


def test_fp16_keeps_more_than_bf16():
    """fp16 has 3 more significand bits than bf16: most of the noise survives already at sigma = 5e-4."""
    w = weight(torch.float16)
    ratio, cos, lost = realized_vs_intended(w, 5e-4)
    assert 1.0 < ratio < 1.1 and 0.9 < cos < 0.95 and 0.3 < lost < 0.45, (ratio, cos, lost)  # 1.05, 0.93, 0.39
    ratio, cos, lost = realized_vs_intended(w, 0.05)
    assert 0.999 < ratio < 1.001 and cos > 0.9999, (ratio, cos)


@pytest.mark.parametrize("sigma", [5e-4, 0.05])
def test_fp32_keeps_the_noise(sigma):
    ratio, cos, lost = realized_vs_intended(weight(torch.float32), sigma)
    assert 0.999 < ratio < 1.001 and cos > 0.9999 and lost < 1e-3, (ratio, cos, lost)  # measured: 1.0000, 0-2 of 65536


def test_bf16_autocast_rounds_w_plus_e_in_the_matmul():
    """fp32 weights under bf16 autocast: W + E is exact in fp32, then the matmul casts it to bf16 (as it casts W
    without Flat-LoRA), so the difference to bf16(W) is rounding-dominated at small sigma."""
    w = weight(torch.float32)
    for sigma, lo, hi, cos_lo, cos_hi in ((5e-4, 2.0, 3.5, 0.3, 0.45), (0.05, 0.99, 1.01, 0.998, 1.0)):
        scale = row_scale(w, sigma)  # measured: 2.65, cosine 0.37 / 1.0011, 0.9989
        intended = filter_noise(w.shape, scale, SEED)
        r = add_filter_noise(w, scale, SEED).bfloat16().float() - w.bfloat16().float()
        assert lo < float(r.norm() / intended.norm()) < hi
        assert cos_lo < float((r * intended).sum() / (r.norm() * intended.norm())) < cos_hi


@pytest.mark.parametrize("rho, below_5e4, below_5e3", [(0.05, 0.064, 0.205), (0.15, 0.037, 0.117)])
def test_small_sigma_only_at_the_start_of_the_cosine_ramp(rho, below_5e4, below_5e3):
    total = 100_000
    for threshold, share in ((5e-4, below_5e4), (5e-3, below_5e3)):
        n = sum(sigma_at(t, total, rho) < threshold for t in range(1, total + 1))
        assert n / total == pytest.approx(share, abs=1e-3)
        assert all(sigma_at(t, total, rho) >= threshold for t in range(n + 1, total + 1, 97))  # a prefix


class OneLinear(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 256, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight(torch.float32))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("dtype, sigma, lo, hi", [(torch.bfloat16, 5e-4, 0.5, 0.7), (torch.bfloat16, 0.05, 0.99, 1.01),
                                                  (torch.float32, 5e-4, 0.999, 1.001)])
def test_exact_mode_computes_with_the_rounded_noise(dtype, sigma, lo, hi):
    """End to end: the weight a bf16 layer really computes with inside ``perturbed`` (read off with an identity
    input, exact in bf16) carries the realized noise measured above, not E."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(OneLinear(dtype), LoraConfig(r=4, target_modules=["fc"]))  # B = 0: merged W = W0
    flat = FlatLora(model, FlatLoraConfig(rho=sigma, schedule="constant", mode="exact"), total_steps=1)
    w = model.base_model.model.fc.base_layer.weight.detach().clone()
    intended = flat.noise(1)[flat.targets[0]]
    eye = torch.eye(256, dtype=dtype)
    with torch.no_grad(), flat.perturbed(1):
        w_used = model(eye).t()  # F.linear(I, W + E) = (W + E)^T
    r = w_used.float() - w.float()
    assert lo < float(r.norm() / intended.norm()) < hi
    assert torch.equal(model.base_model.model.fc.base_layer.weight, w)  # W itself untouched

import math

import pytest
import torch

from flatlora import filter_noise, layer_seed, row_scale
from flatlora.noise import row_norms


def test_layer_seed_is_deterministic_and_distinct():
    seeds = {layer_seed(0, t, r, l) for t in range(20) for r in range(3) for l in range(10)}
    assert len(seeds) == 20 * 3 * 10
    assert layer_seed(1, 2, 3, 4) == layer_seed(1, 2, 3, 4)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="step=-1"):
        layer_seed(0, -1, 0, 0)


def test_row_statistics_match_the_formula():
    # rows of very different norms; n = 4096 samples per row -> relative s.e. of a row std ~ 1/sqrt(2n) = 1.1%
    gen = torch.Generator().manual_seed(0)
    m, n, sigma = 64, 4096, 0.05
    w = torch.randn(m, n, generator=gen) * torch.logspace(-2, 1, m).unsqueeze(1)
    e = filter_noise((m, n), row_scale(w, sigma), seed=123)
    expected = sigma * w.norm(dim=1) / math.sqrt(n)
    ratio = e.std(dim=1) / expected
    assert (ratio - 1).abs().max() < 0.05
    assert abs(ratio.mean().item() - 1) < 0.01
    # mean ~ 0: per row, |mean| below 5 standard errors
    assert ((e.mean(dim=1) / (expected / math.sqrt(n))).abs() < 5).all()


def test_fan_in_of_conv_weights_is_in_times_kernel():
    w = torch.ones(8, 3, 5, 5)
    scale = row_scale(w, 0.1)
    assert torch.allclose(scale, torch.full((8,), 0.1))  # ||row|| = sqrt(75) = sqrt(n)


def test_norms_are_fp32_and_exact_for_bf16():
    w = torch.randn(16, 32).bfloat16()
    assert row_norms(w).dtype == torch.float32
    assert torch.allclose(row_norms(w), w.float().norm(dim=1))


def test_same_seed_same_noise_in_every_dtype_and_no_global_rng_use():
    scale = torch.rand(32) + 0.5
    state = torch.random.get_rng_state()
    e32 = filter_noise((32, 48), scale, seed=5)
    e16 = filter_noise((32, 48), scale, seed=5, dtype=torch.bfloat16)
    assert torch.equal(e16, e32.bfloat16())
    assert torch.equal(filter_noise((32, 48), scale, seed=5), e32)
    assert not torch.equal(filter_noise((32, 48), scale, seed=6), e32)
    assert torch.equal(torch.random.get_rng_state(), state)

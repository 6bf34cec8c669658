import math

import pytest

from flatlora import sigma_at


@pytest.mark.parametrize("T", [1, 10, 1001])
def test_cosine_schedule_values(T):
    rho = 0.05
    assert sigma_at(0, T, rho) == 0.0
    assert sigma_at(T, T, rho) == rho
    # closed form at the midpoint: (1 - cos(pi/2)) / 2 = 1/2
    assert sigma_at(T // 2, T, rho) == pytest.approx(rho * (1 - math.cos(math.pi * (T // 2) / T)) / 2, abs=1e-15)
    if T % 2 == 0:
        assert sigma_at(T // 2, T, rho) == pytest.approx(rho / 2, rel=1e-12)


def test_cosine_is_monotone():
    values = [sigma_at(t, 50, 0.15) for t in range(51)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_linear_and_constant():
    assert sigma_at(3, 12, 0.1, "linear") == pytest.approx(0.025)
    assert sigma_at(0, 12, 0.1, "constant") == 0.1


@pytest.mark.parametrize("t,T", [(-1, 10), (11, 10), (0, 0), (0, -3)])
def test_out_of_range(t, T):
    with pytest.raises(ValueError, match="t=|total_steps="):
        sigma_at(t, T, 0.05)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        sigma_at(1, 10, 0.05, "step")

"""Statistics against published values and closed forms (scipy, when installed, as a second reference)."""

import math

import pytest

from flatlora.experiments.stats import betainc, mean_ci, paired_diff, std, t_cdf, t_quantile

# two-sided 95% critical values t_{0.975, df} from standard tables
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 10: 2.2281, 30: 2.0423, 120: 1.9799}


@pytest.mark.parametrize("df,value", sorted(T975.items()))
def test_t_quantile_matches_tables(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-value, abs=1e-4)


def test_t_quantile_other_levels_and_limits():
    assert t_quantile(0.95, 1) == pytest.approx(6.3138, abs=1e-4)     # one-sided 95%, df 1
    assert t_quantile(0.995, 4) == pytest.approx(4.6041, abs=1e-4)    # two-sided 99%, df 4
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)
    assert t_quantile(0.5, 3) == 0.0


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi
    for t in (-3.0, -0.5, 0.3, 1.0, 7.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-2.0, 0.7, 4.0):
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_betainc_closed_forms():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert betainc(3, 1, x) == pytest.approx(x ** 3, abs=1e-12)
        assert betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-12)
    with pytest.raises(ValueError, match="x="):
        betainc(1, 1, 1.5)


def test_against_scipy_when_available():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 25):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(st.t.ppf(p, df), rel=1e-8)
        for t in (-4.0, -1.0, 0.2, 2.5):
            assert t_cdf(t, df) == pytest.approx(st.t.cdf(t, df), abs=1e-12)


def test_mean_ci_of_known_sample():
    ci = mean_ci([1, 2, 3, 4, 5])
    # mean 3, s = sqrt(2.5), se = sqrt(0.5), half-width = 2.776445 * 0.707107 = 1.963243
    assert ci.mean == 3 and ci.std == pytest.approx(math.sqrt(2.5))
    assert ci.low == pytest.approx(3 - 1.963243, abs=1e-5) and ci.high == pytest.approx(3 + 1.963243, abs=1e-5)
    # paired t-test of mean 3 vs 0: t = 3 / sqrt(0.5) = 4.2426, df 4 -> two-sided p = 0.013231
    assert ci.p_value == pytest.approx(0.013231, abs=1e-5)


def test_paired_diff_and_degenerate_cases():
    d = paired_diff([0.80, 0.82, 0.85], [0.79, 0.80, 0.86])
    # differences 0.01, 0.02, -0.01: mean 0.006667, s 0.015275, half-width 4.302653 * s / sqrt 3
    assert d.mean == pytest.approx(0.0066667, abs=1e-6)
    assert d.high - d.mean == pytest.approx(4.302653 * 0.0152753 / math.sqrt(3), abs=1e-6)
    one = mean_ci([0.5])
    assert one.n == 1 and math.isnan(one.low) and math.isnan(one.p_value) and math.isnan(std([0.5]))
    with pytest.raises(ValueError, match="equal lengths"):
        paired_diff([1, 2], [1])


def test_all_equal_paired_differences_leave_the_t_test_undefined():
    # differences 0.0312 on every seed: s = 0, t = 0.0312 / 0 -- no p-value, no interval (was p 0, CI [m, m])
    d = paired_diff([0.8312, 0.8512, 0.8012], [0.80, 0.82, 0.77])
    assert d.n == 3 and d.mean == pytest.approx(0.0312, abs=1e-12) and d.std == 0
    assert math.isnan(d.p_value) and math.isnan(d.low) and math.isnan(d.high)
    # 0.85 - 0.80 and 0.90 - 0.85 differ by 1.1e-16 in binary floats: still "all equal", not p = 0
    d = paired_diff([0.85, 0.90], [0.80, 0.85])
    assert 0.85 - 0.80 != 0.90 - 0.85 and d.std == 0 and math.isnan(d.p_value) and math.isnan(d.low)
    zero = mean_ci([0.0, 0.0, 0.0])  # t = 0 / 0 (was p = 1)
    assert zero.mean == 0 and math.isnan(zero.p_value) and math.isnan(zero.high)


def test_a_small_real_spread_keeps_the_t_test():
    # differences 0.01, 0: mean 0.005, s = 0.0070711, se = 0.005, t = 1 on 1 df (Cauchy): p = 1 - 2 atan(1) / pi
    # = 0.5, half-width t_{0.975, 1} * se = 12.7062 * 0.005 = 0.063531
    d = paired_diff([0.81, 0.80], [0.80, 0.80])
    assert d.p_value == pytest.approx(0.5, abs=1e-9)
    assert d.high - d.mean == pytest.approx(0.063531, abs=1e-6) and d.std == pytest.approx(0.0070711, abs=1e-7)


def test_a_single_pair_has_a_mean_and_nothing_else():
    d = paired_diff([0.83], [0.80])
    assert d.n == 1 and d.mean == pytest.approx(0.03, abs=1e-12)
    assert all(math.isnan(v) for v in (d.std, d.low, d.high, d.p_value))


def test_slope_is_the_closed_form_least_squares_slope():
    from flatlora.experiments.stats import slope

    # y = 2 - 0.5 x exactly; and a hand-computed case: xs 1,2,3 ys 1,3,2 -> sxy = 1, sxx = 2 -> 0.5
    assert slope([1, 2, 3, 5], [1.5, 1.0, 0.5, -0.5]) == pytest.approx(-0.5)
    assert slope([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(slope([1], [2])) and math.isnan(slope([2, 2], [1, 3]))
    with pytest.raises(ValueError, match="as many xs as ys"):
        slope([1, 2], [1])

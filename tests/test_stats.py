"""Paired seed statistics: the t-test's p-values against published critical values."""

import math

import pytest

from selective_attention.stats import mean_std, paired_t, rounded_down, t_two_sided_p

# two-sided critical values of Student's t (standard tables): P(|T| >= t) = p
CRITICAL = [(12.7062, 1, 0.05), (4.302653, 2, 0.05), (3.182446, 3, 0.05), (2.776445, 4, 0.05),
            (2.570582, 5, 0.05), (3.169273, 10, 0.01), (2.085963, 20, 0.05), (63.65674, 1, 0.01),
            (9.924843, 2, 0.01), (4.604095, 4, 0.01)]  # fmt: skip


@pytest.mark.parametrize("t, df, p", CRITICAL)
def test_p_matches_t_tables(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=2e-5)
    assert t_two_sided_p(-t, df) == t_two_sided_p(t, df)


def test_p_edges():
    assert t_two_sided_p(0.0, 3) == 1.0
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| >= 1) = 1/2
    assert t_two_sided_p(1e6, 4) < 1e-12
    assert t_two_sided_p(math.inf, 3) == t_two_sided_p(-math.inf, 1) == 0.0
    with pytest.raises(ValueError, match="df"):
        t_two_sided_p(1.0, 0)
    with pytest.raises(ValueError, match="df"):
        t_two_sided_p(2.0, True)  # a bool is not a count


def test_a_tail_below_the_float_range_ends():
    """Many degrees of freedom and |t| well below sqrt(df): the tail's terms fell below the smallest normal float,
    where one times a factor above 1/2 rounds to itself, and the sum never ended (5,001 pairs at t = 50 hung)."""
    assert 0.0 <= t_two_sided_p(50.0, 5000) < 1e-300
    assert 0.0 <= t_two_sided_p(45.0, 20001) < 1e-300
    d = [1.0 + 0.01 * (i % 7) for i in range(5001)]  # mean 1.03, sd 0.02: t ~ 3600
    assert paired_t(d, [0.0] * 5001).p < 1e-300


# far tails, from scipy.stats.t.sf (2 * sf): p must keep its relative precision, not cancel to 0
TAILS = [(40.0, 4, 2.3340163226012678e-06), (300.0, 2, 1.1110925929355216e-05),
         (1e4, 3, 2.20531550229581e-12), (25.0, 9, 1.2589450378990368e-09)]  # fmt: skip


@pytest.mark.parametrize("t, df, p", TAILS)
def test_small_p_keeps_its_digits(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-10, abs=0)


@pytest.mark.parametrize("t", [0.3, 1.0, 7.0, 1e3, 1e8, 1e30])
def test_p_matches_closed_forms(t):
    # df = 1 (Cauchy): (2/pi) atan(1/t); df = 2: 1 - t / sqrt(2 + t^2), written without the cancellation
    assert t_two_sided_p(t, 1) == pytest.approx(2 / math.pi * math.atan(1 / t), rel=1e-12, abs=0)
    r = math.sqrt(2 + t * t)
    assert t_two_sided_p(t, 2) == pytest.approx(2 / (r * (r + t)), rel=1e-12, abs=0)


def test_paired_t_uses_the_differences():
    a, b = [1.70, 1.72, 1.69], [1.73, 1.76, 1.71]
    r = paired_t(a, b)
    d = [-0.03, -0.04, -0.02]
    assert r.n == 3 and r.mean == pytest.approx(sum(d) / 3) and r.std == pytest.approx(0.01)
    assert r.t == pytest.approx(r.mean / (0.01 / math.sqrt(3)))
    assert r.p == pytest.approx(t_two_sided_p(r.t, 2))
    # a shift shared by both runs of a seed cancels: only the differences matter
    assert paired_t([x + 5 * i for i, x in enumerate(a)], [x + 5 * i for i, x in enumerate(b)]).t == pytest.approx(r.t)


def test_paired_t_degenerate_cases():
    assert math.isnan(paired_t([1.0], [0.5]).p)
    assert math.isnan(paired_t([1.0, 2.0], [0.0, 1.0]).p)  # identical differences: no spread
    with pytest.raises(ValueError, match="paired by seed"):
        paired_t([1.0, 2.0], [1.0])


def test_a_non_finite_pair_is_named():
    with pytest.raises(ValueError, match=r"pair 2 \(nan, 2\) is not finite"):
        paired_t([1, 2, math.nan], [0, 1, 2])
    with pytest.raises(ValueError, match="pair 0"):
        paired_t([math.inf, 2], [0, 1])


def test_paired_t_calls_differences_equal_up_to_rounding_no_spread():
    """1.1 - 0.1, 2.2 - 1.2 and 3.3 - 2.3 differ from 1 only by the subtraction's rounding (a few ulps): that is no
    evidence, yet an exact ``std == 0`` test let it through as t ~ 1e15 and p ~ 1e-31."""
    r = paired_t([1.1, 2.2, 3.3], [0.1, 1.2, 2.3])
    assert r.mean == pytest.approx(1.0) and math.isnan(r.t) and math.isnan(r.p)
    # a real spread, however small against the values, still gets its test
    r = paired_t([1.0, 1.0 + 1e-9, 1.0 + 3e-9], [0.0, 0.0, 0.0])
    assert math.isfinite(r.t) and r.p < 0.05


def test_rounded_down_never_overstates():
    assert rounded_down(15.625) == "15" and rounded_down(24.976, 1) == "24.9" and rounded_down(32.0) == "32"
    assert rounded_down(2.3, 1) == "2.3" and rounded_down(0.1 + 0.2, 1) == "0.3"  # the decimal it prints as
    assert rounded_down(256 / 7) == "36" and rounded_down(58.125, 1) == "58.1"
    assert rounded_down(math.inf) == "inf"
    assert rounded_down(1e308, 100) == "1" + "0" * 308 + "." + "0" * 100  # beyond the old fixed precision
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="digits must be an int >= 0"):
            rounded_down(3.7, bad)


def test_mean_std_leaves_out_and_counts_what_is_not_finite():
    assert mean_std([1.0, math.nan, 2.0, None]) == "1.5000 ± 0.7071 (n=2, 1 not finite, left out)"
    assert mean_std([math.inf], 2) == "- (1 not finite)" and mean_std([None]) == "-"
    assert mean_std([0.25], 3) == "0.250 (n=1)"

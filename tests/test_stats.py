"""Paired seed statistics: the t-test's p-values against published critical values."""

import math

import pytest

from selective_attention.stats import paired_t, t_two_sided_p

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
    with pytest.raises(ValueError, match="df"):
        t_two_sided_p(1.0, 0)


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

"""Seed statistics that a sceptical reader accepts: differences paired by seed, and their t-test.

Two runs with the same seed share the initialisation and the data order, so the seed-to-seed noise
cancels in their difference; a paired t-test on the differences is the honest comparison (an
unpaired "mean ± 2 std" one is both weaker and easy to misread).

    >>> r = paired_t([1.70, 1.72, 1.69], [1.73, 1.76, 1.71])
    >>> f"{r.mean:+.3f}, t = {r.t:.2f}, p = {r.p:.3f}"
    '-0.030, t = -5.20, p = 0.035'
"""

from __future__ import annotations

import decimal
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PairedT", "mean_std", "paired_t", "rounded_down", "t_two_sided_p"]


@dataclass(frozen=True)
class PairedT:
    """``a - b`` paired by seed: their mean, sample std, count, t statistic and two-sided p-value
    (``t`` and ``p`` are NaN with fewer than 2 pairs, or when every difference is the same up to the rounding of
    the subtraction: a spread of a few ulps is no evidence, and its t would be astronomic)."""

    mean: float
    std: float
    n: int
    t: float
    p: float

    def __str__(self) -> str:
        return f"{self.mean:+.4f} ± {self.std:.4f} (n={self.n}), paired t = {self.t:.2f}, p = {self.p:.3g}"


def paired_t(a: Sequence[float], b: Sequence[float]) -> PairedT:
    """Paired t-test of ``a[i] - b[i]`` (H0: mean difference 0), with ``n - 1`` degrees of freedom."""
    if len(a) != len(b):
        raise ValueError(f"paired_t needs one b per a (paired by seed); got {len(a)} and {len(b)} values.")
    d = [x - y for x, y in zip(a, b)]
    bad = [i for i, x in enumerate(d) if not math.isfinite(x)]
    if bad:
        i = bad[0]
        raise ValueError(
            f"paired_t: pair {i} ({a[i]!r}, {b[i]!r}) is not finite (a diverged run?); leave it out, and say so."
        )
    n = len(d)
    if n == 0:
        raise ValueError("paired_t needs at least one pair.")
    mean = statistics.fmean(d)
    if n < 2:
        return PairedT(mean, math.nan, n, math.nan, math.nan)
    std = statistics.stdev(d)
    rounding = 4 * sys.float_info.epsilon * max(abs(x) for x in (*a, *b))  # a few ulps of the largest operand
    if std <= rounding:
        return PairedT(mean, std, n, math.nan, math.nan)
    t = mean / (std / math.sqrt(n))
    return PairedT(mean, std, n, t, t_two_sided_p(t, n - 1))


def t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with an integer ``df >= 1`` degrees of freedom.

    Exact, by the classical finite series in ``theta = atan(|t| / sqrt(df))`` (Abramowitz & Stegun
    26.7.3-4), ``s = sin theta``, ``c = cos theta``: for odd df, ``A = (2/pi) (theta + s c (1 + 2/3 c^2
    + 2*4/(3*5) c^4 + ...))`` with ``(df - 3) / 2`` terms after the 1; for even df, ``A = s (1 + 1/2 c^2
    + 1*3/(2*4) c^4 + ...)`` with ``(df - 2) / 2`` terms after the 1; ``p = 1 - A``. When ``p`` is small
    (below 1e-3), ``1 - A`` would cancel to nothing (p = 1e-12 printed as 0), so ``p`` is summed
    directly as the rest of the infinite series whose full sum makes ``A = 1`` (``arcsin(c) / (s c)``
    for odd df, ``1 / s`` for even), each term a factor ``<= c^2`` smaller than the last."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}.")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    r = math.hypot(t, math.sqrt(df))  # s and c from t itself: cos(theta) near pi/2 loses digits
    s, c = abs(t) / r, math.sqrt(df) / r
    c2 = c * c
    odd = df % 2 == 1
    # term k of the series (k = 0, 1, ...): odd df, (2k)!! / (2k+1)!! c^2k; even df, (2k-1)!! / (2k)!! c^2k
    ratio = (lambda k: (2 * k) / (2 * k + 1)) if odd else (lambda k: (2 * k - 1) / (2 * k))
    first_left_out = (df - 1) // 2 if odd else df // 2
    total, term = 1.0, 1.0
    for k in range(1, first_left_out):
        term *= ratio(k) * c2
        total += term
    a = (2 / math.pi) * (theta + (s * c * total if df > 1 else 0.0)) if odd else s * total
    if 1.0 - a > 1e-3:
        return min(1.0, 1.0 - a)
    term *= ratio(first_left_out) * c2 if first_left_out > 0 else 1.0  # the first term left out
    tail, k = 0.0, first_left_out
    # (stop below the smallest normal float too: there a term times a factor above 1/2 rounds to itself, forever)
    while term > 1e-17 * tail and term >= sys.float_info.min:
        tail += term
        k += 1
        term *= ratio(k) * c2
    return min(1.0, (2 / math.pi) * s * c * tail if odd else s * tail)


def mean_std(xs: Sequence[float | None], digits: int = 4) -> str:
    """``"mean ± std (n=...)"`` of the finite values of ``xs``; ``None`` (not run) is skipped, and a value that is
    not finite (a diverged run) is left out and counted in the text, never averaged in or silently dropped."""
    xs = [x for x in xs if x is not None]
    bad = sum(not math.isfinite(x) for x in xs)
    xs = [x for x in xs if math.isfinite(x)]
    note = f", {bad} not finite, left out" if bad else ""
    if not xs:
        return "-" if not bad else f"- ({bad} not finite)"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f} (n=1{note})"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f} (n={len(xs)}{note})"


def rounded_down(x: float, digits: int = 0) -> str:
    """``x`` printed with ``digits`` decimals, rounded down (floor), so that a printed ratio never overstates the
    measured one: 15.6 is ``"15"``, not ``"16"``; 24.98 is ``"24.9"``, not ``"25.0"``. Exact on
    the decimal the float prints as (``2.3`` stays ``"2.3"``)."""
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be an int >= 0 (decimals to print), got {digits!r}.")
    if not math.isfinite(x):
        return str(x)
    # every digit of any float's shortest repr (1e308 included) and the decimals asked for
    exact = decimal.Context(prec=330 + digits)
    q = decimal.Decimal(repr(float(x))).quantize(decimal.Decimal(1).scaleb(-digits), decimal.ROUND_FLOOR, exact)
    return f"{q:.{digits}f}"

"""The statistics of the leaderboard: a mean with its 95 % confidence interval over seeds,
and a paired comparison of two rows over the seeds they share.

- Confidence interval: Student t, ``mean ± t(0.975, n - 1) * s / sqrt(n)`` with ``s`` the
  sample standard deviation (``ddof=1``); the half-width is what the tables print after
  ``±``. Undefined (``None``) for a single seed: one run says nothing about the spread.
- Paired comparison: the two-sided paired t-test on the per-seed differences
  (``t = mean(d) / (s_d / sqrt(m))`` with ``m - 1`` degrees of freedom over the ``m``
  common seeds). Pairing by seed removes what the seed does to both rows alike (the
  few-shot draw, the initialisation). Undefined for fewer than 2 common seeds.

The t distribution comes from scipy (``scipy.stats.t``), a declared dependency.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from scipy import stats as _st

__all__ = ["CONFIDENCE", "ALPHA", "t_quantile", "ci95", "paired_t_test"]

CONFIDENCE = 0.95
ALPHA = 0.05  # significance level of the paired comparison against the column's best


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom
    (``t_quantile(0.975, 2) = 4.3027``)."""
    if df < 1:
        raise ValueError(f"Student t needs at least 1 degree of freedom, got {df}")
    return float(_st.t.ppf(p, df))


def ci95(std: Optional[float], n: int, confidence: float = CONFIDENCE) -> Optional[float]:
    """Half-width of the Student-t confidence interval of a mean of ``n`` values with
    sample standard deviation ``std``: ``t(0.5 + confidence / 2, n - 1) * std / sqrt(n)``;
    ``None`` when ``n < 2`` or ``std`` is unknown."""
    if n < 2 or std is None or not math.isfinite(std):
        return None
    return t_quantile(0.5 + confidence / 2, n - 1) * float(std) / math.sqrt(n)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Two-sided p-value of the paired t-test of ``a`` against ``b`` (same length, one
    pair per seed); ``None`` for fewer than 2 pairs. Identical pairs give 1.0; a constant
    non-zero difference (no spread, so no noise to hide it) gives 0.0."""
    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths ({len(a)} and {len(b)})")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    m = len(d)
    if m < 2:
        return None
    mean = math.fsum(d) / m
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (m - 1))
    scale = max(1.0, max(abs(float(x)) for x in (*a, *b)))
    if sd <= 1e-12 * scale:  # all differences equal (up to rounding)
        return 1.0 if abs(mean) <= 1e-12 * scale else 0.0
    t = mean / (sd / math.sqrt(m))
    return float(2.0 * _st.t.sf(abs(t), m - 1))

"""bench/performance.py's verdicts: a target is met or missed only when the
median's confidence interval is clear of it; otherwise "unclear"."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import performance  # noqa: E402

two = performance.num(2)


@pytest.mark.parametrize("rounds, low, high, coverage", [
    (5, 0, 4, 0.9375),      # too few rounds for 95%: the extremes
    (7, 0, 6, 0.984375),
    (9, 1, 7, 0.9609375),   # 2nd lowest to 2nd highest
    (15, 3, 11, 0.96484375),
])
def test_median_interval_is_the_order_statistics_for_95_percent(rounds, low, high, coverage):
    values = [float(i) for i in reversed(range(rounds))]     # order must not matter
    assert performance.median_interval(values) == (low, high, pytest.approx(coverage))


def test_met_only_when_the_interval_is_above_the_target():
    # One bad round of nine falls outside the interval: still met.
    assert performance.verdict([0.7] + [1.0 + i / 100 for i in range(8)], 1.0, two) \
        == "met (CI 1.00-1.06)"


def test_not_met_when_the_interval_is_below_the_target():
    assert performance.verdict([0.9] * 8 + [1.2], 1.0, two) == "NOT met (CI 0.90-0.90)"


def test_unclear_when_the_interval_straddles_the_target():
    ratios = [0.94, 0.96, 0.97, 0.98, 0.99, 1.00, 1.01, 1.02, 1.05]
    assert performance.verdict(ratios, 1.0, two) == "unclear (CI 0.96-1.02)"


def test_no_rounds_no_verdict():
    assert performance.verdict([], 1.0, two) == ""

"""bench/paired.py's interval and verdicts: the blocks are the rounds (the
pairs of one block share their stacks), and a verdict needs enough of them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import paired  # noqa: E402


def test_blocks_that_disagree_leave_the_verdict_unclear():
    # Half the blocks at 0.95, half at 1.05, every pair of a block alike.  An
    # interval over the 128 pairs would sit on 1.00 (met against 0.97); over
    # the blocks it shows what the blocks say.
    by_block = [[0.95] * 16, [1.05] * 16] * 4
    mid, low, high = paired.block_interval(by_block)
    assert (mid, low, high) == (1.0, 0.95, 1.05)
    assert paired.verdict(low, high, 0.97, len(by_block)).startswith("unclear")


def test_the_interval_is_the_order_statistics_of_the_block_medians():
    # 20 blocks: the 6th lowest and 6th highest block medians cover the median
    # with 95.9%; a pair far out in a block moves nothing.
    by_block = [[1.0 + b / 100] * 15 + [9.0] for b in reversed(range(20))]
    mid, low, high = paired.block_interval(by_block)
    assert (round(mid, 3), round(low, 3), round(high, 3)) == (1.095, 1.05, 1.14)
    assert paired.verdict(low, high, 1.05, 20) == "met (CI 1.050-1.140)"
    assert paired.verdict(low, high, 1.15, 20) == "NOT met (CI 1.050-1.140)"


def test_too_few_blocks_give_no_verdict():
    assert paired.verdict(1.1, 1.2, 1.0, paired.MIN_BLOCKS - 1).startswith("no verdict")

"""Confidence intervals and paired tests for accuracies."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a success rate (95% by default); (0, 1) when there are no trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} successes in {trials} trials")
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive number, got {z}")
    if trials == 0:
        return 0.0, 1.0
    rate, spread = successes / trials, z * z / trials
    center = (rate + spread / 2) / (1 + spread)
    half = z * math.sqrt(rate * (1 - rate) / trials + spread / (4 * trials)) / (1 + spread)
    # At 0 or all successes the matching bound is exactly 0 or 1; rounding would leave it a hair off.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == trials else min(1.0, center + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """The two-sided exact McNemar p-value for b pairs where only the first is correct and c where only the second is."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    pairs = b + c
    if pairs == 0:
        return 1.0
    tail = sum(math.comb(pairs, k) for k in range(min(b, c) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**pairs)))


def paired_counts(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int]:
    """(b, c): how many pairs only the first got right, and how many only the second."""
    if len(first) != len(second):
        raise ValueError(f"the outcomes differ in length: {len(first)} and {len(second)}")
    b = sum(1 for one, two in zip(first, second) if one and not two)
    c = sum(1 for one, two in zip(first, second) if two and not one)
    return b, c

"""Uncertainty of evaluation numbers: Wilson intervals for proportions, bootstrap intervals for means.

Wilson (1927): for k successes in n trials, p̂ = k/n, z = 1.96,
    centre = (p̂ + z²/2n) / (1 + z²/n),  half-width = z √(p̂(1−p̂)/n + z²/4n²) / (1 + z²/n).
Bootstrap (Efron, 1979): the 2.5% and 97.5% quantiles of the mean over B resamples with replacement (seeded).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes/n (n = 0 gives (0, 1))."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean, s / √n with the n−1 sample variance (0 for fewer than two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def bootstrap_interval(values: Sequence[float], iters: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeded, so a result is reproducible)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    lo = means[int(math.floor((1 - level) / 2 * (iters - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (iters - 1)))]
    return lo, hi


def win_rate(wins: int, ties: int, losses: int, scores: Sequence[float] | None = None,
             seed: int = 0) -> tuple[float, tuple[float, float]]:
    """(win rate, 95% CI) with a tie counted as half a win: (W + T/2) / N; the CI is the bootstrap interval
    of the per-item scores (1, ½, 0), so ties narrow it as they should."""
    n = wins + ties + losses
    if n == 0:
        return math.nan, (math.nan, math.nan)
    per_item = list(scores) if scores is not None else [1.0] * wins + [0.5] * ties + [0.0] * losses
    return (wins + 0.5 * ties) / n, bootstrap_interval(per_item, seed=seed)

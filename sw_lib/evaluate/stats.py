"""Means with standard errors, as lm-evaluation-harness reports them, and bootstrap intervals."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def sample_std(values: Sequence[float]) -> float | None:
    """Standard deviation with n - 1 in the denominator (None below two values)."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1))


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample std / sqrt(n), lm-eval's `mean_stderr`."""
    std = sample_std(values)
    return None if std is None else std / math.sqrt(len(values))


def summarize(values: Sequence[float]) -> dict:
    return {"value": mean(values), "stderr": mean_stderr(values)}


def bootstrap_interval(samples: Sequence[Sequence[float]], statistic: Callable[..., float],
                       confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(*samples)`, resampling units with replacement.

    `samples` are equally long arrays whose i-th entries belong to one unit (a perplexity
    window, a block of tokens) and are resampled together (paired). Seeded, so the same data
    give the same interval. None with fewer than two units (nothing to resample).
    """
    from scipy import stats

    arrays = tuple(np.asarray(s, dtype=np.float64) for s in samples)
    if len(arrays[0]) < 2:
        return None
    if all(np.all(a == a[0]) for a in arrays):  # every unit alike: the interval is a point
        value = float(statistic(*arrays))
        return value, value
    result = stats.bootstrap(arrays, statistic, paired=True, vectorized=False,
                             n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)

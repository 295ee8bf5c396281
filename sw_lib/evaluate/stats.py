"""Means with standard errors, as lm-evaluation-harness reports them, and paired differences."""
from __future__ import annotations

import math
from typing import Sequence


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

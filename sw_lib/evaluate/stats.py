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


def paired_difference(a: dict, b: dict, metric: str) -> dict:
    """Change of `metric` from result `a` to result `b` (run_task outputs) on their shared items.

    The standard error is that of the per-item differences, which is what makes a paired
    comparison tighter than two independent errors.
    """
    a_items = {item["doc_id"]: item["correct"][metric] for item in a["per_item"]}
    b_items = {item["doc_id"]: item["correct"][metric] for item in b["per_item"]}
    shared = [doc_id for doc_id in a_items if doc_id in b_items]
    diffs = [b_items[d] - a_items[d] for d in shared]
    return {"metric": metric, "n": len(shared), "difference": mean(diffs),
            "stderr": mean_stderr(diffs)}

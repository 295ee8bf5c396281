"""Batches built by length under a token budget, so padding stays small.

Items are sorted longest first (as lm-eval does: the first batch is the largest, so memory
trouble shows at once) and cut into consecutive batches whose padded size, rows x longest
row, stays within `token_budget` (a single item longer than the budget gets a batch of its
own). `max_rows` caps the rows of a batch as well. The order inside a batch never changes a
per-item result: every row is computed independently of the others.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from .. import config

T = TypeVar("T")

# Defaults of params/default.yaml `evaluation.batch_size` / `evaluation.token_budget`. On a
# CPU a forward pass of ~1000 tokens already runs near the matmul peak, and larger batches
# only add padding and spill the caches (HellaSwag, SmolLM2-135M, 1 thread: 1024 tokens per
# batch ran fastest of 512-16384), hence the CPU's cap of the default token budget "auto"
# (memory.AUTO_CAPS), which on a GPU sizes the budget to the free memory. Generation decodes up
# to `batch_size` prompts together (each prefilled alone).
DEFAULT_BATCH_SIZE = config.default("evaluation.batch_size")
DEFAULT_TOKEN_BUDGET = config.default("evaluation.token_budget")


def by_budget(items: Sequence[T], length: Callable[[T], int], token_budget: int,
              max_rows: int | None = None) -> list[list[T]]:
    """Consecutive batches of `items` sorted by `length` (longest first) within the budget."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be at least 1, got {token_budget}")
    batches: list[list[T]] = []
    batch: list[T] = []
    width = 0
    for item in sorted(items, key=length, reverse=True):
        n = length(item)
        fits = (len(batch) + 1) * max(width, n) <= token_budget
        if batch and (not fits or (max_rows and len(batch) >= max_rows)):
            batches.append(batch)
            batch, width = [], 0
        batch.append(item)
        width = max(width, n)
    if batch:
        batches.append(batch)
    return batches

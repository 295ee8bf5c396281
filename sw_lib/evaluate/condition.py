"""One evaluation call's condition: the edits, the weights they apply to, its cache key.

`open_condition` is where every evaluation (run_task, perplexity) starts: it resolves the
cache, asks which weights the model holds now (weights.py: edits the caller made around the
call join the key, other writes re-fingerprint the weights), builds the key of the results,
and the plan for reusing kept layer inputs (prefix.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .. import ablate
from . import cache as cache_mod
from .prefix import Plan, make_plan
from .weights import Weights, current


@dataclass
class Condition:
    """What one evaluation call runs on and where its results live."""

    edits: list  # the engine's edits (applied around the computation)
    weights: Weights  # the weights they are applied to (caller's edits included)
    store: cache_mod.EvalCache | None
    key: dict
    plan: Plan | None

    def label(self, name: str) -> str:
        edits = len(self.edits) + len(self.weights.outside)
        return f"{name} ({edits} edits)" if edits or self.weights.changed else f"{name} (baseline)"

    def info(self) -> dict:
        return {"weights": self.weights.describe(),
                "outside_edits": [e.to_dict() for e in self.weights.outside],
                "cache": str(self.store.path(self.key)) if self.store else None}


def open_condition(lm, edits: list, task_key: dict, cache, keep_layers: Iterable[int]) -> Condition:
    """Resolve the cache, the weights as they are now, the condition's key and its reuse plan."""
    store = cache_mod.resolve(cache)
    weights = current(lm)
    applied = list(weights.outside) + edits
    key = cache_mod.condition_key(lm, weights.fingerprint, ablate.edits_key(applied), task_key)
    plan = make_plan(store.states if store else None, weights.fingerprint, applied, keep_layers)
    return Condition(edits, weights, store, key, plan)

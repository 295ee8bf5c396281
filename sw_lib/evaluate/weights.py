"""Which weights an evaluation runs on, so a result is never stored under the wrong ones.

The cache keys a condition by the model's fingerprint plus the edits the engine applies. A
caller may also have changed the weights itself around the call (the README invites
`with ablate.zeroed(...): run_task(...)`); storing that result under the unedited model's key
would poison every later baseline. So before each evaluation the engine asks the model's
ledger (`ablate.outside_edits`):
- no change since the fingerprint: the key is (fingerprint, the engine's edits);
- only the caller's active `ablate.edited` blocks changed it: their edits join the key, so
  the result is the same condition as passing those edits to the engine (and shares its
  cache entries);
- anything else wrote to a weight in place: the fingerprint is recomputed from the weights as
  they are now and keys the result (identical weights find their entries again).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ablate, models


@dataclass(frozen=True)
class Weights:
    fingerprint: str  # of the weights the engine's own edits are applied to
    outside: tuple  # WeightEdits active around the call (the caller's ablate.edited blocks)
    changed: bool  # written outside ablate: `fingerprint` was recomputed from the weights

    def describe(self) -> str:
        if self.changed:
            return f"changed outside the engine; keyed by their own fingerprint {self.fingerprint}"
        if self.outside:
            return f"with {len(self.outside)} edit(s) made outside the engine (in the cache key)"
        return "as loaded"


def current(lm) -> Weights:
    """The weights `lm.model` holds now, as the cache must key them."""
    outside = ablate.outside_edits(lm.model)
    if outside is not None:
        return Weights(lm.fingerprint, tuple(outside), False)
    actual = models.fingerprint(lm.model)
    if actual == lm.fingerprint and not ablate.active_edits(lm.model):
        ablate.mark_unmodified(lm.model)  # written back to the loaded values: known again
    return Weights(actual, (), actual != lm.fingerprint)

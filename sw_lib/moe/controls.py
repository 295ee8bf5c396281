"""Control experts for the super experts: as many ordinary experts from the same layers, with
routing frequency matched.

Skipping an expert that is never routed to changes nothing by construction, so a random control
expert would make any super expert look special. For each super expert (layer l, routing
frequency p = its p_active on the calibration texts; a shared expert sees every token, p = 1)
a control expert is drawn, seeded, from the `match_pool` routed experts of layer l whose p_active
is nearest p (ties: the lower index), leaving out the super experts and the experts already drawn
for the same set. `control_sets` independent sets are drawn (seeds "<seed>:control-set:<k>");
each set is skipped as a whole against all super experts skipped together, and each set's k-th
expert alone against the k-th super expert skipped alone.
"""
from __future__ import annotations

import random
from typing import Sequence

STATEMENT = ("for each super expert, a routed expert of its layer drawn (seeded) from the "
             "match_pool non-super experts whose p_active on the calibration texts is nearest "
             "its own (a shared expert counts as p_active 1); no expert twice in a set")


def expert_label(e: dict) -> str:
    """`L{layer} E{expert}`, or `L{layer} shared`."""
    return f"L{e['layer']} " + ("shared" if e.get("shared") else f"E{e['expert']}")


def expert_key(e: dict) -> dict:
    """The {"layer", "expert", "shared"} of an expert record (what `edits.skip` reads)."""
    return {"layer": int(e["layer"]), "expert": None if e.get("expert") is None else int(e["expert"]),
            "shared": bool(e.get("shared", False))}


def routing_frequency(expert: dict, p_active: dict[int, Sequence[float]]) -> float:
    """An expert's p_active (1 for a shared expert: it sees every token)."""
    return 1.0 if expert.get("shared") else float(p_active[expert["layer"]][expert["expert"]])


def matched_controls(super_experts: Sequence[dict], p_active: dict[int, Sequence[float]],
                     control_sets: int, match_pool: int, seed: int = 0) -> list[list[dict]]:
    """`control_sets` lists of control experts, the k-th matched to the k-th super expert:
    {"layer", "expert", "shared": False, "p_active", "matched_to", "target_p_active"}."""
    if match_pool < 1:
        raise ValueError(f"control_match_pool must be at least 1, got {match_pool}")
    protected = {(s["layer"], s["expert"]) for s in super_experts if not s.get("shared")}
    sets = []
    for index in range(control_sets):
        rng = random.Random(f"{seed}:control-set:{index}")
        taken: set[tuple[int, int]] = set()
        picks = []
        for s in super_experts:
            layer, target = int(s["layer"]), routing_frequency(s, p_active)
            frequencies = p_active[layer]
            pool = [e for e in range(len(frequencies))
                    if (layer, e) not in protected and (layer, e) not in taken]
            if not pool:
                raise ValueError(f"layer {layer} has no expert left to match {expert_label(s)}; "
                                 "lower control_sets or skip fewer super experts")
            pool.sort(key=lambda e: (abs(frequencies[e] - target), e))
            expert = rng.choice(pool[:match_pool])
            taken.add((layer, expert))
            picks.append({"layer": layer, "expert": expert, "shared": False,
                          "p_active": float(frequencies[expert]), "matched_to": expert_label(s),
                          "target_p_active": target})
        sets.append(picks)
    return sets


def match_quality(control_sets: Sequence[Sequence[dict]]) -> dict:
    """How close the matching came: the largest and mean |p_active - target| over all picks."""
    gaps = [abs(c["p_active"] - c["target_p_active"]) for cs in control_sets for c in cs]
    return {"max_abs_gap": max(gaps) if gaps else None,
            "mean_abs_gap": sum(gaps) / len(gaps) if gaps else None}

"""Verdicts: does a condition matter more than zeroing ordinary weights does?

A condition (a weight zeroed alone, a (layer, column) group zeroed together, an expert skipped:
`edits.EditSet`) is measured on the reference text (`sw_lib.reference`):

- its effect e = mean over the reference's predicted tokens of NLL(condition) - NLL(unchanged),
  in nats, in float32; `perplexity_ratio` = exp(e) (the reference text's perplexity ratio);
- an interval [lo, hi] for e: percentile bootstrap (`evaluate.stats.bootstrap_interval`,
  seeded) over non-overlapping blocks of `block_tokens` consecutive tokens, since neighbouring
  tokens are not independent; a shorter last block is one unit too.

Its control is the same measurement for conditions that are ordinary by construction; for a
weight, weights of the same matrix that are not candidates: the `control_largest` largest |W|
(shared by the matrix's candidates), and `control_random` random weights of the candidate's row
and as many of its column (seeded by matrix, row / column; shared by candidates with that row /
column). c = the largest |effect| among the controls (0 without controls): zeroing an ordinary
weight can move the loss either way, and c is how far the control moved it. A condition whose
interval does not lie above 0 is no_effect whatever its control, so its control is not
measured (`control.measured` false): that keeps the many late-layer spikes cheap.

The rule (`VerdictRule`), in this order:
- `super_weight`: lo > c (the whole interval above every control) and exp(e) >= super_ratio
  (catastrophic in absolute terms) and e >= control_multiple * c (far outside the control);
- `contributor`: lo > c (clearly above the control), but not a super weight;
- `no_effect`: everything else, negative effects included.

A member of a (layer, column) group earns its verdict by its own effect; the group's joint
effect gets a verdict of its own (for `unit="group"` ablation) against its members' controls.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import arch, config
from .ablate import weight_label
from .edits import EditSet
from .evaluate.stats import bootstrap_interval
from .reference import Meter

VERDICTS = ("super_weight", "contributor", "no_effect")
# Keyword defaults come from params/default.yaml (the one source of defaults).
DEFAULT_SUPER_RATIO = config.default("detection.super_ratio")
DEFAULT_CONTROL_LARGEST = config.default("detection.control_largest")
DEFAULT_CONTROL_RANDOM = config.default("detection.control_random")
DEFAULT_SEED = config.default("runtime.seed")


@dataclass(frozen=True)
class VerdictRule:
    super_ratio: float = DEFAULT_SUPER_RATIO  # perplexity ratio a super weight reaches at least
    control_multiple: float = 10.0  # effect / largest control effect, at least
    block_tokens: int = 32  # bootstrap unit: consecutive reference tokens
    confidence: float = 0.95
    seed: int = DEFAULT_SEED  # bootstrap and random control weights

    def __post_init__(self):
        if not self.super_ratio > 1.0:
            raise ValueError(f"super_ratio must be above 1 (a perplexity ratio), got "
                             f"{self.super_ratio}")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be at least 1, got {self.block_tokens}")

    def to_dict(self) -> dict:
        return {**asdict(self), "statement": (
            "e = mean per-token NLL difference (condition - unchanged) on the reference text, "
            "perplexity_ratio = exp(e), [lo, hi] its block-bootstrap interval; c = largest "
            "|effect| of the control conditions (0 without controls). super_weight: lo > c and "
            "exp(e) >= super_ratio and e >= control_multiple * c; contributor: lo > c, not a "
            "super weight; no_effect: otherwise")}

    def verdict(self, effect: dict, control: dict) -> str:
        c = control["max_abs_effect"] or 0.0
        e, (lo, _) = effect["effect"], effect["effect_interval"]
        if not lo > c:
            return "no_effect"
        if effect["perplexity_ratio"] >= self.super_ratio and e >= self.control_multiple * c:
            return "super_weight"
        return "contributor"


# --- effects ---------------------------------------------------------------------------------


def _ratio(effect: float) -> float:
    return math.exp(effect) if effect < 700 else float("inf")


def block_sums(differences: torch.Tensor, block_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) of the per-token differences in each block of `block_tokens` tokens."""
    d = differences.double().numpy()
    starts = range(0, len(d), block_tokens)
    return (np.array([d[s:s + block_tokens].sum() for s in starts]),
            np.array([len(d[s:s + block_tokens]) for s in starts], dtype=np.float64))


def effect_of(differences: torch.Tensor, rule: VerdictRule, interval: bool = True) -> dict:
    """Effect, perplexity ratio and (when `interval`) the block-bootstrap interval of e.

    A non-finite NLL (the condition broke the model: inf or NaN logits) is the largest effect
    there is: e = lo = hi = inf, with `non_finite` set (JSON writes inf as null)."""
    if not bool(torch.isfinite(differences).all()):
        inf = float("inf")
        return {"effect": inf, "perplexity_ratio": inf, "non_finite": True,
                **({"effect_interval": [inf, inf], "perplexity_ratio_interval": [inf, inf]}
                   if interval else {})}
    e = float(differences.double().mean())
    result = {"effect": e, "perplexity_ratio": _ratio(e)}
    if interval:
        sums, counts = block_sums(differences, rule.block_tokens)
        bounds = bootstrap_interval([sums, counts], lambda s, n: s.sum() / n.sum(),
                                    confidence=rule.confidence, seed=rule.seed)
        lo, hi = bounds if bounds is not None else (e, e)
        result.update(effect_interval=[lo, hi], perplexity_ratio_interval=[_ratio(lo), _ratio(hi)])
    return result


def control_summary(controls: Sequence[dict]) -> dict:
    """{n, mean_effect, max_effect, max_perplexity_ratio, max_abs_effect, conditions}; each
    control is a dict with its description and its `effect` / `perplexity_ratio`."""
    effects = [c["effect"] for c in controls]
    top = max(effects) if effects else None
    return {"n": len(controls), "mean_effect": float(np.mean(effects)) if effects else None,
            "max_effect": top, "max_perplexity_ratio": None if top is None else _ratio(top),
            "max_abs_effect": max(map(abs, effects)) if effects else None,
            "conditions": list(controls)}


# --- judging conditions ------------------------------------------------------------------------


@dataclass
class Case:
    """One condition to judge, and its controls as (description, condition) pairs."""

    condition: EditSet
    controls: list[tuple[dict, EditSet]]


def _measure(meter: Meter, conditions, measured: dict, desc: str, progress: bool) -> None:
    """Measure each condition not measured yet, cheapest (highest first layer) first."""
    todo = [c for c in dict.fromkeys(conditions) if c not in measured]
    for condition in tqdm(sorted(todo, key=lambda c: -c.first_layer), desc=desc,
                          unit="condition", disable=not progress or not todo, leave=False):
        measured[condition] = meter.differences(condition)


def judge(meter: Meter, cases: Sequence[Case], rule: VerdictRule = VerdictRule(),
          progress: bool = True) -> list[dict]:
    """Give each case {effect, perplexity_ratio, effect_interval, perplexity_ratio_interval,
    control, verdict}. Every condition is measured once (shared controls too).

    A case whose interval does not lie above 0 is no_effect whatever its control (c >= 0), so
    its controls are measured only when another case needs them; its `control` then says
    `measured: false` and n = 0.
    """
    measured: dict[EditSet, torch.Tensor] = {}
    _measure(meter, [c.condition for c in cases], measured, "measuring candidates", progress)
    effects = [effect_of(measured[c.condition], rule) for c in cases]
    needed = [c for c, e in zip(cases, effects) if e["effect_interval"][0] > 0]
    _measure(meter, [cond for c in needed for _, cond in c.controls], measured,
             "measuring controls", progress)
    out = []
    for case, effect in zip(cases, effects):
        above_zero = effect["effect_interval"][0] > 0
        control = control_summary([{**description, **effect_of(measured[cond], rule, False)}
                                   for description, cond in case.controls] if above_zero else [])
        control["measured"] = above_zero
        out.append({**effect, "control": control, "verdict": rule.verdict(effect, control)})
    return out


# --- controls for weights ------------------------------------------------------------------------


def _matrix_key(w: dict) -> tuple:
    return int(w["layer"]), w.get("expert"), bool(w.get("shared", False))


def _coordinate(key: tuple, row: int, column: int, kind: str, matrix: torch.Tensor) -> dict:
    layer, expert, shared = key
    return {"layer": layer, "row": row, "column": column, "expert": expert, "shared": shared,
            "kind": kind, "value": float(matrix[row, column].detach())}


def largest_weights(matrix: torch.Tensor, k: int, exclude: set[tuple[int, int]]) -> list[tuple]:
    """(row, column) of the `k` largest |W| of `matrix` not in `exclude`, largest first."""
    if k <= 0:
        return []
    flat = matrix.detach().float().abs().flatten()
    top = torch.topk(flat, min(k + len(exclude), flat.numel())).indices.tolist()
    coords = [divmod(i, matrix.shape[1]) for i in top]
    return [c for c in coords if c not in exclude][:k]


def _random_line(n: int, k: int, seed: str, taken: Callable[[int], bool]) -> list[int]:
    """`k` distinct indices below `n` not `taken`, drawn with a string-seeded generator."""
    pool = [i for i in range(n) if not taken(i)]
    return sorted(random.Random(seed).sample(pool, min(k, len(pool))))


def weight_controls(model: torch.nn.Module, weights: Sequence[dict], largest: int, randoms: int,
                    seed: int = 0) -> list[list[dict]]:
    """Per weight, its control weights: the matrix's `largest` largest |W| that are not
    candidates, and `randoms` random non-candidate weights of its row and of its column.
    Every weight of `weights` counts as a candidate; each control is a coordinate dict with
    `kind` ("largest", "row", "column") and the weight's `value`."""
    candidates: dict[tuple, set[tuple[int, int]]] = {}
    for w in weights:
        candidates.setdefault(_matrix_key(w), set()).add((int(w["row"]), int(w["column"])))
    out = []
    for w in weights:
        key = _matrix_key(w)
        matrix = arch.weight_matrix(model, *key)
        exclude = candidates[key]
        row, column = int(w["row"]), int(w["column"])
        coords = [(r, c, "largest") for r, c in largest_weights(matrix, largest, exclude)]
        coords += [(row, c, "row") for c in _random_line(
            matrix.shape[1], randoms, f"{seed}:{key}:row:{row}", lambda c: (row, c) in exclude)]
        coords += [(r, column, "column") for r in _random_line(
            matrix.shape[0], randoms, f"{seed}:{key}:column:{column}",
            lambda r: (r, column) in exclude)]
        unique: dict[tuple[int, int], str] = {}
        for r, c, kind in coords:  # a largest weight may also be a random pick: keep it once
            unique.setdefault((r, c), kind)
        out.append([_coordinate(key, r, c, kind, matrix) for (r, c), kind in unique.items()])
    return out


def weight_cases(model: torch.nn.Module, weights: Sequence[dict], largest: int, randoms: int,
                 seed: int = 0) -> list[Case]:
    """A case per weight: zeroed alone, against its control weights zeroed alone."""
    controls = weight_controls(model, weights, largest, randoms, seed)
    return [Case(EditSet.zeroing([w]),
                 [(c, EditSet.zeroing([c])) for c in cs]) for w, cs in zip(weights, controls)]


# --- what the notebooks show and ablate ------------------------------------------------------


def verdict_rows(candidates: Sequence[dict]) -> list[dict]:
    """One row per candidate: perplexity ratio with its interval, the control's largest
    ratio, the verdict (what notebook 01 tables)."""
    rows = []
    for c in candidates:
        low, high = c.get("perplexity_ratio_interval") or (None, None)
        control = c.get("control") or {}
        rows.append({"candidate": weight_label(c), "flagged_by": "+".join(c.get("flagged_by", [])),
                     "perplexity_ratio": c.get("perplexity_ratio"),
                     "interval": None if low is None else f"[{low:.4g}, {high:.4g}]",
                     "control_max_ratio": control.get("max_perplexity_ratio"),
                     "control_n": control.get("n"), "verdict": c.get("verdict")})
    return rows


def verdict_summary(detection: dict) -> str:
    """One sentence: how many candidates got each verdict (or that none was given)."""
    n = len(detection["candidates"])
    if detection.get("verdict_rule") is None:
        return (f"{n} candidate(s), no verdicts: detection ran without the causal test, so "
                "every candidate is listed as a super weight (the original script's behaviour).")
    counts = {v: sum(c.get("verdict") == v for c in detection["candidates"]) for v in VERDICTS}
    return (f"{n} candidate(s): {counts['super_weight']} super weight(s), "
            f"{counts['contributor']} contributor(s), {counts['no_effect']} spike(s) with no "
            "effect beyond the control.")


def ablation_selection(detection: dict, include_contributors: bool = False) -> dict:
    """What notebooks 02 and 03 ablate: the candidates with verdict super_weight (and
    contributor on request), in detection order. A detection without verdicts (confirm off,
    or written before verdicts existed) gives its `super_weights` list, as the original script
    ablated every candidate. Returns {"weights", "verdicts", "include_contributors",
    "statement"}; `verdicts` is None when there were none."""
    if detection.get("verdict_rule") is None:
        weights = list(detection["super_weights"])
        return {"weights": weights, "verdicts": None,
                "include_contributors": include_contributors,
                "statement": f"{len(weights)} weight(s), every candidate: the detection gave no "
                             "verdicts (no causal test), as in the original script"}
    verdicts = ["super_weight"] + (["contributor"] if include_contributors else [])
    weights = [c for c in detection["candidates"] if c.get("verdict") in verdicts]
    return {"weights": weights, "verdicts": verdicts, "include_contributors": include_contributors,
            "statement": f"{len(weights)} weight(s) with verdict {' or '.join(verdicts)}"}

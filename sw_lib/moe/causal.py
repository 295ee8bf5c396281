"""Is a spike causal? Loss ratios on a short WikiText-2 reference text.

For each expert super weight: loss with it zeroed / baseline loss. For each super expert:
loss with the whole expert skipped (its down projection zeroed) / baseline, against skipping
random experts of the same layers instead (several seeds; mean and spread reported).
"""
from __future__ import annotations

import random
import statistics

import torch
from torch import nn

from .. import ablate, arch, reference
from .texts import reference_ids

# Mean next-token negative log-likelihood of [1, S] ids in float32 (the dense detector's).
reference_loss = reference.mean_loss


# Routed and shared experts alike (the mechanism lives with the other weight edits).
experts_skipped = ablate.experts_skipped


def score_weights(lm, weights: list[dict], reference_tokens: int = 512,
                  ids: torch.Tensor | None = None) -> dict:
    """Each weight's loss ratio when zeroed alone, and all of them together."""
    ids = reference_ids(lm.tokenizer, reference_tokens) if ids is None else ids
    baseline = reference_loss(lm.model, ids)
    scored = []
    for w in weights:
        with ablate.zeroed(lm.model, [w]):
            scored.append(dict(w, loss_ratio=reference_loss(lm.model, ids) / baseline))
    together = None
    if weights:
        with ablate.zeroed(lm.model, weights):
            together = reference_loss(lm.model, ids) / baseline
    return {"reference_tokens": int(ids.shape[1]), "baseline_loss": baseline,
            "weights": scored, "all_loss_ratio": together}


def _spread(ratios: list[float]) -> dict:
    return {"mean": statistics.fmean(ratios), "std": statistics.pstdev(ratios),
            "min": min(ratios), "max": max(ratios), "ratios": ratios}


def random_controls(model: nn.Module, super_experts: list[dict], seeds: int) -> list[list[dict]]:
    """Per seed 0..seeds-1: for each super expert, a random routed expert of its layer that is
    not itself a super expert (deterministic given the seed)."""
    protected = {(s["layer"], s["expert"]) for s in super_experts if not s["shared"]}
    controls = []
    for seed in range(seeds):
        rng = random.Random(seed)
        picks = []
        for s in super_experts:
            pool = [e for e in range(arch.num_experts(model, s["layer"]))
                    if (s["layer"], e) not in protected]
            picks.append({"layer": s["layer"], "expert": rng.choice(pool), "shared": False})
        controls.append(picks)
    return controls


def score_super_experts(lm, super_experts: list[dict], seeds: int = 5,
                        reference_tokens: int = 512, ids: torch.Tensor | None = None) -> dict:
    """Loss ratio of skipping each super expert, and all of them together, against skipping
    random routed experts of the same layers (one per super expert, never a super expert),
    drawn with seeds 0..seeds-1."""
    model = lm.model
    ids = reference_ids(lm.tokenizer, reference_tokens) if ids is None else ids
    baseline = reference_loss(model, ids)

    def ratio(experts: list[dict]) -> float:
        with experts_skipped(model, experts):
            return reference_loss(model, ids) / baseline

    controls = random_controls(model, super_experts, seeds)
    experts = []
    for i, s in enumerate(super_experts):
        key = {"layer": s["layer"], "expert": s["expert"], "shared": s["shared"]}
        control = dict(_spread([ratio([picks[i]]) for picks in controls]),
                       experts=[picks[i]["expert"] for picks in controls])
        experts.append(dict(key, loss_ratio=ratio([key]), random_control=control))
    together = None
    if super_experts:
        together = {"loss_ratio": ratio([{k: s[k] for k in ("layer", "expert", "shared")}
                                         for s in super_experts]),
                    "random_control": _spread([ratio(picks) for picks in controls])}
    return {"reference_tokens": int(ids.shape[1]), "baseline_loss": baseline, "seeds": seeds,
            "experts": experts, "all": together}

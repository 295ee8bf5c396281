"""Causal evidence for MoE findings: verdicts with a control, exactly as dense super weights get.

One implementation (`sw_lib.verdict`: effect on the reference text with a block-bootstrap
interval, a control, the rule), one reference text (`sw_lib.reference`, never evaluated), one
vocabulary and one set of thresholds (super_ratio from params `detection`):

- an expert super weight is zeroed alone against its control weights of the same expert matrix
  (`verdict.weight_cases`: the largest-|W| non-candidates, random weights of its row and column);
- a super expert is skipped alone (`edits.ExpertSkip`: its down projection zeroed) against each
  of its frequency-matched control experts skipped alone (`controls.matched_controls`);
- with two or more super experts, all of them skipped together, against each control set
  skipped together.

The verdict names are the rule's for every kind of condition: `super_weight` (catastrophic and
far outside the control), `contributor` (clearly above the control), `no_effect`. Every
condition is measured once, on one baseline pass, starting at its lowest edited layer.
"""
from __future__ import annotations

from typing import Sequence

from .. import reference, verdict
from ..edits import EditSet
from .controls import expert_key, expert_label


def _expert_cases(super_experts: Sequence[dict],
                  control_sets: Sequence[Sequence[dict]]) -> list[verdict.Case]:
    cases = []
    for i, s in enumerate(super_experts):
        controls = [(dict(cs[i], set=k), EditSet.skipping([expert_key(cs[i])]))
                    for k, cs in enumerate(control_sets)]
        cases.append(verdict.Case(EditSet.skipping([expert_key(s)]), controls))
    return cases


def _joint_case(super_experts: Sequence[dict],
                control_sets: Sequence[Sequence[dict]]) -> verdict.Case:
    controls = [({"set": k, "experts": [expert_label(c) for c in cs]},
                 EditSet.skipping([expert_key(c) for c in cs]))
                for k, cs in enumerate(control_sets)]
    return verdict.Case(EditSet.skipping([expert_key(s) for s in super_experts]), controls)


def judge(lm, weights: list[dict], super_experts: list[dict],
          control_sets: Sequence[Sequence[dict]], rule: verdict.VerdictRule,
          control_largest: int, control_random: int, reference_tokens: int,
          progress: bool = True) -> dict:
    """Give each expert super weight and each super expert (dicts, updated in place) its
    effect, interval, control and verdict. Returns {"reference", "rule", "together"}:
    `together` is the joint verdict of all super experts skipped (None with fewer than two)."""
    ref = reference.reference_text(lm.tokenizer, reference_tokens)
    cases = verdict.weight_cases(lm.model, weights, control_largest, control_random, rule.seed)
    cases += _expert_cases(super_experts, control_sets)
    joint = len(super_experts) > 1
    if joint:
        cases.append(_joint_case(super_experts, control_sets))
    meter = reference.Meter(lm.model, ref.ids, {case.condition.first_layer for case in cases})
    judged = verdict.judge(meter, cases, rule, progress) if cases else []
    for record, result in zip([*weights, *super_experts], judged):
        record.update(result)
    together = None
    if joint:
        together = {"experts": [expert_label(s) for s in super_experts], **judged[-1]}
    return {"reference": {**ref.info(), "predicted_tokens": int(meter.baseline.numel()),
                          "baseline_loss": float(meter.baseline.double().mean())},
            "rule": {**rule.to_dict(), "control_largest": control_largest,
                     "control_random": control_random,
                     "expert_control": "the frequency-matched control experts (controls)"},
            "together": together}

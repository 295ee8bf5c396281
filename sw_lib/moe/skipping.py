"""The headline of Su et al.: perplexity and accuracy with the super experts skipped, against
skipping frequency-matched control experts instead.

Conditions, each evaluated once on the same items by the evaluation engine (cached, starting at
the lowest skipped layer from the baseline's kept layer inputs, restored bit-exactly):
the unchanged model (baseline), all super experts skipped together, and each control set
(`controls.matched_controls`: as many experts from the same layers, routing frequency matched)
skipped together. Each is compared with the baseline by `sw_lib.study` (perplexity ratio with a
paired bootstrap interval over windows; per task the paired change with Tango's interval and
exact McNemar test; a severity only where significant, else "inconclusive").
"""
from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from .. import study
from ..edits import skip
from .controls import expert_key, expert_label


def _condition(label: str, experts: Sequence[dict], baseline: study.Condition,
               condition: study.Condition) -> dict:
    return {"label": label, "experts": [expert_label(e) for e in experts],
            "skipped": [expert_key(e) for e in experts],
            **study.compare(baseline, condition), "seconds": condition.seconds}


def skip_study(lm, super_experts: Sequence[dict], control_sets: Sequence[Sequence[dict]],
               settings: study.StudySettings | None = None, cache=None) -> dict | None:
    """Evaluate the super experts skipped and each control set skipped against the baseline.

    Returns None without super experts, else {"settings", "baseline": summary,
    "super_experts": condition, "controls": [condition, ...]}, where a condition is {"label",
    "experts", "skipped", "perplexity_impact", "accuracy_impacts", "seconds"}."""
    if not super_experts:
        return None
    settings = (settings or study.StudySettings()).for_model(lm)
    layers = {int(e["layer"]) for e in super_experts}
    baseline = study.evaluate_condition(lm, [], settings, cache, keep_layers=layers)
    conditions = [(f"skip {len(super_experts)} super expert(s)", super_experts)]
    conditions += [(f"skip control set {k} ({len(cs)} expert(s))", cs)
                   for k, cs in enumerate(control_sets)]
    evaluated = []
    for label, experts in tqdm(conditions, desc="skipping experts", unit="condition",
                               disable=not settings.progress):
        condition = study.evaluate_against(lm, baseline, skip(map(expert_key, experts)),
                                           settings, cache)
        evaluated.append(_condition(label, experts, baseline, condition))
    return {"settings": settings.to_dict(), "baseline": study.summarize(baseline),
            "super_experts": evaluated[0], "controls": evaluated[1:]}


def _row(condition: dict, tasks: Sequence[str]) -> dict:
    ppl = condition["perplexity_impact"]
    row = {"condition": condition["label"], "experts": ", ".join(condition["experts"])}
    if ppl is not None:
        low, high = ppl["ratio_ci95"] or (None, None)
        row.update(perplexity=ppl["modified_perplexity"], perplexity_ratio=ppl["perplexity_ratio"],
                   ratio_ci95=None if low is None else f"[{low:.3g}, {high:.3g}]",
                   perplexity_severity=ppl["impact_severity"])
    for task in tasks:
        impact = condition["accuracy_impacts"].get(task)
        if impact is not None:
            diff = impact["paired_difference"]
            row[f"{task} change"] = diff["mean"]
            row[f"{task} p"] = diff["p_value"]
            row[f"{task} severity"] = impact["impact_severity"]
    return row


def summary_rows(result: dict | None) -> list[dict]:
    """One row per condition (super experts first, then the controls): perplexity, its ratio
    with the interval and severity, and per task the paired accuracy change, p and severity."""
    if result is None:
        return []
    tasks = list(result["super_experts"]["accuracy_impacts"])
    return [_row(c, tasks) for c in [result["super_experts"], *result["controls"]]]

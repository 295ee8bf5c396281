"""Ablation figures: intervals on every bar and point, "n.s." where not significant, and a
destroyed model drawn to the top of the axis."""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer

from sw_lib import study
from sw_lib.plots import ablation

matplotlib.use("Agg")
TOKENS = 127  # predicted tokens per window


def _condition(nll_shift: float, flips: int, n: int = 20, destroyed: bool = False):
    """8 windows whose NLL moves by `nll_shift` per token (plus noise), and a task whose first
    `flips` correct items (acc_norm; acc loses half as many) turn wrong."""
    rng = np.random.default_rng(abs(flips) + int(nll_shift * 10))
    nll = (np.random.default_rng(0).normal(3.0, 0.2, 8) + nll_shift
           + rng.normal(0, 0.01, 8)) * TOKENS
    if destroyed:
        nll[:] = math.inf
    correct = np.array([1] * 14 + [0] * 6)
    norm, acc = correct.copy(), correct.copy()
    norm[:flips] = 0
    acc[:flips // 2] = 0
    task = {"primary_metric": "acc_norm", "n_samples": n,
            "metrics": {"acc_norm": {"value": float(norm.mean()), "stderr": 0.1},
                        "acc": {"value": float(acc.mean()), "stderr": 0.1}},
            "per_item": [{"doc_id": i, "correct": {"acc_norm": int(a), "acc": int(b)}}
                         for i, (a, b) in enumerate(zip(norm, acc))]}
    perplexity = {"perplexity": math.exp(nll.sum() / (8 * TOKENS)), "per_window_nll": nll.tolist(),
                  "n_windows": 8, "n_tokens": 8 * TOKENS, "windows": list(range(8)),
                  "dataset_info": {}}
    return study.Condition(edits=[], perplexity=perplexity, tasks={"arc_easy": task})


WEIGHTS = [{"layer": 2, "row": 507, "column": 90}, {"layer": 9, "row": 507, "column": 200},
           {"layer": 11, "row": 507, "column": 1229, "expert": 3}]


@pytest.fixture(scope="module")
def individual():
    base = _condition(0.0, 0)
    conditions = [_condition(0.6, 10), _condition(0.0, 1), _condition(0.0, 14, destroyed=True)]
    units = study.ablation_units(WEIGHTS)
    return {"analyses": [study._analysis(u, base, c, i)
                         for i, (u, c) in enumerate(zip(units, conditions))]}


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _hollow_points(ax) -> int:
    return sum(1 for line in ax.lines if line.get_marker() not in (None, "None", "", "_")
               and to_rgba(line.get_markerfacecolor()) == (1.0, 1.0, 1.0, 1.0))


def test_impact_comparison_shows_intervals_and_marks_what_is_not_significant(individual, tmp_path):
    impacts = [a["perplexity_impact"] for a in individual["analyses"]]
    assert [i["impact_severity"] for i in impacts] == ["moderate", "inconclusive", "catastrophic"]
    accuracy = [a["accuracy_impacts"]["arc_easy"] for a in individual["analyses"]]
    assert [i["significant"] for i in accuracy] == [True, False, True]

    fig = ablation.impact_comparison(individual, tmp_path / "impact.png")
    ppl_ax, acc_ax = fig.axes[:2]
    assert ppl_ax.get_yscale() == "log"
    assert [t.get_text() for t in ppl_ax.get_xticklabels()] == [
        "L2 [507, 90]", "L9 [507, 200]", "L11 E3 [507, 1229]"]
    ratio = impacts[0]["perplexity_ratio"]
    assert _texts(ppl_ax) == [f"{ratio:.3f}×", f"{impacts[1]['perplexity_ratio']:.3f}× n.s.",
                              "∞ (destroyed)"]
    # Both finite ratios carry their bootstrap interval as an error bar.
    bars = [c for c in ppl_ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2
    # The destroyed model's bar reaches the top of the axis (never height 0).
    top = max(p.get_y() + p.get_height() for p in ppl_ax.patches)
    assert top == pytest.approx(ppl_ax.get_ylim()[1])

    # Accuracy: both metrics of each condition, each with its interval; the n.s. ones hollow.
    assert acc_ax.get_title().startswith("arc_easy (n=20")
    assert len([c for c in acc_ax.containers if isinstance(c, ErrorbarContainer)]) == 6
    not_significant = [m for i in accuracy for m in i["metrics"].values()
                       if not m["paired_difference"]["significant"]]
    assert _hollow_points(acc_ax) == len(not_significant) > 0
    assert sum(t.endswith("n.s.") for t in _texts(acc_ax)) == len(not_significant)
    assert (tmp_path / "impact.png").stat().st_size > 10_000


def test_combined_analysis_shows_intervals(individual, tmp_path):
    base = _condition(0.0, 0)
    combined = {"super_weights": WEIGHTS, **study.compare(base, _condition(3.0, 12))}
    fig = ablation.combined_analysis(individual, combined, tmp_path / "combined.png")
    ppl_ax, acc_ax = fig.axes
    labels = [t.get_text() for t in ppl_ax.get_xticklabels()]
    assert labels == ["L2 [507, 90]", "L9 [507, 200]", "L11 E3 [507, 1229]", "all combined"]
    ratio = combined["perplexity_impact"]["perplexity_ratio"]
    assert _texts(ppl_ax)[-2:] == [f"{ratio:.1f}×", "∞ (destroyed)"]
    assert len([c for c in acc_ax.containers if isinstance(c, ErrorbarContainer)]) == 4
    assert _hollow_points(acc_ax) == 1 and "n.s." in _texts(acc_ax)
    assert (tmp_path / "combined.png").stat().st_size > 10_000


def test_ratios_near_one_use_a_linear_axis_that_holds_their_intervals():
    base = _condition(0.0, 0)
    units = study.ablation_units(WEIGHTS[:2])
    individual = {"analyses": [study._analysis(u, base, _condition(shift, 0), i)
                               for i, (u, shift) in enumerate(zip(units, [0.02, 0.0]))]}
    ax = ablation.impact_comparison(individual).axes[0]
    assert ax.get_yscale() == "linear"
    low, high = ax.get_ylim()
    for a in individual["analyses"]:
        ci = a["perplexity_impact"]["ratio_ci95"]
        assert low < ci[0] <= ci[1] < high

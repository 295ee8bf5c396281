"""Cross-model comparison: a destroyed model (perplexity no longer finite) is counted and drawn
as catastrophic, never dropped or drawn at height 0; ratios and drops carry their intervals."""
from __future__ import annotations

import json
import math

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer

from sw_lib import results, study
from sw_lib.plots import comparison

matplotlib.use("Agg")
TOKENS = 127


def _condition(shift: float, noise: float, flips: int, destroyed: bool = False):
    # Windows move by `shift` per token, alternately `noise` more and less: the mean stays.
    wiggle = noise * (-1.0) ** np.arange(8)
    nll = (np.random.default_rng(0).normal(3.0, 0.2, 8) + shift + wiggle) * TOKENS
    if destroyed:
        nll[:] = math.inf
    correct = np.array([1] * 30 + [0] * 10)
    correct[:flips] = 0
    task = {"primary_metric": "acc", "n_samples": 40,
            "metrics": {"acc": {"value": float(correct.mean()), "stderr": 0.05}},
            "per_item": [{"doc_id": i, "correct": {"acc": int(c)}} for i, c in enumerate(correct)]}
    ppl = {"perplexity": math.exp(nll.sum() / (8 * TOKENS)), "per_window_nll": nll.tolist(),
           "n_windows": 8, "n_tokens": 8 * TOKENS, "windows": list(range(8)), "dataset_info": {}}
    return study.Condition(edits=[], perplexity=ppl, tasks={"mmlu": task})


def _analysis(slug: str, modified, as_json: bool = True, combined: bool = True) -> dict:
    impacts = study.compare(_condition(0.0, 0.0, 0), modified)
    weights = [{"layer": 1, "row": 3, "column": 5}]
    doc = {"slug": slug, "model": slug, "status": "ok", "family": "llama",
           "detection": {"num_layers": 4, "super_weights": weights},
           "individual": [dict(impacts)],
           "combined": {"super_weights": weights, **impacts} if combined else None}
    # As the comparison reads it from analysis_<ts>.json: inf became null on the way.
    return json.loads(json.dumps(results.jsonable(doc))) if as_json else doc


@pytest.fixture(scope="module")
def three():
    return [_analysis("destroyed", _condition(0.0, 0.0, 20, destroyed=True)),
            _analysis("severe", _condition(math.log(3.0), 0.01, 12)),
            _analysis("noise", _condition(0.0, 0.3, 1))]


def test_a_destroyed_model_is_counted_not_dropped(three):
    summary = comparison.summarize(three)
    models = {m["slug"]: m for m in summary["models"]}
    assert models["destroyed"]["perplexity_destroyed"] is True
    assert models["destroyed"]["perplexity_ratio"] is None
    assert models["destroyed"]["impact_severity"] == "catastrophic"
    assert models["severe"]["perplexity_significant"] is True
    assert models["noise"]["perplexity_significant"] is False
    assert models["noise"]["impact_severity"] == "inconclusive"

    stats = summary["statistics"]
    assert stats["n_models_destroyed"] == 1 and stats["models_destroyed"] == ["destroyed"]
    finite = [models["severe"]["perplexity_ratio"], models["noise"]["perplexity_ratio"]]
    ratio = stats["perplexity_ratio"]
    assert ratio["n"] == 2 and ratio["n_destroyed"] == 1
    assert ratio["mean"] == pytest.approx(np.mean(finite))
    # Ranked with the destroyed model highest, the median is the larger finite ratio.
    assert ratio["median_including_destroyed"] == {"value": pytest.approx(max(finite)),
                                                   "destroyed": False}
    assert stats["severity"]["catastrophic"] == 1
    assert json.dumps(results.jsonable(summary))  # the summary is plain JSON

    # Two of three destroyed: the median itself is a destroyed model.
    two = comparison.summarize(three[:1] * 2 + three[2:])
    assert two["statistics"]["perplexity_ratio"]["median_including_destroyed"] == {
        "value": None, "destroyed": True}
    rows = comparison.statistics_rows(two)
    assert rows[1]["median incl. destroyed"] == "∞" and rows[1]["n_destroyed"] == 2


def test_destroyed_in_memory_and_from_an_individual_condition():
    """Before JSON (ratio inf) and with a single weight and no combined record alike."""
    analysis = _analysis("x", _condition(0.0, 0.0, 5, destroyed=True), as_json=False,
                         combined=False)
    model = comparison.summarize_model(analysis)
    assert model["perplexity_destroyed"] and model["perplexity_ratio"] is None
    assert model["accuracy_drops"] == {"mmlu": pytest.approx(5 / 40)}


def test_plot_draws_destroyed_to_the_top_and_intervals(three, tmp_path):
    summary = comparison.summarize(three)
    fig = comparison.plot_model_comparison(summary, tmp_path / "c.png")
    ax_ppl, ax_acc = fig.axes[1], fig.axes[2]
    texts = [t.get_text() for t in ax_ppl.texts]
    severe = summary["models"][1]["perplexity_ratio"]
    noise = summary["models"][2]["perplexity_ratio"]
    assert texts == ["∞", f"{severe:,.2f}x", f"{noise:,.2f}x n.s."]
    destroyed_bar = ax_ppl.patches[0]
    assert destroyed_bar.get_y() == 1.0
    assert destroyed_bar.get_y() + destroyed_bar.get_height() == pytest.approx(ax_ppl.get_ylim()[1])
    assert len([c for c in ax_ppl.containers if isinstance(c, ErrorbarContainer)]) == 2
    # Accuracy drops: one point per model with its interval; the n.s. one hollow.
    assert len([c for c in ax_acc.containers if isinstance(c, ErrorbarContainer)]) == 3
    hollow = [line for line in ax_acc.lines if line.get_marker() == "o"
              and to_rgba(line.get_markerfacecolor()) == (1.0, 1.0, 1.0, 1.0)]
    significant = [m["accuracy_significant"]["mmlu"] for m in summary["models"]]
    assert len(hollow) == significant.count(False) == 1
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_restore_recovery_and_quantization_gap_per_model():
    """Notebooks 06/07's numbers reach the comparison row, straight from their JSON; a model
    without them gets nulls."""
    from sw_lib import quantization

    analysis = _analysis("x", _condition(math.log(3.0), 0.01, 12))
    points = [{"bits": b, "block_size": s, "variant": v, "perplexity_ratio": r}
              for b, s, v, r in [(4, 64, "naive", 1.1), (4, 64, "super_weight_aware", 1.05),
                                 (4, "tensor", "naive", 3.0),
                                 (4, "tensor", "super_weight_aware", 1.5)]]
    analysis["quantization"] = {"weights": {"claim": quantization.claim(points, [4],
                                                                        [64, "tensor"])}}
    analysis["mechanisms"] = {"restore": {"recovery": {"perplexity": 0.8,
                                                       "accuracy": {"mmlu": 0.5}}}}
    model = comparison.summarize_model(analysis)
    assert model["restore_recovery_perplexity"] == 0.8
    assert model["restore_recovery_accuracy"] == {"mmlu": 0.5}
    assert model["quantization_gap"] == {"4": pytest.approx(2.0)}  # 3.0 / 1.5
    assert model["quantization_largest_block"] == "tensor"
    (row,) = comparison.summary_rows({"models": [model]})
    assert row["INT4 naive/aware at block tensor"] == pytest.approx(2.0)
    bare = comparison.summarize_model(_analysis("y", _condition(0.0, 0.0, 0)))
    assert bare["restore_recovery_perplexity"] is None and bare["quantization_gap"] == {}

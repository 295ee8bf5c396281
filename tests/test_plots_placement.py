"""Where the super weights sit: labels of several weights per layer never overlap, stay inside
the figure, and every weight is either labelled or counted in a "+k more" note."""
from __future__ import annotations

import itertools

import matplotlib
import pytest
from matplotlib.text import Text

from sw_lib.plots import comparison
from sw_lib.plots import detection as detection_plots

matplotlib.use("Agg")


def _weight(layer, row, column, verdict):
    return {"layer": layer, "row": row, "column": column, "expert": None, "shared": False,
            "verdict": verdict, "perplexity_ratio": 1.5, "perplexity_ratio_interval": [1.2, 1.8],
            "control": {"max_perplexity_ratio": 1.01, "measured": True}}


def _detection(per_layer: dict[int, int], num_layers: int = 30) -> dict:
    """`per_layer[layer]` weights in that layer; verdicts cycle so every line gets some."""
    verdicts = itertools.cycle(["super_weight", "contributor", "no_effect", "no_effect"])
    candidates = [_weight(layer, 500 + k, 1000 + 37 * k, next(verdicts))
                  for layer, n in per_layer.items() for k in range(n)]
    return {"model": "synthetic", "num_layers": num_layers, "candidates": candidates,
            "config": {"spike_threshold": 50.0}, "iterations": [],
            "verdict_rule": {"super_ratio": 2.0}}


def _box(text, renderer):
    """The text's own box (an annotation's extent would include its leader line)."""
    return Text.get_window_extent(text, renderer)


def _overlaps(texts, renderer) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), _box(t, renderer)) for t in texts]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def _labels(ax, pattern: str):
    return [t for t in ax.texts if pattern in t.get_text() or "more" in t.get_text()]


@pytest.mark.parametrize("per_layer", [
    {2: 4, 3: 3, 11: 1},                          # several weights per layer, neighbours
    {0: 2, 27: 9, 28: 9, 29: 8},                  # the default model's 26 late spikes, at the edge
    {5: 40},                                      # far more than fit: a "+k more" note
])
def test_placement_labels_never_overlap_and_account_for_every_weight(per_layer):
    det = _detection(per_layer)
    fig = detection_plots.super_weight_distribution(det)
    fig.canvas.draw()  # as saving does: annotations take their final place
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = _labels(ax, "[")
    assert _overlaps(labels + [ax.title], renderer) == []
    figure_box = fig.get_window_extent(renderer)
    axes_box = ax.get_window_extent(renderer)
    for t in labels:  # inside the panel horizontally (not over the tick labels or the other panel)
        box = _box(t, renderer)
        assert axes_box.x0 - 0.5 <= box.x0 and box.x1 <= axes_box.x1 + 0.5, t.get_text()
        assert figure_box.y0 <= box.y0 and box.y1 <= figure_box.y1, t.get_text()
    shown = sum("more" not in t.get_text() for t in labels)
    noted = sum(int(t.get_text().split()[0][1:]) for t in labels if "more" in t.get_text())
    assert shown + noted == len(det["candidates"])
    if sum(per_layer.values()) <= 8:
        assert noted == 0  # few weights: every one labelled
    matplotlib.pyplot.close(fig)


def test_comparison_depth_labels_never_overlap():
    models = []
    for name, per_layer, n in (("a", {1: 3, 2: 2}, 24), ("b", {4: 5}, 18)):
        weights = [{"layer": layer, "row": 100 + k, "column": 7 * k, "relative_depth": layer / n}
                   for layer, count in per_layer.items() for k in range(count)]
        models.append({"slug": name, "status": "ok", "detection_ok": True,
                       "n_super_weights": len(weights), "super_weights": weights,
                       "perplexity_ratio": 2.0, "perplexity_destroyed": False,
                       "perplexity_ratio_ci95": [1.5, 2.5], "accuracy_drops": {},
                       "accuracy_drop_ci95": {}, "accuracy_significant": {}})
    fig = comparison.plot_model_comparison({"models": models})
    fig.canvas.draw()  # as saving does: annotations take their final place
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[3]
    labels = _labels(ax, "L")
    assert _overlaps(labels, renderer) == []
    shown = sum("more" not in t.get_text() for t in labels)
    noted = sum(int(t.get_text().split()[0][1:]) for t in labels if "more" in t.get_text())
    assert shown + noted == 10
    matplotlib.pyplot.close(fig)

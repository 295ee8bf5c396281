"""Figures of the ablation studies: impact comparison and combined analysis.

Both take the dicts `sw_lib.study.individual_ablation` / `combined_ablation` return (or the
same data read back from their JSON), return a matplotlib Figure, and save it when given a path.

What every panel shows: perplexity as the ratio modified / baseline on a log axis, a bar from
1 with its bootstrap 95% interval as an error bar; accuracy as the paired change (modified -
baseline) with its 95% interval. A change that is not significant is drawn hollow and grey and
labelled "n.s."; a grey band behind an accuracy point spans +-the minimum detectable change.
A destroyed model (perplexity no longer finite) is a hatched bar to the top of the axis, "∞".
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator

from . import save_figure

SEVERITY_COLORS = {"minimal": "#4c9a2a", "mild": "#a4c639", "moderate": "#f2b134",
                   "severe": "#e8702a", "catastrophic": "#c0392b", "improved": "#2e86c1",
                   "inconclusive": "#9e9e9e"}
NOT_SIGNIFICANT = "#9e9e9e"
MDE_COLOR = "#ececec"
BASELINE_COLOR = "#5b7fa6"
COMBINED_COLOR = "#6d2e8c"
METRIC_MARKERS = ("o", "s", "D", "^")


def _empty(message: str, path):
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    ax.set_axis_off()
    return save_figure(fig, path)


def _tasks(analyses: list[dict]) -> list[str]:
    tasks: list[str] = []
    for a in analyses:
        tasks += [t for t in (a.get("accuracy_impacts") or {}) if t not in tasks]
    return tasks


def _fmt_ratio(value: float) -> str:
    if value < 10:
        return f"{value:.3f}×"
    if value < 100:
        return f"{value:.1f}×"
    return f"{value:,.0f}×" if value < 1e6 else f"{value:.2e}×"


def _destroyed(impact: dict) -> bool:
    ratio = impact.get("perplexity_ratio")
    return (impact.get("modified_perplexity_finite") is False
            or (ratio is not None and not math.isfinite(ratio)))


# --- perplexity ------------------------------------------------------------------------------


def _ratio_panel(ax, labels: list[str], impacts: list[dict | None], title: str) -> None:
    """Perplexity ratio per condition: bars from 1 on a log axis with their bootstrap 95% CI."""
    x = np.arange(len(labels))
    finite = [(i, imp) for i, imp in enumerate(impacts) if imp and not _destroyed(imp)
              and imp.get("perplexity_ratio") is not None]
    extent = [1.0]
    for _, imp in finite:
        extent += [v for v in [imp["perplexity_ratio"], *(imp.get("ratio_ci95") or [])]
                   if v is not None and math.isfinite(v)]
    any_destroyed = any(imp and _destroyed(imp) for imp in impacts)
    log = any_destroyed or max(extent) / min(extent) >= 3
    if log:
        low, high = min(extent) / 1.6, max(extent) * 4
        ax.set_yscale("log")
    else:  # ratios close to 1: a linear axis shows the intervals
        pad = 0.2 * (max(extent) - min(extent)) + 0.01
        low, high = min(extent) - pad, max(extent) + 2 * pad
    ax.set_ylim(low, high)
    for i, imp in finite:
        ratio, ci, significant = imp["perplexity_ratio"], imp.get("ratio_ci95"), imp.get("significant")
        color = SEVERITY_COLORS.get(imp.get("impact_severity"), NOT_SIGNIFICANT)
        ax.bar(i, ratio - 1, bottom=1, width=0.6, color=color if significant else "white",
               edgecolor="black" if significant else NOT_SIGNIFICANT,
               linestyle="-" if significant else "--", linewidth=0.8)
        top = ratio
        if ci:
            ax.errorbar(i, ratio, yerr=[[ratio - ci[0]], [ci[1] - ratio]], fmt="none",
                        ecolor="black", capsize=4, linewidth=1)
            top = max(ratio, ci[1])
        text = _fmt_ratio(ratio) + ("" if significant else " n.s.")
        ax.annotate(text, (i, top), ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                    textcoords="offset points", color="black" if significant else "dimgray")
    for i, imp in enumerate(impacts):
        if imp and _destroyed(imp):  # no finite ratio: up to the top of the axis, marked ∞
            ax.bar(i, high - 1, bottom=1, width=0.6, color=SEVERITY_COLORS["catastrophic"],
                   hatch="xx", edgecolor="black", linewidth=0.8)
            ax.annotate("∞ (destroyed)", (i, high), ha="center", va="top", fontsize=8,
                        xytext=(0, -4), textcoords="offset points", color="white",
                        fontweight="bold", rotation=90)
        elif not imp or imp.get("perplexity_ratio") is None:
            ax.annotate("n/a", (i, 1), ha="center", va="bottom", fontsize=8)
    baseline = next((imp["baseline_perplexity"] for imp in impacts if imp), None)
    line_label = "baseline" + (f" (perplexity {baseline:.3g})" if baseline else "")
    ax.axhline(1.0, color=BASELINE_COLOR, linestyle="--", linewidth=1)
    if log:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10
                                                   else f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        if high / low < 1e3:  # a short range: ticks at 1-2-5 steps, else only 1 might show
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    handles = [Line2D([], [], color=BASELINE_COLOR, linestyle="--", label=line_label),
               Line2D([], [], color="black", marker="_", markersize=10, label="bootstrap 95% CI"),
               Patch(facecolor="white", edgecolor=NOT_SIGNIFICANT, linestyle="--",
                     label="n.s.: CI holds 1")]
    ax.legend(handles=handles, loc="upper left", fontsize=7)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("perplexity ratio, modified / baseline" + (" (log)" if log else ""))
    ax.set_title(title)


# --- accuracy --------------------------------------------------------------------------------


def _metric_names(impacts: list[dict | None]) -> list[str]:
    names: list[str] = []
    for imp in impacts:
        if imp:
            for name in [imp["primary_metric"], *imp.get("metrics", {})]:
                if name not in names:
                    names.append(name)
    return names


def _change_point(ax, x: float, metric: dict, marker: str, color: str | None = None,
                  label_value: bool = True) -> float:
    """One paired change with its 95% CI; hollow and "n.s." unless significant.
    Returns the top of its error bar."""
    d = metric["paired_difference"]
    change, ci, significant = d["mean"], d.get("ci95"), d.get("significant")
    # A condition's own colour when given (hollow when n.s.), else the verdict's (grey when n.s.).
    verdict_color = SEVERITY_COLORS.get(metric.get("impact_severity"), NOT_SIGNIFICANT)
    edge = color if color is not None else (verdict_color if significant else NOT_SIGNIFICANT)
    yerr = None if not ci else [[change - ci[0]], [ci[1] - change]]
    ax.errorbar(x, change, yerr=yerr, fmt=marker, color=edge, ecolor=edge, capsize=3,
                markersize=6, markerfacecolor=edge if significant else "white",
                markeredgecolor=edge, linewidth=1)
    top = ci[1] if ci else change
    lines = ([f"{change:+.2f}"] if label_value else []) + ([] if significant else ["n.s."])
    if lines:
        ax.annotate("\n".join(lines), (x, top), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points",
                    color="black" if significant else "dimgray")
    return top


def _change_axis(ax, extent: list[float]) -> None:
    """Symmetric around 0, with room for the labels above and the legend below."""
    reach = min(max([0.1] + [abs(v) for v in extent if v is not None and np.isfinite(v)]), 1.0)
    ax.set_ylim(-reach * 1.8, reach * 1.35)
    ax.axhline(0.0, color="black", linewidth=0.8)


def _accuracy_panel(ax, labels: list[str], impacts: list[dict | None], task: str) -> None:
    """Per condition, every metric's paired change with its 95% CI, over a band of ±MDE."""
    x = np.arange(len(labels))
    names = _metric_names(impacts)
    step = 0.6 / max(len(names), 1)
    extent = []
    for i, imp in enumerate(impacts):
        if not imp:
            continue
        mde = imp["paired_difference"].get("mde")
        if mde is not None:
            ax.bar(i, 2 * mde, bottom=-mde, width=0.8, color=MDE_COLOR, zorder=0)
            extent.append(mde)
        for j, name in enumerate(names):
            metric = imp["metrics"].get(name)
            if metric:
                offset = (j - (len(names) - 1) / 2) * step
                extent += metric["paired_difference"].get("ci95") or []
                _change_point(ax, i + offset, metric, METRIC_MARKERS[j % len(METRIC_MARKERS)])
    _change_axis(ax, extent)
    first = next((imp for imp in impacts if imp), None)
    n = first["n_samples"] if first else 0
    handles = [Line2D([], [], color="black", marker=METRIC_MARKERS[j % len(METRIC_MARKERS)],
                      linestyle="", label=name + (" (primary)" if first and
                                                  name == first["primary_metric"] else ""))
               for j, name in enumerate(names)]
    handles += [Line2D([], [], color=NOT_SIGNIFICANT, marker="o", markerfacecolor="white",
                       linestyle="", label="hollow: n.s. (p ≥ 0.05)"),
                Patch(color=MDE_COLOR, label="±MDE (power 0.8)")]
    ax.legend(handles=handles, loc="lower left", fontsize=7)
    base = ", ".join(f"{name} {first['metrics'][name]['baseline']['value']:.2f}"
                     for name in names if first and name in first["metrics"])
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("change of accuracy, modified - baseline")
    ax.set_title(f"{task} (n={n}; baseline {base})", fontsize=10)


# --- figures ---------------------------------------------------------------------------------


def impact_comparison(individual: dict, path: str | Path | None = None, title: str | None = None,
                      perplexity_title: str = "Perplexity with weight zeroed"):
    """Perplexity ratio per ablated unit and, per task, every metric's paired accuracy change,
    each with its 95% interval; changes that are not significant are hollow and "n.s."."""
    analyses = individual.get("analyses") or []
    if not analyses:
        return _empty("no super weights: nothing was ablated", path)
    labels = [a["label"] for a in analyses]
    has_ppl = any(a.get("perplexity_impact") for a in analyses)
    tasks = _tasks(analyses)
    panels = int(has_ppl) + len(tasks)
    if panels == 0:
        return _empty("perplexity and accuracy were both skipped", path)
    width = max(4.5, 0.8 * len(labels) + 3)
    ncols = min(3, panels)
    nrows = -(-panels // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.8 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[panels:]:
        ax.set_axis_off()
    if has_ppl:
        _ratio_panel(axes.pop(0), labels, [a.get("perplexity_impact") for a in analyses],
                     perplexity_title)
    for ax, task in zip(axes, tasks):
        _accuracy_panel(ax, labels, [(a.get("accuracy_impacts") or {}).get(task)
                                     for a in analyses], task)
    fig.suptitle(title or "Impact of zeroing each super weight", fontsize=13)
    fig.tight_layout()
    return save_figure(fig, path)


def combined_analysis(individual: dict, combined: dict, path: str | Path | None = None,
                      title: str | None = None):
    """Each weight zeroed alone vs all zeroed together: perplexity ratio, and per task the
    primary metric's paired change, each with its 95% interval."""
    analyses = individual.get("analyses") or []
    if not combined.get("super_weights"):
        return _empty("no super weights: nothing was ablated", path)
    conditions = analyses + [{**combined, "label": "all combined"}]
    labels = [c["label"] for c in conditions]
    shades = plt.get_cmap("Oranges")(np.linspace(0.35, 0.75, max(len(analyses), 1)))
    colors = list(shades[:len(analyses)]) + [COMBINED_COLOR]
    has_ppl = combined.get("perplexity_impact") is not None
    tasks = list(combined.get("accuracy_impacts") or {})
    panels = int(has_ppl) + int(bool(tasks))
    if panels == 0:
        return _empty("perplexity and accuracy were both skipped", path)
    fig, axes = plt.subplots(1, panels, squeeze=False,
                             figsize=(max(5.5, 0.9 * len(labels) + 3.5) * panels, 5.0))
    axes = list(axes[0])

    if has_ppl:
        _ratio_panel(axes.pop(0), labels, [c.get("perplexity_impact") for c in conditions],
                     "Perplexity ratio: each alone vs all together")

    if tasks:
        ax = axes.pop(0)
        step = 0.8 / len(conditions)
        extent = []
        for k, (condition, color) in enumerate(zip(conditions, colors)):
            for t, task in enumerate(tasks):
                impact = (condition.get("accuracy_impacts") or {}).get(task)
                if impact:
                    metric = impact["metrics"][impact["primary_metric"]]
                    extent += metric["paired_difference"].get("ci95") or []
                    _change_point(ax, t - 0.4 + step * (k + 0.5), metric, "o", color=color,
                                  label_value=k == len(conditions) - 1)
        _change_axis(ax, extent)
        names = [f"{t}\n({combined['accuracy_impacts'][t]['primary_metric']}, "
                 f"n={combined['accuracy_impacts'][t]['n_samples']})" for t in tasks]
        ax.set_xticks(np.arange(len(tasks)), names, fontsize=9)
        ax.set_ylabel("change of the primary metric, modified - baseline")
        ax.set_title("Accuracy: paired change with 95% CI (hollow: n.s.)")
        handles = [Line2D([], [], color=c, marker="o", linestyle="", label=label)
                   for label, c in zip(labels, colors)]
        ax.legend(handles=handles, fontsize=7, loc="lower left", ncol=1 + len(labels) // 8)
    fig.suptitle(title or "Combined ablation: each weight alone vs all together", fontsize=13)
    fig.tight_layout()
    return save_figure(fig, path)

"""Figures of the ablation studies: impact comparison and combined analysis.

Both take the dicts `sw_lib.study.individual_ablation` / `combined_ablation` return (or the
same data read back from their JSON), return a matplotlib Figure, and save it when given a path.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator

from . import save_figure

SEVERITY_COLORS = {"minimal": "#4c9a2a", "mild": "#a4c639", "moderate": "#f2b134",
                   "severe": "#e8702a", "catastrophic": "#c0392b"}
BASELINE_COLOR = "#5b7fa6"
COMBINED_COLOR = "#6d2e8c"


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


def _fmt_ppl(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if value < 100:
        return f"{value:.2f}"
    return f"{value:,.0f}" if value < 1e6 else f"{value:.2e}"


def _label_bars(ax, bars, texts, log: bool = False, tops=None):
    """Write `texts` above the bars (or above `tops`, e.g. the ends of error bars)."""
    tops = tops if tops is not None else [bar.get_height() for bar in bars]
    for bar, text, top in zip(bars, texts, tops):
        y = top * (1.08 if log else 1.0) if np.isfinite(top) else 0
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")


def _ppl_panel(ax, labels, values, colors, baseline: float | None, title: str):
    x = np.arange(len(labels))
    heights = [v if v is not None else np.nan for v in values]
    bars = ax.bar(x, heights, color=colors, edgecolor="black", linewidth=0.5)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ax.yaxis.set_major_formatter(plain)  # 200 rather than 2x10^2
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    if baseline is not None:
        ax.axhline(baseline, color=BASELINE_COLOR, linestyle="--", linewidth=1,
                   label=f"baseline {baseline:.3g}")
        ax.legend(loc="upper left", fontsize=8)
    _label_bars(ax, bars, [_fmt_ppl(v) for v in values], log=True)
    finite = [h for h in heights + [baseline] if h is not None and np.isfinite(h)]
    if finite:
        low, high = min(finite) / 2, max(finite) * 4
        ax.set_ylim(low, high)
        if high / low < 1e3:  # a short range: ticks at 1-2-5 steps, else only 100 might show
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title(title)


def impact_comparison(individual: dict, path: str | Path | None = None, title: str | None = None):
    """Perplexity per ablated unit (log bars with values) and one accuracy panel per task.

    Accuracy panels show baseline and modified primary metric side by side, with the paired
    95% CI of the change as an error bar on the modified bar and the drop as its label.
    """
    analyses = individual.get("analyses") or []
    if not analyses:
        return _empty("no super weights: nothing was ablated", path)
    labels = [a["label"] for a in analyses]
    has_ppl = any(a.get("perplexity_impact") for a in analyses)
    tasks = _tasks(analyses)
    panels = int(has_ppl) + len(tasks)
    if panels == 0:
        return _empty("perplexity and accuracy were both skipped", path)
    width = max(4.0, 0.7 * len(labels) + 2.5)
    ncols = min(3, panels)
    nrows = -(-panels // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.5 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[panels:]:
        ax.set_axis_off()

    if has_ppl:
        impacts = [a.get("perplexity_impact") or {} for a in analyses]
        values = [i.get("modified_perplexity") for i in impacts]
        colors = [SEVERITY_COLORS.get(i.get("impact_severity"), "grey") for i in impacts]
        baseline = next((i["baseline_perplexity"] for i in impacts if i), None)
        _ppl_panel(axes.pop(0), labels, values, colors, baseline, "Perplexity with weight zeroed")

    for ax, task in zip(axes, tasks):
        impacts = [(a.get("accuracy_impacts") or {}).get(task) for a in analyses]
        x = np.arange(len(labels))
        base = [i["baseline_accuracy"] if i else np.nan for i in impacts]
        mod = [i["modified_accuracy"] if i else np.nan for i in impacts]
        errors = np.array([_ci_halfwidths(i) for i in impacts]).T
        ax.bar(x - 0.2, base, 0.4, color=BASELINE_COLOR, label="baseline")
        bars = ax.bar(x + 0.2, mod, 0.4, yerr=errors, capsize=3, label="zeroed (paired 95% CI)",
                      color=[SEVERITY_COLORS.get(i["impact_severity"], "grey") if i else "grey"
                             for i in impacts])
        _label_bars(ax, bars, [_fmt_change(i) for i in impacts], tops=np.add(mod, errors[1]))
        metric = next((i["primary_metric"] for i in impacts if i), "accuracy")
        n = next((i["n_samples"] for i in impacts if i), 0)
        ax.set_ylim(0, 1.1)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{task} ({metric}, n={n})")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title or "Impact of zeroing each super weight", fontsize=13)
    fig.tight_layout()
    return save_figure(fig, path)


def _fmt_change(impact: dict | None) -> str:
    if not impact:
        return ""
    change = -impact["accuracy_drop"]
    return f"{change:+.2f}" if abs(change) >= 0.005 else "±0"


def _ci_halfwidths(impact: dict | None) -> tuple[float, float]:
    """Error bar of the modified accuracy: the paired 95% CI of the change, around it."""
    diff = (impact or {}).get("paired_difference") or {}
    if not diff.get("ci95"):
        return (0.0, 0.0)
    lo, hi = diff["ci95"]
    return (max(diff["mean"] - lo, 0.0), max(hi - diff["mean"], 0.0))


def combined_analysis(individual: dict, combined: dict, path: str | Path | None = None,
                      title: str | None = None):
    """Baseline vs each weight zeroed alone vs all zeroed together: perplexity and accuracy."""
    analyses = individual.get("analyses") or []
    if not combined.get("super_weights"):
        return _empty("no super weights: nothing was ablated", path)
    labels = ["baseline"] + [a["label"] for a in analyses] + ["all combined"]
    shades = plt.get_cmap("Oranges")(np.linspace(0.3, 0.7, max(len(analyses), 1)))
    colors = [BASELINE_COLOR] + list(shades[:len(analyses)]) + [COMBINED_COLOR]
    has_ppl = combined.get("perplexity_impact") is not None
    tasks = list(combined.get("accuracy_impacts") or {})
    panels = int(has_ppl) + int(bool(tasks))
    if panels == 0:
        return _empty("perplexity and accuracy were both skipped", path)
    fig, axes = plt.subplots(1, panels, squeeze=False,
                             figsize=(max(5.0, 0.8 * len(labels) + 3) * panels, 4.8))
    axes = list(axes[0])

    if has_ppl:
        cp = combined["perplexity_impact"]
        values = ([cp["baseline_perplexity"]]
                  + [(a.get("perplexity_impact") or {}).get("modified_perplexity") for a in analyses]
                  + [cp["modified_perplexity"]])
        _ppl_panel(axes.pop(0), labels, values, colors, None, "Perplexity")

    if tasks:
        ax = axes.pop(0)
        width = 0.8 / len(labels)
        x = np.arange(len(tasks))
        for k, (label, color) in enumerate(zip(labels, colors)):
            heights = []
            for task in tasks:
                ci = combined["accuracy_impacts"][task]
                if k == 0:
                    heights.append(ci["baseline_accuracy"])
                elif k == len(labels) - 1:
                    heights.append(ci["modified_accuracy"])
                else:
                    ai = (analyses[k - 1].get("accuracy_impacts") or {}).get(task)
                    heights.append(ai["modified_accuracy"] if ai else np.nan)
            bars = ax.bar(x - 0.4 + width * (k + 0.5), heights, width, color=color, label=label,
                          edgecolor="black", linewidth=0.3)
            if k in (0, len(labels) - 1):
                _label_bars(ax, bars, [f"{h:.2f}" for h in heights])
        metric_names = [combined["accuracy_impacts"][t]["primary_metric"] for t in tasks]
        ax.set_xticks(x, [f"{t}\n({m})" for t, m in zip(tasks, metric_names)], fontsize=9)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("accuracy (primary metric)")
        ax.set_title("Accuracy")
        ax.legend(fontsize=7, loc="upper right", ncol=1 + len(labels) // 8)
    fig.suptitle(title or "Combined ablation: baseline vs individual vs all together",
                 fontsize=13)
    fig.tight_layout()
    return save_figure(fig, path)

"""Figures of the mixture-of-experts analysis (notebook 04).

Each panel function draws on a given Axes from the analysis dict `sw_lib.moe.moe_analysis`
returns (or the same data read back from `moe_analysis_<ts>.json`); `moe_analysis_figure`
puts the four together and saves `plots/moe_analysis_<ts>.png`; `skip_figure` draws the skip
evaluation (super experts skipped against the control sets) as the ablation figures do
(`plots/super_experts_skipped_<ts>.png`).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from . import save_figure
from .ablation import impact_comparison

SUPER_COLOR = "#c0392b"
EXPERT_COLOR = "#5b7fa6"
SHARED_COLOR = "#6d2e8c"


def _notice(message: str, path):
    """A one-line figure where there is nothing to draw."""
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    ax.set_axis_off()
    return save_figure(fig, path)


def _layer_matrix(routing: list[dict], values) -> tuple[np.ndarray, list[int]]:
    """[MoE layer, expert] matrix of values(layer_record) and the layer numbers of its rows."""
    rows = [np.array([np.nan if v is None else v for v in values(r)], dtype=float)
            for r in routing]
    return np.vstack(rows), [r["layer"] for r in routing]


def _heatmap(ax, matrix: np.ndarray, layers: list[int], title: str, label: str):
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest",
                      vmin=0.0, vmax=max(float(np.nanmax(matrix)), 1e-9))
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers if len(layers) <= 32 else
                       [layer if i % 4 == 0 else "" for i, layer in enumerate(layers)])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label=label, fraction=0.046, pad=0.04)


def usage_heatmap(ax, result: dict):
    """p_active per layer and expert (tokens routed to the expert / tokens seen)."""
    matrix, layers = _layer_matrix(result["routing"], lambda r: r["p_active"])
    _heatmap(ax, matrix, layers, "Expert usage (p_active)", "p_active")


def sink_heatmap(ax, result: dict):
    """Share of texts whose first (attention-sink) token each expert receives."""
    matrix, layers = _layer_matrix(result["routing"], lambda r: r["sink"]["p_routed"])
    _heatmap(ax, matrix, layers, "Sink-token routing (first token of each text)",
             "share of texts")


def p_active_distribution(ax, result: dict):
    """Histogram of every expert's p_active, with the uniform share top_k / E and the floor."""
    values = np.concatenate([r["p_active"] for r in result["routing"]])
    ax.hist(values, bins=min(40, max(10, values.size // 4)), color=EXPERT_COLOR,
            edgecolor="black", linewidth=0.4)
    uniform = result["top_k"] / result["num_experts"]
    floor = result["config"]["p_active_floor"]
    ax.axvline(uniform, color="black", linestyle="--", label=f"uniform top_k/E = {uniform:.3g}")
    ax.axvline(floor, color=SUPER_COLOR, linestyle=":", label=f"p_active_floor = {floor:g}")
    ax.set_xlabel("p_active")
    ax.set_ylabel("experts (all layers)")
    ax.set_title("p_active distribution")
    ax.legend(fontsize=8)


def super_expert_maxima(ax, result: dict):
    """Each expert's max |down_proj output| by layer (log scale), with both super-expert
    thresholds (computed over the layers below the limit only) and the layer limit; flagged
    experts labelled."""
    maxima = [m for m in result["expert_maxima"] if m["tokens"] > 0]
    rule = result["super_experts"]
    routed = [m for m in maxima if not m["shared"]]
    shared = [m for m in maxima if m["shared"]]
    ax.scatter([m["layer"] for m in routed], [m["max_output"] for m in routed], s=12,
               color=EXPERT_COLOR, alpha=0.7, label="routed expert")
    if shared:
        ax.scatter([m["layer"] for m in shared], [m["max_output"] for m in shared], s=30,
                   marker="s", color=SHARED_COLOR, label="shared expert")
    for m in rule["flagged"]:
        name = f"L{m['layer']} " + ("shared" if m["shared"] else f"E{m['expert']}")
        ax.scatter([m["layer"]], [m["max_output"]], s=80, facecolors="none",
                   edgecolors=SUPER_COLOR, linewidths=1.5)
        ax.annotate(f"{name} (row {m['output_channel']})", (m["layer"], m["max_output"]),
                    xytext=(5, 3), textcoords="offset points", fontsize=8, color=SUPER_COLOR)
    if rule["percentile_threshold"] is not None:
        percentile, fraction = rule["percentile_threshold"], rule["global_threshold"]
        ax.axhline(percentile, color=SUPER_COLOR, linestyle="--",
                   label=f"{rule['percentile']:g}th percentile = {percentile:.3g}")
        ax.axhline(max(fraction, 1e-9), color="black", linestyle=":",
                   label=f"max // {rule['global_divisor']} = {fraction:.3g}")
    ax.axvspan(rule["layer_limit"] - 0.5, result["num_layers"] - 0.5, color="grey", alpha=0.12,
               label=f"layers >= round({rule['layer_fraction']:g} L) = {rule['layer_limit']} "
                     "(not in the population)")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, result["num_layers"] - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("max |down_proj output|")
    ax.set_title(f"Super experts: {len(rule['flagged'])} flagged")
    ax.legend(fontsize=7, loc="best")


def moe_analysis_figure(result: dict, path: str | Path | None = None):
    """The four panels of `plots/moe_analysis.png` (a one-line notice for a dense model)."""
    if not result.get("is_moe"):
        return _notice(f"{result.get('model', 'model')}: not a mixture-of-experts model", path)
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    usage_heatmap(axes[0, 0], result)
    p_active_distribution(axes[0, 1], result)
    sink_heatmap(axes[1, 0], result)
    super_expert_maxima(axes[1, 1], result)
    weights = result.get("expert_super_weights") or []
    fig.suptitle(f"{result['model']}: {len(result['moe_layers'])} MoE layers x "
                 f"{result['num_experts']} experts (top-{result['top_k']}), "
                 f"{len(weights)} expert super weight(s)", fontsize=13)
    fig.tight_layout()
    return save_figure(fig, path)


def skip_figure(result: dict, path: str | Path | None = None):
    """Perplexity ratio and paired accuracy changes with the super experts skipped and with
    each frequency-matched control set skipped (the ablation figures' panels)."""
    skipping = result.get("skip_evaluation")
    if not result.get("is_moe"):
        return _notice(f"{result.get('model', 'model')}: not a mixture-of-experts model", path)
    if skipping is None:
        flagged = (result.get("super_experts") or {}).get("flagged") or []
        return _notice("no super expert flagged: nothing skipped" if not flagged
                      else "perplexity and accuracy were both skipped", path)
    analyses = [skipping["super_experts"], *skipping["controls"]]
    return impact_comparison({"analyses": analyses}, path,
                             title=f"{result['model']}: super experts skipped vs "
                                   "frequency-matched control experts",
                             perplexity_title="Perplexity with experts skipped")

"""Figures of the detection: spikes per layer and iteration, and where the candidates sit."""
from __future__ import annotations

import matplotlib.pyplot as plt

from ..ablate import weight_label
from . import save_figure


def detection_iterations(detection: dict, path=None):
    """Per-layer max |input| and |output| of the down projection, one line per iteration."""
    threshold = detection["config"]["spike_threshold"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharex=True)
    cmap = plt.get_cmap("viridis", max(2, len(detection["iterations"])))
    for it in detection["iterations"]:
        layers = [m["layer"] for m in it["layers"]]
        new_layers = {c[0] for c in it["new"]}
        for ax, key in zip(axes, ("max_input", "max_output")):
            values = [max(m[key], 1e-6) for m in it["layers"]]
            ax.plot(layers, values, marker=".", color=cmap(it["iteration"]), alpha=0.85,
                    label=f"iteration {it['iteration']}")
            stars = [(l, v) for l, v in zip(layers, values) if l in new_layers]
            if stars:
                ax.scatter(*zip(*stars), marker="*", s=180, color=cmap(it["iteration"]),
                           edgecolor="black", zorder=5)
    for ax, title in zip(axes, ("max |input| of down_proj", "max |output| of down_proj")):
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("activation magnitude")
    axes[1].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(f"{detection['model']}: detection iterations (stars: layers with new candidates)")
    fig.tight_layout()
    return save_figure(fig, path)


def super_weight_distribution(detection: dict, path=None):
    """Left: input vs output spike per layer (first iteration). Right: loss ratio per candidate."""
    threshold = detection["config"]["spike_threshold"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    first = detection["iterations"][0]["layers"] if detection["iterations"] else []
    candidate_layers = {c["layer"] for c in detection["candidates"]}
    for m in first:
        hit = m["layer"] in candidate_layers
        left.scatter(max(m["max_input"], 1e-6), max(m["max_output"], 1e-6),
                     color="crimson" if hit else "steelblue", s=40 if hit else 18)
        left.annotate(str(m["layer"]), (max(m["max_input"], 1e-6), max(m["max_output"], 1e-6)),
                      fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.axvline(threshold, color="red", linestyle="--", linewidth=1)
    left.axhline(threshold, color="red", linestyle="--", linewidth=1)
    left.set(xscale="log", yscale="log", xlabel="max |input| (MLP channel = column)",
             ylabel="max |output| (residual channel = row)",
             title="spikes per layer (labels: layer; red: candidate layers)")
    left.grid(alpha=0.3)

    candidates = detection["candidates"]
    if candidates and candidates[0].get("loss_ratio") is not None:
        ratios = [c["loss_ratio"] for c in candidates]
        colors = ["crimson" if (c["confirmed"] or c.get("group_confirmed")) else "grey" for c in candidates]
        right.barh(range(len(candidates)), ratios, color=colors)
        right.set_yticks(range(len(candidates)), [weight_label(c) for c in candidates], fontsize=7)
        right.axvline(detection["config"]["confirm_ratio"], color="red", linestyle="--",
                      linewidth=1, label="confirmation ratio")
        right.axvline(1.0, color="black", linewidth=0.8)
        right.set_xlim(min(0.95, min(ratios) - 0.02), max(ratios) * 1.03)
        right.invert_yaxis()
        right.set_xlabel("loss ratio when zeroed alone (reference text)")
        right.set_title("causal confirmation (red: confirmed)")
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no candidates" if not candidates else "confirmation disabled",
                   ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    fig.suptitle(f"{detection['model']}: super weight candidates")
    fig.tight_layout()
    return save_figure(fig, path)

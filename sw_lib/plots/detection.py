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
            stars = [(layer, v) for layer, v in zip(layers, values) if layer in new_layers]
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


VERDICT_COLORS = {"super_weight": "crimson", "contributor": "darkorange", "no_effect": "grey"}


def _verdict_panel(ax, candidates: list[dict], rule: dict) -> None:
    """Perplexity ratio of each candidate zeroed alone (95% interval), its control's largest."""
    y = range(len(candidates))
    finite = lambda r: min(r, 1e12)  # noqa: E731  (a destroyed model's ratio can be inf)
    ratios = [finite(c["perplexity_ratio"]) for c in candidates]
    low = [max(r - finite(c["perplexity_ratio_interval"][0]), 0) for r, c in zip(ratios, candidates)]
    high = [max(finite(c["perplexity_ratio_interval"][1]) - r, 0) for r, c in zip(ratios, candidates)]
    ax.errorbar([r - 1 for r in ratios], y, xerr=[low, high], fmt="none", ecolor="black",
                elinewidth=0.8, capsize=2)
    ax.scatter([r - 1 for r in ratios], y, s=30, zorder=3,
               color=[VERDICT_COLORS[c["verdict"]] for c in candidates])
    controls = [(c["control"]["max_perplexity_ratio"] or 1.0) - 1 for c in candidates]
    ax.scatter(controls, y, marker="|", s=120, color="royalblue", zorder=4,
               label="control: largest ratio")
    ax.axvline(rule["super_ratio"] - 1, color="red", linestyle="--", linewidth=1,
               label=f"super_ratio {rule['super_ratio']:g}")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yticks(list(y), [weight_label(c) for c in candidates], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity ratio - 1, zeroed alone (reference text)")
    ax.set_title("verdicts: " + ", ".join(f"{v} ({color})" for v, color in VERDICT_COLORS.items()),
                 fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="lower right")


def super_weight_distribution(detection: dict, path=None):
    """Left: input vs output spike per layer (first iteration). Right: each candidate's
    perplexity ratio with its interval, its control's largest, and its verdict."""
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
    if candidates and detection.get("verdict_rule"):
        _verdict_panel(right, candidates, detection["verdict_rule"])
    else:
        right.text(0.5, 0.5, "no candidates" if not candidates else "no verdicts (confirm off)",
                   ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    fig.suptitle(f"{detection['model']}: super weight candidates")
    fig.tight_layout()
    return save_figure(fig, path)

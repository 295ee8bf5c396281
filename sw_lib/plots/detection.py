"""Figures of the detection: spikes per layer and iteration, and where the candidates sit.

`place_labels` lays out the labels of points that sit on one horizontal line (weights along
the layers) so that no two labels overlap: each goes to the lowest tier above its point where
it clears its neighbours, with a leader line, and labels that would need more tiers than the
room allows are counted in one "+k more" note instead of being drawn on top of each other.
"""
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
LABEL_PAD_PX = 4  # horizontal room between two labels of one tier


def place_labels(ax, points: list[tuple[float, float, str]], room_px: float,
                 fontsize: float = 7, color="black") -> list:
    """Label points (x, y, text) sharing one y above that line without overlaps.

    Labels are taken left to right, kept inside the axes horizontally; each goes to the
    lowest tier whose last label ends (with LABEL_PAD_PX) before it starts. Tiers are one text
    line apart and fill at most `room_px` pixels above the points. Labels that do not fit are
    counted in a "+k more" note in the top tier (kept for it), or in the title when there is
    room for one tier only. Returns the text artists drawn.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    line_pt = fontsize * 1.5
    px_per_pt = fig.dpi / 72
    tiers = max(1, int(room_px // (line_pt * px_per_pt)))
    usable = tiers - 1 if tiers > 1 else 1  # the top tier holds the note, if one is needed
    box = ax.get_window_extent(renderer)
    ends: list[float] = []  # right edge (px) of the last label of each tier
    drawn, left_out = [], 0
    for x, y, text in sorted(points, key=lambda p: p[0]):
        probe = ax.text(0, 0, text, fontsize=fontsize)
        width = probe.get_window_extent(renderer).width
        probe.remove()
        point = ax.transData.transform((x, y))[0]
        centre = min(max(point, box.x0 + width / 2), box.x1 - width / 2)
        left = centre - width / 2
        tier = next((i for i, end in enumerate(ends) if end + LABEL_PAD_PX <= left), len(ends))
        if tier >= usable:
            left_out += 1
            continue
        if tier == len(ends):
            ends.append(0.0)
        ends[tier] = centre + width / 2
        drawn.append(ax.annotate(
            text, (x, y), xytext=((centre - point) / px_per_pt, 4 + tier * line_pt),
            textcoords="offset points", ha="center", va="bottom", fontsize=fontsize, color=color,
            arrowprops=dict(arrowstyle="-", linewidth=0.4, color="grey")
            if tier or centre != point else None))
    if left_out and tiers > 1:
        drawn.append(ax.annotate(
            f"+{left_out} more", (1, points[0][1]), xycoords=("axes fraction", "data"),
            xytext=(-2, 4 + usable * line_pt), textcoords="offset points", ha="right",
            va="bottom", fontsize=fontsize, style="italic", color="grey"))
    elif left_out:
        ax.set_title(f"{ax.get_title()} (+{left_out} labels not shown)", fontsize=9)
    return drawn


def _placement_groups(detection: dict) -> list[tuple[str, list[dict]]]:
    candidates = detection["candidates"]
    groups = ([(v, [c for c in candidates if c.get("verdict") == v]) for v in VERDICT_COLORS]
              if detection.get("verdict_rule") else [("candidate", candidates)])
    return [(name, found) for name, found in groups if found]


def placement_panel(ax, detection: dict) -> None:
    """Where the candidates sit: one line per verdict across every layer, each weight a dot
    (the layer is the x position). Its labels come from `placement_labels`, once the figure's
    layout is final."""
    groups = _placement_groups(detection)
    num_layers = detection.get("num_layers") or 1 + max(c["layer"] for c in detection["candidates"])
    ax.set_xlim(-0.5, num_layers - 0.5)
    ax.set_ylim(-0.3, len(groups) - 0.1)  # the top line needs room for its labels too
    ax.set_yticks(range(len(groups)), [f"{name} ({len(found)})" for name, found in groups])
    ax.set_xlabel("layer")
    ax.set_title("where the candidates sit (labels: [row, column])", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    for i, (name, found) in enumerate(groups):
        ax.scatter([c["layer"] for c in found], [i] * len(found), s=30,
                   color=VERDICT_COLORS.get(name, "crimson"), zorder=3)


def placement_labels(ax, detection: dict) -> list:
    """Label every dot of `placement_panel` with [row, column], without overlaps (call after
    the figure's final layout: the room is measured in pixels)."""
    ax.figure.canvas.draw()
    row_px = abs(ax.transData.transform((0, 1))[1] - ax.transData.transform((0, 0))[1])
    drawn = []
    for i, (name, found) in enumerate(_placement_groups(detection)):
        drawn += place_labels(ax, [(c["layer"], i, f"[{c['row']}, {c['column']}]") for c in found],
                              room_px=row_px * 0.85 - 6, color=VERDICT_COLORS.get(name, "crimson"))
    return drawn


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
    """Left: where the candidates sit (layer, [row, column], by verdict; labels laid out
    without overlaps). Right: each candidate's perplexity ratio with its interval, its
    control's largest, and its verdict."""
    threshold = detection["config"]["spike_threshold"]
    candidates = detection["candidates"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(4.8, 0.22 * len(candidates) + 1.5)))
    if candidates:
        placement_panel(left, detection)
    else:
        left.text(0.5, 0.5, f"no layer's down projection spikes above {threshold:g}\n"
                  "on both its input and its output: no candidate", ha="center", va="center",
                  transform=left.transAxes)
        left.set_axis_off()

    if candidates and detection.get("verdict_rule"):
        _verdict_panel(right, candidates, detection["verdict_rule"])
    else:
        right.text(0.5, 0.5, "no candidates" if not candidates else "no verdicts (confirm off)",
                   ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    fig.suptitle(f"{detection['model']}: super weight candidates")
    fig.tight_layout()
    if candidates:
        placement_labels(left, detection)  # measured in the final layout
    return save_figure(fig, path)

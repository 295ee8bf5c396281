"""Figures of notebooks 06 and 07: the super activation trace, the scaling curve, stop words,
and perplexity against block size for naive and super-weight-aware weight quantization.

Each takes the part of the JSON document it draws (`mechanisms_<ts>.json`,
`quantization_<ts>.json`), returns a matplotlib Figure and saves it when given a path.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from . import save_figure

VARIANT_STYLE = {"naive": ("#c0392b", "o", "naive"),
                 "super_weight_aware": ("#2e86c1", "s", "super-weight-aware")}


def trace(trace_doc: dict, path: str | Path | None = None, title: str = ""):
    """|value| of each traced activation after every layer (log axis), writers marked."""
    activations = trace_doc["activations"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for a in activations:
        layers = [r["layer"] for r in a["layers"]]
        values = [max(abs(r["residual_out"]), 1e-3) for r in a["layers"]]
        label = f"channel {a['channel']}, token {a['token']} ({a['origin'].replace('_', ' ')})"
        (line,) = ax.plot(layers, values, marker=".", label=label)
        for w in a["writers"]:
            ax.annotate(w["sublayer"] + (" (post-norm)" if w["through_post_norm"] else ""),
                        (w["layer"], values[w["layer"]]), textcoords="offset points",
                        xytext=(4, 6), fontsize=7, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("layer (residual stream after it)")
    ax.set_ylabel("|activation|")
    ax.legend(fontsize=7)
    ax.set_title(title or "super activation trace", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def scaling(sweep: dict, path: str | Path | None = None, title: str = ""):
    """Perplexity against the factor the super weights are multiplied by (log axis)."""
    points = [p for p in sweep["points"] if p["perplexity"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([p["factor"] for p in points], [p["perplexity"] for p in points], marker="o")
    base = next((p["perplexity"] for p in points if p["factor"] == 1.0), None)
    if base is not None:
        ax.axhline(base, color="#9e9e9e", linestyle="--", linewidth=1, label="factor 1 (original)")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("scaling factor of the super weights")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(title or "scaling the super weights", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def stop_words(shift: dict, path: str | Path | None = None, title: str = ""):
    """Stop-word probability mass and top-1 share, original vs zeroed; the tokens that rose most."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    keys = [("stop_word_mass", "stop-word\nprobability mass"),
            ("top1_stop_share", "top-1 token is\na stop word")]
    for i, (key, _label) in enumerate(keys):
        for j, (cond, color) in enumerate((("original", "#5b7fa6"), ("zeroed", "#c0392b"))):
            left.bar(i + 0.38 * j, shift[cond][key], width=0.36, color=color,
                     label=("original" if cond == "original" else "super weights zeroed")
                     if i == 0 else None)
    left.set_xticks([0.19, 1.19], [k[1] for k in keys], fontsize=8)
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    rose = shift["rose_most"]
    names = [repr(r["token"]) for r in rose][::-1]
    right.barh(names, [r["zeroed"] - r["original"] for r in rose][::-1],
               color=["#c0392b" if r["stop_word"] else "#9e9e9e" for r in rose][::-1])
    right.set_xlabel("rise of mean probability when zeroed (red: stop word)", fontsize=8)
    right.tick_params(labelsize=7)
    fig.suptitle(title or "next-token distribution with the super weights zeroed", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def quantization(weights: dict, path: str | Path | None = None, title: str = ""):
    """Perplexity ratio to the unquantized model against block size, one panel per bit width."""
    bits = weights["bits"]
    fig, axes = plt.subplots(1, len(bits), figsize=(4.2 * len(bits), 3.6), squeeze=False)
    sizes = [str(s) for s in weights["block_sizes"]]
    for ax, b in zip(axes[0], bits):
        for variant, (color, marker, label) in VARIANT_STYLE.items():
            pts = {str(p["block_size"]): p["perplexity_ratio"] for p in weights["points"]
                   if p["bits"] == b and p["variant"] == variant}
            ys = [pts.get(s) for s in sizes]
            ax.plot(range(len(sizes)), [y if y is not None else float("nan") for y in ys],
                    marker=marker, color=color, label=label)
        ax.axhline(1.0, color="#9e9e9e", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_yscale("log")
        ax.set_xlabel("block size (elements)")
        ax.set_title(f"INT{b}", fontsize=10)
    axes[0][0].set_ylabel("perplexity / unquantized")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "round-to-nearest weight quantization", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)

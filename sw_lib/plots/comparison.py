"""Cross-model comparison: summary statistics over a run's models and the figure
`summary_plots/model_comparison.png`.

Input: the models' `analysis_<ts>.json` documents (`load_analyses`). `summarize` reduces each
to the numbers that compare across models -- super weight count, where the weights sit
(relative depth = layer / num_layers), rows or columns shared between a model's weights,
the combined ablation's perplexity ratio and accuracy drops with their intervals and
significance -- and adds statistics over the models. `plot_model_comparison` draws them; both
work for a single model.

A model whose perplexity is no longer finite after zeroing is *destroyed*: it is counted
(`n_models_destroyed`), ranked above every finite ratio in `median_including_destroyed`, kept
out of the means (which say over how many models they are), and drawn as a bar to the top of
the axis marked "∞" -- never dropped silently, never drawn at height 0.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from .. import results

MISSING_COLOR = "#bbbbbb"
BAR_COLOR = "#5b7fa6"
RATIO_COLOR = "#c0392b"


# --- reading -------------------------------------------------------------------------------------


def load_analyses(results_dir: str | Path, run_timestamp: str | None = None,
                  slugs: list[str] | None = None) -> list[dict]:
    """The analysis documents of one run (latest when no timestamp), in `slugs` order.

    A model folder without this run's analysis appears as {"slug", "status": "missing"}.
    """
    results_dir = Path(results_dir)
    ts = run_timestamp or results.latest_timestamp(results_dir)
    if ts is None:
        raise FileNotFoundError(f"No analysis runs found under '{results_dir}'")
    if not slugs:
        slugs = sorted(p.parent.parent.name for p in results_dir.glob(f"*/data/analysis_{ts}.json"))
    out = []
    for slug in slugs:
        doc = results.read_json_if_exists(results.ModelPaths(results_dir / slug, ts).analysis_json)
        out.append(doc if doc is not None else {"slug": slug, "model": slug, "status": "missing",
                                                "run_timestamp": ts})
    return out


# --- per model -----------------------------------------------------------------------------------


def destroyed(impact: dict | None) -> bool:
    """True when zeroing left the model without a finite perplexity. The JSON writes inf as
    null, so `modified_perplexity_finite: false` says it; in memory the ratio is inf or NaN."""
    impact = impact or {}
    ratio = impact.get("perplexity_ratio")
    return (impact.get("modified_perplexity_finite") is False
            or (ratio is not None and not math.isfinite(ratio)))


def _finite_ratio(impact: dict | None) -> float | None:
    return None if destroyed(impact) else (impact or {}).get("perplexity_ratio")


def _headline(analysis: dict) -> dict:
    """The ablation that compares across models: all weights together (the combined study),
    or the only individual condition when there is no combined result."""
    combined = analysis.get("combined") or {}
    individual = analysis.get("individual") or []
    if (not combined.get("perplexity_impact") and not combined.get("accuracy_impacts")
            and len(individual) == 1):
        return individual[0]
    return combined


def _drop_interval(impact: dict) -> list[float] | None:
    ci = (impact.get("paired_difference") or {}).get("ci95")
    return None if not ci else [-ci[1], -ci[0]]  # of baseline - modified


def shared_rows(weights: list[dict]) -> list[dict]:
    """Rows (residual channels) written by more than one super weight, any layers."""
    by_row: dict[int, list[dict]] = defaultdict(list)
    for w in weights:
        by_row[w["row"]].append(w)
    return [{"row": row, "count": len(ws), "layers": sorted({w["layer"] for w in ws})}
            for row, ws in sorted(by_row.items()) if len(ws) > 1]


def shared_columns(weights: list[dict]) -> list[dict]:
    """(layer, column) pairs -- one MLP channel -- holding more than one super weight."""
    by_column: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for w in weights:
        by_column[(w["layer"], w["column"])].append(w)
    return [{"layer": layer, "column": column, "count": len(ws),
             "rows": sorted(w["row"] for w in ws)}
            for (layer, column), ws in sorted(by_column.items()) if len(ws) > 1]


def summarize_model(analysis: dict) -> dict:
    """The comparable numbers of one model's analysis."""
    detection = analysis.get("detection") or {}
    individual = analysis.get("individual") or []
    num_layers = detection.get("num_layers") or analysis.get("num_layers")
    weights = []
    for w in detection.get("super_weights") or []:
        depth = w["layer"] / num_layers if num_layers else None
        weights.append({"layer": w["layer"], "row": w["row"], "column": w["column"],
                        "expert": w.get("expert"), "shared": bool(w.get("shared", False)),
                        "relative_depth": depth})
    individual_impacts = [a.get("perplexity_impact") for a in individual]
    individual_ratios = [r for r in map(_finite_ratio, individual_impacts) if r is not None]
    headline = _headline(analysis)
    ppl = headline.get("perplexity_impact") or {}
    impacts = headline.get("accuracy_impacts") or {}
    moe = analysis.get("moe") or {}
    flagged = (moe.get("super_experts") or {}).get("flagged") if isinstance(
        moe.get("super_experts"), dict) else moe.get("super_experts")
    return {
        "slug": analysis.get("slug"),
        "model": analysis.get("model"),
        "family": analysis.get("family"),
        "is_moe": analysis.get("is_moe"),
        "status": analysis.get("status"),
        "detection_ok": bool(detection),
        "num_layers": num_layers,
        "n_super_weights": len(weights),
        "super_weights": weights,
        "perplexity_ratio": _finite_ratio(ppl),  # null when destroyed: see perplexity_destroyed
        "perplexity_destroyed": destroyed(ppl),
        "perplexity_ratio_ci95": ppl.get("ratio_ci95"),
        "perplexity_significant": ppl.get("significant"),
        "baseline_perplexity": ppl.get("baseline_perplexity"),
        "modified_perplexity": ppl.get("modified_perplexity"),
        "impact_severity": ppl.get("impact_severity"),
        "max_individual_perplexity_ratio": max(individual_ratios) if individual_ratios else None,
        "n_individual_destroyed": sum(destroyed(i) for i in individual_impacts),
        "accuracy_drops": {t: i.get("accuracy_drop") for t, i in impacts.items()},
        "accuracy_drop_ci95": {t: _drop_interval(i) for t, i in impacts.items()},
        "accuracy_significant": {t: i.get("significant") for t, i in impacts.items()},
        "accuracy_severity": {t: i.get("impact_severity") for t, i in impacts.items()},
        "baseline_accuracy": {t: i.get("baseline_accuracy") for t, i in impacts.items()},
        "shared_rows": shared_rows(weights),
        "shared_columns": shared_columns(weights),
        "n_super_experts": len(flagged) if isinstance(flagged, list) else None,
        "n_expert_super_weights": (len(moe["expert_super_weights"])
                                   if isinstance(moe.get("expert_super_weights"), list) else None),
        **mechanism_numbers(analysis),
    }


def mechanism_numbers(analysis: dict) -> dict:
    """Notebook 06's restore recovery and notebook 07's quantization gap (null when absent):
    recovery = share of the zeroing's damage the restored super activation undoes; gap =
    naive / super-weight-aware perplexity ratio at the largest block, per bit width."""
    restore = (analysis.get("mechanisms") or {}).get("restore") or {}
    recovery = restore.get("recovery") or {}
    claim = ((analysis.get("quantization") or {}).get("weights") or {}).get("claim") or {}
    return {"restore_recovery_perplexity": recovery.get("perplexity"),
            "restore_recovery_accuracy": recovery.get("accuracy") or {},
            "quantization_gap": {bits: c.get("gap_at_largest_block") for bits, c in claim.items()},
            "quantization_largest_block": next((c.get("largest_block") for c in claim.values()),
                                               None)}


# --- across models -------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict | None:
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    a = np.array(values)
    return {"n": len(values), "mean": float(a.mean()), "std": float(a.std()),
            "median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def _median_including_destroyed(finite: list[float], n_destroyed: int) -> dict | None:
    """The median with destroyed models ranked above every finite ratio."""
    ranked = sorted(finite) + [math.inf] * n_destroyed
    if not ranked:
        return None
    middle = len(ranked) // 2
    value = ranked[middle] if len(ranked) % 2 else (ranked[middle - 1] + ranked[middle]) / 2
    return {"value": value if math.isfinite(value) else None, "destroyed": not math.isfinite(value)}


def _ratio_statistics(models: list[dict]) -> dict | None:
    """Statistics of the finite ratios (over `n` models), with the destroyed ones counted."""
    finite = [m["perplexity_ratio"] for m in models if m["perplexity_ratio"] is not None]
    n_destroyed = sum(m["perplexity_destroyed"] for m in models)
    if not finite and not n_destroyed:
        return None
    result = _stats(finite) or {"n": 0}
    if finite and all(r > 0 for r in finite):
        result["geometric_mean"] = float(np.exp(np.mean(np.log(finite))))
    result["n_destroyed"] = n_destroyed
    result["median_including_destroyed"] = _median_including_destroyed(finite, n_destroyed)
    return result


def summarize(analyses: list[dict]) -> dict:
    """{"models": [per-model summary], "statistics": {...}} for the complete JSON."""
    models = [summarize_model(a) for a in analyses]
    detected = [m for m in models if m["detection_ok"]]
    ratios = {m["slug"]: m["perplexity_ratio"] for m in models if m["perplexity_ratio"] is not None}
    tasks = sorted({t for m in models for t in m["accuracy_drops"]})
    statistics = {
        "n_models": len(models),
        "n_models_ok": sum(m["status"] == "ok" for m in models),
        "n_models_with_detection": len(detected),
        "n_models_with_super_weights": sum(m["n_super_weights"] > 0 for m in detected),
        "super_weight_counts": {m["slug"]: m["n_super_weights"] for m in detected},
        "super_weights": _stats([m["n_super_weights"] for m in detected]),
        "perplexity_ratios": ratios,  # finite ones; destroyed models are listed below
        "models_destroyed": [m["slug"] for m in models if m["perplexity_destroyed"]],
        "n_models_destroyed": sum(m["perplexity_destroyed"] for m in models),
        "perplexity_ratio": _ratio_statistics(models),
        "accuracy_drop": {t: _stats([m["accuracy_drops"].get(t) for m in models]) for t in tasks},
        "relative_depth": _stats([w["relative_depth"] for m in models
                                  for w in m["super_weights"]]),
        "layers": dict(Counter(w["layer"] for m in models for w in m["super_weights"])),
        "models_with_shared_rows": [m["slug"] for m in models if m["shared_rows"]],
        "models_with_shared_columns": [m["slug"] for m in models if m["shared_columns"]],
        "families": dict(Counter(m["family"] or "unknown" for m in models)),
        "severity": dict(Counter(m["impact_severity"] for m in models
                                 if m["impact_severity"] is not None)),
    }
    statistics["layers"] = {str(k): v for k, v in sorted(statistics["layers"].items())}
    return {"models": models, "statistics": statistics}


def summary_rows(summary: dict) -> list[dict]:
    """One flat row per model (for a pandas table in the notebook)."""
    rows = []
    for m in summary["models"]:
        row = {"model": m["slug"], "family": m["family"], "status": m["status"],
               "super weights": m["n_super_weights"] if m["detection_ok"] else None,
               "layers": sorted({w["layer"] for w in m["super_weights"]}),
               "relative depth": [round(w["relative_depth"], 3) for w in m["super_weights"]
                                  if w["relative_depth"] is not None],
               "perplexity ratio": "∞ (destroyed)" if m["perplexity_destroyed"]
               else m["perplexity_ratio"],
               "ratio 95% CI": _fmt_interval(m["perplexity_ratio_ci95"]),
               "perplexity verdict": m["impact_severity"],
               "shared rows": [r["row"] for r in m["shared_rows"]],
               "shared columns": [(c["layer"], c["column"]) for c in m["shared_columns"]],
               "restore recovery (perplexity)": m.get("restore_recovery_perplexity")}
        for bits, gap in (m.get("quantization_gap") or {}).items():
            row[f"INT{bits} naive/aware at block {m['quantization_largest_block']}"] = gap
        for t, d in m["accuracy_drops"].items():
            row[f"{t} drop"] = d
            row[f"{t} drop 95% CI"] = _fmt_interval(m["accuracy_drop_ci95"].get(t))
            row[f"{t} verdict"] = m["accuracy_severity"].get(t)
        rows.append(row)
    return rows


def _fmt_interval(ci) -> str:
    return "n/a" if not ci else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def statistics_rows(summary: dict) -> list[dict]:
    """The statistics across models as table rows (the notebook's second table)."""
    stats = summary["statistics"]
    ratio = stats["perplexity_ratio"] or {}
    median = ratio.get("median_including_destroyed") or {}
    ratio_row = {k: v for k, v in ratio.items() if k != "median_including_destroyed"}
    if median:
        ratio_row["median incl. destroyed"] = "∞" if median["destroyed"] else median["value"]
    named = ([("super weights per model", stats["super_weights"]),
              ("perplexity ratio (finite; destroyed counted apart)", ratio_row or None),
              ("relative depth of super weight layers", stats["relative_depth"])]
             + [(f"{task} accuracy drop", s) for task, s in stats["accuracy_drop"].items()])
    return [{"quantity": name, **(value or {})} for name, value in named]


# --- the figure ----------------------------------------------------------------------------------


def _bar_labels(ax, bars, texts):
    for bar, text in zip(bars, texts):
        height = bar.get_height()
        y = height if np.isfinite(height) else 0
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")


def _ratio_bars(ax, models: list[dict], x) -> None:
    """Perplexity ratio per model: bars from 1 (log axis) with their bootstrap 95% CI; hollow
    and "n.s." when the interval holds 1; a destroyed model up to the top of the axis, "∞"."""
    extent = [1.0]
    for m in models:
        if m["perplexity_ratio"] is not None:
            extent += [m["perplexity_ratio"], *(m.get("perplexity_ratio_ci95") or [])]
    low, high = min(0.8, min(extent) * 0.8), max(2.0, max(extent) * 3)
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    for i, m in zip(x, models):
        ratio, ci = m["perplexity_ratio"], m.get("perplexity_ratio_ci95")
        if m.get("perplexity_destroyed"):
            ax.bar(i, high - 1, bottom=1, color=RATIO_COLOR, hatch="xx", edgecolor="black",
                   linewidth=0.5)
            ax.annotate("∞", (i, high), ha="center", va="top", fontsize=14, color="white",
                        fontweight="bold", xytext=(0, -3), textcoords="offset points")
            continue
        if ratio is None:
            ax.annotate("n/a", (i, 1.0), ha="center", va="bottom", fontsize=8)
            continue
        faint = m.get("perplexity_significant") is False
        ax.bar(i, ratio - 1, bottom=1, color="white" if faint else RATIO_COLOR,
               edgecolor=MISSING_COLOR if faint else "black", linestyle="--" if faint else "-",
               linewidth=0.8)
        top = ratio
        if ci:
            ax.errorbar(i, ratio, yerr=[[ratio - ci[0]], [ci[1] - ratio]], fmt="none",
                        ecolor="black", capsize=4)
            top = max(ratio, ci[1])
        ax.annotate(f"{ratio:,.2f}x" + (" n.s." if faint else ""), (i, top), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    if high / low < 1e3:  # a short range: ticks at 1-2-5 steps
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.set_title("Perplexity ratio, all super weights zeroed (95% CI)")
    ax.set_ylabel("modified / baseline perplexity")


def _drop_points(ax, models: list[dict], x) -> None:
    """Accuracy drop per model and task with its paired 95% CI; hollow and "n.s." unless
    significant."""
    tasks = sorted({t for m in models for t in m["accuracy_drops"]})
    if not tasks:
        ax.text(0.5, 0.5, "no accuracy results", ha="center", va="center",
                transform=ax.transAxes)
    step = 0.8 / max(len(tasks), 1)
    colors = plt.get_cmap("tab10").colors
    for k, task in enumerate(tasks):
        color = colors[k % len(colors)]
        for i, m in zip(x, models):
            drop = m["accuracy_drops"].get(task)
            if drop is None:
                continue
            ci = (m.get("accuracy_drop_ci95") or {}).get(task)
            significant = (m.get("accuracy_significant") or {}).get(task) is not False
            at = i - 0.4 + step * (k + 0.5)
            ax.errorbar(at, drop, yerr=None if not ci else [[drop - ci[0]], [ci[1] - drop]],
                        fmt="o", color=color, capsize=3, markerfacecolor=color if significant
                        else "white", label=task if i == x[0] else None)
            top = ci[1] if ci else drop
            ax.annotate(f"{drop:+.2f}" + ("" if significant else " n.s."), (at, top),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
    ax.axhline(0.0, color="black", linewidth=0.8)
    if tasks:
        ax.legend(fontsize=8, ncol=min(len(tasks), 3))
    ax.set_title("Accuracy drop, all super weights zeroed (95% CI; hollow: n.s.)")
    ax.set_ylabel("baseline - modified accuracy")


def _depth_labels(ax, models: list[dict]) -> None:
    """`L{layer} r{row} c{column}` above each weight of each model's line, laid out by
    plots.detection.place_labels (several weights in one layer stack, never overlap)."""
    from .detection import place_labels

    ax.figure.canvas.draw()
    row_px = abs(ax.transData.transform((0, 1))[1] - ax.transData.transform((0, 0))[1])
    for i, m in enumerate(models):
        points = [(w["relative_depth"], i, f"L{w['layer']} r{w['row']} c{w['column']}")
                  for w in m["super_weights"] if w["relative_depth"] is not None]
        if points:
            place_labels(ax, points, room_px=row_px * 0.85 - 8)


def plot_model_comparison(summary: dict, path: str | Path | None = None, title: str | None = None):
    """Four panels: super weight count, perplexity ratio (log scale, destroyed models marked
    "∞"), accuracy drop per task (both with 95% intervals), and where the super weights sit
    (relative depth). Saved to `path` when given."""
    models = summary["models"]
    names = [m["slug"] for m in models]
    x = np.arange(len(models))
    width = max(9.0, 1.2 * len(models) + 6)
    fig, axes = plt.subplots(2, 2, figsize=(width, 8.5))
    (ax_count, ax_ppl), (ax_acc, ax_depth) = axes

    counts = [m["n_super_weights"] if m["detection_ok"] else np.nan for m in models]
    colors = [BAR_COLOR if m["detection_ok"] else MISSING_COLOR for m in models]
    bars = ax_count.bar(x, np.nan_to_num(counts), color=colors, edgecolor="black", linewidth=0.5)
    _bar_labels(ax_count, bars, [str(int(c)) if np.isfinite(c) else m["status"] or "n/a"
                                 for c, m in zip(counts, models)])
    ax_count.set_title("Super weights per model")
    ax_count.set_ylabel("count")
    ax_count.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_count.set_ylim(0, max([1.0] + [c for c in counts if np.isfinite(c)]) * 1.25)

    _ratio_bars(ax_ppl, models, x)
    _drop_points(ax_acc, models, x)

    for i, m in enumerate(models):
        depths = [w["relative_depth"] for w in m["super_weights"] if w["relative_depth"] is not None]
        ax_depth.scatter(depths, [i] * len(depths), s=60, color=BAR_COLOR, edgecolor="black",
                         zorder=3)
    ax_depth.set_xlim(-0.02, 1.02)
    ax_depth.set_ylim(-0.7, len(models) - 0.3)
    ax_depth.set_yticks(x, names)
    ax_depth.set_xlabel("relative depth (layer / num_layers)")
    ax_depth.set_title("Where the super weights sit")
    ax_depth.grid(axis="x", alpha=0.3)

    for ax in (ax_count, ax_ppl, ax_acc):
        ax.set_xticks(x, names, rotation=20 if len(models) > 3 else 0, ha="right"
                      if len(models) > 3 else "center")
    fig.suptitle(title or f"Cross-model comparison ({len(models)} model"
                 f"{'s' if len(models) != 1 else ''})")
    fig.tight_layout()
    _depth_labels(ax_depth, models)  # in the final layout, so labels never overlap
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig


# --- the complete JSON ---------------------------------------------------------------------------


def save_comparison(results_dir: str | Path, run_timestamp: str, summary: dict,
                    slugs: list[str]) -> Path:
    """Put `summary` into the run's complete_analysis_<ts>.json (created when missing)."""
    from .. import config as config_mod

    run = results.RunPaths(Path(results_dir), run_timestamp)
    complete = results.read_json_if_exists(run.complete_json)
    if complete is None:
        first = next((a for a in load_analyses(results_dir, run_timestamp, slugs)
                      if a.get("config")), None)
        config = first["config"] if first else config_mod.defaults()
        complete = results.assemble_complete(run, slugs, config)
    complete["comparison"] = summary
    if run.comparison_png.is_file():
        complete["files"]["comparison_plot"] = str(run.comparison_png.relative_to(run.results_dir))
    return results.write_json(run.complete_json, complete)

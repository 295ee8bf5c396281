"""Cross-model comparison: summary statistics over a run's models and the figure
`summary_plots/model_comparison.png`.

Input: the models' `analysis_<ts>.json` documents (`load_analyses`). `summarize` reduces each
to the numbers that compare across models -- super weight count, where the weights sit
(relative depth = layer / num_layers), rows or columns shared between a model's weights,
the combined ablation's perplexity ratio and accuracy drops -- and adds statistics over the
models. `plot_model_comparison` draws them; both work for a single model.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

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


def _impact_ratio(ablation: dict | None) -> float | None:
    impact = (ablation or {}).get("perplexity_impact") or {}
    return impact.get("perplexity_ratio")


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
    combined = analysis.get("combined")
    individual = analysis.get("individual") or []
    num_layers = detection.get("num_layers") or analysis.get("num_layers")
    weights = []
    for w in detection.get("super_weights") or []:
        depth = w["layer"] / num_layers if num_layers else None
        weights.append({"layer": w["layer"], "row": w["row"], "column": w["column"],
                        "expert": w.get("expert"), "shared": bool(w.get("shared", False)),
                        "relative_depth": depth})
    individual_ratios = [r for r in map(_impact_ratio, individual) if r is not None]
    ratio = _impact_ratio(combined)
    impacts = (combined or {}).get("accuracy_impacts") or {}
    if ratio is None and len(individual) == 1:  # one weight: alone == all together
        ratio = individual_ratios[0] if individual_ratios else None
        impacts = individual[0].get("accuracy_impacts") or {}
    ppl = (combined or {}).get("perplexity_impact") or {}
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
        "perplexity_ratio": ratio,
        "baseline_perplexity": ppl.get("baseline_perplexity"),
        "modified_perplexity": ppl.get("modified_perplexity"),
        "impact_severity": ppl.get("impact_severity"),
        "max_individual_perplexity_ratio": max(individual_ratios) if individual_ratios else None,
        "accuracy_drops": {t: i.get("accuracy_drop") for t, i in impacts.items()},
        "baseline_accuracy": {t: i.get("baseline_accuracy") for t, i in impacts.items()},
        "shared_rows": shared_rows(weights),
        "shared_columns": shared_columns(weights),
        "n_super_experts": len(flagged) if isinstance(flagged, list) else None,
        "n_expert_super_weights": (len(moe["expert_super_weights"])
                                   if isinstance(moe.get("expert_super_weights"), list) else None),
    }


# --- across models -------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict | None:
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    a = np.array(values)
    return {"n": len(values), "mean": float(a.mean()), "std": float(a.std()),
            "median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def summarize(analyses: list[dict]) -> dict:
    """{"models": [per-model summary], "statistics": {...}} for the complete JSON."""
    models = [summarize_model(a) for a in analyses]
    detected = [m for m in models if m["detection_ok"]]
    ratios = {m["slug"]: m["perplexity_ratio"] for m in models if m["perplexity_ratio"] is not None}
    tasks = sorted({t for m in models for t in m["accuracy_drops"]})
    ratio_stats = _stats(list(ratios.values()))
    if ratio_stats and all(r > 0 for r in ratios.values()):
        ratio_stats["geometric_mean"] = float(np.exp(np.mean(np.log(list(ratios.values())))))
    statistics = {
        "n_models": len(models),
        "n_models_ok": sum(m["status"] == "ok" for m in models),
        "n_models_with_detection": len(detected),
        "n_models_with_super_weights": sum(m["n_super_weights"] > 0 for m in detected),
        "super_weight_counts": {m["slug"]: m["n_super_weights"] for m in detected},
        "super_weights": _stats([m["n_super_weights"] for m in detected]),
        "perplexity_ratios": ratios,
        "perplexity_ratio": ratio_stats,
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
               "perplexity ratio": m["perplexity_ratio"],
               "shared rows": [r["row"] for r in m["shared_rows"]],
               "shared columns": [(c["layer"], c["column"]) for c in m["shared_columns"]]}
        row.update({f"{t} drop": d for t, d in m["accuracy_drops"].items()})
        rows.append(row)
    return rows


# --- the figure ----------------------------------------------------------------------------------


def _bar_labels(ax, bars, texts):
    for bar, text in zip(bars, texts):
        height = bar.get_height()
        y = height if np.isfinite(height) else 0
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")


def plot_model_comparison(summary: dict, path: str | Path | None = None, title: str | None = None):
    """Four panels: super weight count, perplexity ratio (log scale), accuracy drop per task,
    and where the super weights sit (relative depth). Saved to `path` when given."""
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

    ratios = [m["perplexity_ratio"] if m["perplexity_ratio"] is not None else np.nan
              for m in models]
    bars = ax_ppl.bar(x, [r if np.isfinite(r) else 0 for r in ratios], color=RATIO_COLOR,
                      edgecolor="black", linewidth=0.5)
    _bar_labels(ax_ppl, bars, [f"{r:,.2f}x" if np.isfinite(r) else "n/a" for r in ratios])
    ax_ppl.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    finite = [r for r in ratios if np.isfinite(r) and r > 0]
    if finite:
        ax_ppl.set_yscale("log")
        ax_ppl.set_ylim(min(0.8, min(finite) * 0.8), max(finite) * 3)
    ax_ppl.set_title("Perplexity ratio, all super weights zeroed")
    ax_ppl.set_ylabel("modified / baseline perplexity")

    tasks = sorted({t for m in models for t in m["accuracy_drops"]})
    if tasks:
        step = 0.8 / len(tasks)
        for i, task in enumerate(tasks):
            drops = [m["accuracy_drops"].get(task) for m in models]
            bars = ax_acc.bar(x - 0.4 + step * (i + 0.5),
                              [d if d is not None else np.nan for d in drops], step, label=task,
                              edgecolor="black", linewidth=0.5)
            _bar_labels(ax_acc, bars, [f"{d:+.2f}" if d is not None else "" for d in drops])
        ax_acc.axhline(0.0, color="black", linewidth=0.8)
        ax_acc.legend(fontsize=8, ncol=min(len(tasks), 3))
    else:
        ax_acc.text(0.5, 0.5, "no accuracy results", ha="center", va="center",
                    transform=ax_acc.transAxes)
    ax_acc.set_title("Accuracy drop, all super weights zeroed")
    ax_acc.set_ylabel("baseline - modified accuracy")

    for i, m in enumerate(models):
        depths = [w["relative_depth"] for w in m["super_weights"] if w["relative_depth"] is not None]
        ax_depth.scatter(depths, [i] * len(depths), s=60, color=BAR_COLOR, edgecolor="black",
                         zorder=3)
        for w in m["super_weights"]:
            if w["relative_depth"] is not None:
                ax_depth.annotate(f"L{w['layer']} r{w['row']} c{w['column']}",
                                  (w["relative_depth"], i), fontsize=7, xytext=(0, 6),
                                  textcoords="offset points", ha="center")
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

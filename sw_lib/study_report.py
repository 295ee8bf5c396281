"""What the ablation notebooks show and write: tables of a study's impacts and its JSON files.

Tables (`perplexity_rows`, `accuracy_tables`, `resolution_notes`) are lists of flat dicts with
numbers rounded for reading, one pandas DataFrame each in the notebooks. The JSON documents
(`write_individual`: `data/individual_analyses/sw_<i>_analysis_<ts>.json` and
`data/individual_summary_<ts>.json`, schema `sw-individual/2`; `write_combined`:
`data/combined_analysis_<ts>.json`, schema `sw-combined/2`) carry the full impacts of
`sw_lib.study`. Version 2: severities are given only where a change is significant (else
"inconclusive"), accuracy intervals are Tango score intervals, and every metric of a task has
its own test, interval and verdict.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from . import results
from .evaluate import stats

INDIVIDUAL_SCHEMA = "sw-individual/2"
COMBINED_SCHEMA = "sw-combined/2"


# --- formatting ----------------------------------------------------------------------------


def _sig(value: float | None, digits: int = 3):
    """`value` to `digits` significant digits (None and non-finite values pass through)."""
    if value is None or not math.isfinite(value) or value == 0:
        return value
    return round(value, max(digits - 1 - int(math.floor(math.log10(abs(value)))), 0))


def _interval(ci: Sequence[float] | None, signed: bool = False, digits: int = 3) -> str:
    if ci is None:
        return "n/a"
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# --- tables --------------------------------------------------------------------------------


def perplexity_rows(analyses: Sequence[dict]) -> list[dict]:
    """One row per condition: perplexities, ratio with its bootstrap 95% CI, significance,
    severity ("inconclusive" unless significant; a destroyed model reads "inf" / catastrophic)."""
    rows = []
    for a in analyses:
        p = a.get("perplexity_impact")
        if not p:
            continue
        finite = p.get("modified_perplexity_finite", True)
        rows.append({"condition": a["label"], "baseline": _sig(p["baseline_perplexity"], 4),
                     "modified": _sig(p["modified_perplexity"], 4) if finite else math.inf,
                     "ratio": _sig(p["perplexity_ratio"], 4) if finite else math.inf,
                     "ratio 95% CI": _interval(p.get("ratio_ci95")),
                     "windows": p.get("n_windows"), "significant": p.get("significant"),
                     "severity": p["impact_severity"]})
    return rows


def _metric_columns(name: str, m: dict) -> dict:
    d = m["paired_difference"]
    mde = d.get("mde")
    return {f"{name}": f"{m['baseline']['value']:.3f} → {m['modified']['value']:.3f}",
            f"{name} change [95% CI]": f"{d['mean']:+.3f} {_interval(d['ci95'], signed=True)}",
            f"{name} p": _p(d["p_value"]),
            f"{name} ↑/↓": f"{d['n_improved']}/{d['n_worsened']}",
            f"{name} MDE": "n/a" if mde is None else f"±{mde:.3f}",
            f"{name} verdict": m["impact_severity"]}


def accuracy_tables(analyses: Sequence[dict]) -> dict[str, list[dict]]:
    """Per task, one row per condition with every metric side by side (acc, acc_norm, ...):
    baseline → modified, paired change [Tango 95% CI], exact McNemar p, improved/worsened
    items, minimum detectable change, and the verdict (a severity only where p < alpha)."""
    tables: dict[str, list[dict]] = {}
    for a in analyses:
        for task, impact in (a.get("accuracy_impacts") or {}).items():
            row = {"condition": a["label"], "n": impact["n_samples"],
                   "primary": impact["primary_metric"]}
            for name, m in impact["metrics"].items():
                row.update(_metric_columns(name, m))
            tables.setdefault(task, []).append(row)
    return tables


def accuracy_rows(analyses: Sequence[dict]) -> list[dict]:
    """`accuracy_tables` as one list, a `task` column first."""
    return [{"task": task, **row} for task, rows in accuracy_tables(analyses).items()
            for row in rows]


def resolution_notes(analyses: Sequence[dict]) -> list[str]:
    """One line per task: the smallest change the study resolves reliably at its n (the
    minimum detectable change of the primary metric, over the conditions), e.g.
    "hellaswag (n=40): a change of acc_norm smaller than ±0.190 cannot be reliably resolved ..."."""
    found: dict[str, dict] = {}
    for a in analyses:
        for task, impact in (a.get("accuracy_impacts") or {}).items():
            entry = found.setdefault(task, {"n": impact["n_samples"],
                                            "metric": impact["primary_metric"], "mde": []})
            entry["mde"].append(impact["paired_difference"].get("mde"))
    lines = []
    for task, entry in found.items():
        mdes = [m for m in entry["mde"] if m is not None]
        head = f"{task} (n={entry['n']}): "
        if not mdes:
            lines.append(head + "too few items for the exact test to call any change significant")
            continue
        low, high = min(mdes), max(mdes)
        size = f"±{low:.3f}" if high - low < 0.0005 else f"±{low:.3f} to ±{high:.3f}"
        lines.append(head + f"a change of {entry['metric']} smaller than {size} cannot be "
                     f"reliably resolved (the exact McNemar test at alpha {stats.ALPHA:g} finds "
                     f"it less than {stats.POWER:.0%} of the time, at the observed share of "
                     "items that changed)")
    return lines


# --- JSON documents ------------------------------------------------------------------------


def header(schema: str, *, model: str, fingerprint: str | None, run_timestamp: str,
           detection_json, settings: dict, unit: str, **extra) -> dict:
    """What every JSON file of notebooks 02 and 03 starts with (`extra` is added as is)."""
    return {"schema": schema, "model": model, "fingerprint": fingerprint,
            "run_timestamp": run_timestamp,
            "detection_json": None if detection_json is None else str(detection_json),
            "settings": settings, "unit": unit, **extra}


def _metric_summary(m: dict) -> dict:
    d = m["paired_difference"]
    return {"baseline": m["baseline"]["value"], "modified": m["modified"]["value"],
            "change": d["mean"], "ci95": d["ci95"], "p_value": d["p_value"],
            "n_improved": d["n_improved"], "n_worsened": d["n_worsened"], "mde": d.get("mde"),
            "significant": d["significant"], "impact_severity": m["impact_severity"]}


def impact_summary(analysis: dict) -> dict:
    """The headline of one analysis: perplexity ratio with its interval and verdict, and per
    task every metric's change, interval, p-value and verdict (acc and acc_norm side by side)."""
    p = analysis.get("perplexity_impact") or {}
    return {
        "perplexity_ratio": p.get("perplexity_ratio"),
        "perplexity_ratio_ci95": p.get("ratio_ci95"),
        "modified_perplexity_finite": p.get("modified_perplexity_finite"),
        "perplexity_significant": p.get("significant"),
        "perplexity_severity": p.get("impact_severity"),
        "accuracy": {task: {"primary_metric": i["primary_metric"], "n": i["n_samples"],
                            "metrics": {name: _metric_summary(m)
                                        for name, m in i["metrics"].items()}}
                     for task, i in (analysis.get("accuracy_impacts") or {}).items()},
        "accuracy_drops": {task: i["accuracy_drop"]
                           for task, i in (analysis.get("accuracy_impacts") or {}).items()},
    }


def individual_summary_path(output_dir: str | Path, run_timestamp: str) -> Path:
    return results.ModelPaths(Path(output_dir), run_timestamp).individual_summary_json


def write_individual(output_dir: str | Path, individual: dict, weights: Sequence[dict],
                     **head) -> dict:
    """Write one JSON per ablated unit and the individual summary; return their paths.

    `individual` is what `study.individual_ablation` returns; `head` the `header` fields
    (model, fingerprint, run_timestamp, detection_json, settings, unit, any extra).
    Returns {"files": [Path, ...], "summary": Path}.
    """
    out = Path(output_dir)
    paths = results.ModelPaths(out, head["run_timestamp"])
    top = header(INDIVIDUAL_SCHEMA, **head)
    files = []
    for a in individual["analyses"]:
        document = {**top, **a, "baseline": individual["baseline"]}
        files.append(results.write_json(paths.individual_json(a["index"]), document))
    summary = {**top, "super_weights": list(weights), "baseline": individual["baseline"],
               "analyses": [{"index": a["index"], "label": a["label"],
                             "file": str(f.relative_to(out)), **impact_summary(a)}
                            for a, f in zip(individual["analyses"], files)]}
    path = results.write_json(individual_summary_path(out, head["run_timestamp"]), summary)
    return {"files": files, "summary": path}


def combined_document(individual: dict, combined: dict, **head) -> dict:
    """The combined record: the combined impacts, and each individual condition's impacts."""
    units = []
    for a in individual.get("analyses") or []:
        unit = {"index": a["index"], "label": a["label"]}
        if "super_weight" in a:
            unit["super_weight"] = a["super_weight"]
        else:
            unit["super_weights"] = a["super_weights"]
        unit.update(perplexity_impact=a["perplexity_impact"],
                    accuracy_impacts=a["accuracy_impacts"])
        units.append(unit)
    return {**header(COMBINED_SCHEMA, **head), **combined, "individual": units}


def write_combined(output_dir: str | Path, individual: dict, combined: dict, **head) -> Path:
    """Write `data/combined_analysis_<ts>.json` (see `combined_document`)."""
    paths = results.ModelPaths(Path(output_dir), head["run_timestamp"])
    return results.write_json(paths.combined_json, combined_document(individual, combined, **head))

"""Individual and combined ablation studies: what zeroing super weights does to the model.

A study evaluates a handful of *conditions* on the same items: the unmodified model (the
baseline, computed once per study; the evaluation cache makes it once per model), each super
weight (or each (layer, column) group) zeroed alone, and all of them zeroed together. Each
ablated condition is compared with the baseline in the original script's JSON vocabulary:

- `perplexity_impact`: baseline/modified WikiText-2 perplexity, ratio, increase, severity;
- `accuracy_impacts[task]`: baseline/modified primary metric, drop, ratio, severity, every
  metric of the task, and the paired difference (modified - baseline) over the same items with
  its standard error and 95% confidence interval.

Severity follows the original script: perplexity ratio >10 catastrophic, >3 severe, >1.5
moderate, >1.1 mild; accuracy drop >0.5 catastrophic, >0.2 severe, >0.1 moderate, >0.05 mild.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .ablate import WeightEdit, weight_label, zero
from .evaluate.stats import mean_stderr

PERPLEXITY_SEVERITY = ((10.0, "catastrophic"), (3.0, "severe"), (1.5, "moderate"), (1.1, "mild"))
ACCURACY_SEVERITY = ((0.5, "catastrophic"), (0.2, "severe"), (0.1, "moderate"), (0.05, "mild"))
Z95 = 1.959963984540054  # two-sided 95% normal quantile
UNITS = ("weight", "group")

# --- severity ------------------------------------------------------------------------------


def _severity(value: float, thresholds) -> str:
    # Rounding keeps exact boundary cases exact: 0.4 - 0.3 is 0.10000000000000003 in floats.
    value = round(float(value), 9)
    for bound, name in thresholds:
        if value > bound:
            return name
    return "minimal"


def perplexity_severity(ratio: float | None) -> str:
    """Severity of a perplexity ratio (modified / baseline); a broken model is catastrophic."""
    if ratio is None or not math.isfinite(ratio):
        return "catastrophic"
    return _severity(ratio, PERPLEXITY_SEVERITY)


def accuracy_severity(drop: float) -> str:
    """Severity of an accuracy drop (baseline - modified, as a fraction)."""
    return _severity(drop, ACCURACY_SEVERITY)


# --- labels --------------------------------------------------------------------------------


def group_label(group: dict) -> str:
    """`L{layer} [{row1}/{row2}, {column}]` for a (layer, column) group of rows."""
    rows = "/".join(str(r) for r in group["rows"])
    return weight_label({**group, "row": rows})


# --- conditions ----------------------------------------------------------------------------


def _coordinate(w: dict) -> dict:
    return {"layer": int(w["layer"]), "row": int(w["row"]), "column": int(w["column"]),
            "expert": None if w.get("expert") is None else int(w["expert"]),
            "shared": bool(w.get("shared", False))}


def ablation_units(weights: Sequence[dict], unit: str = "weight") -> list[dict]:
    """What each individual condition zeroes: one weight, or one (layer, column) group.

    Returns [{"label", "super_weights": [weight, ...], "edits": [WeightEdit, ...]}], with a
    "group" {layer, column, expert, shared, rows} entry when unit == "group".
    """
    if unit not in UNITS:
        raise ValueError(f"unknown ablation unit '{unit}'; use one of {', '.join(UNITS)}")
    if unit == "weight":
        return [{"label": weight_label(w), "super_weights": [w], "edits": zero([w])}
                for w in weights]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for w in weights:  # insertion order = detection order, so group i is stable
        c = _coordinate(w)
        groups[(c["layer"], c["expert"], c["shared"], c["column"])].append(w)
    units = []
    for (layer, expert, shared, column), members in groups.items():
        group = {"layer": layer, "column": column, "expert": expert, "shared": shared,
                 "rows": sorted(int(w["row"]) for w in members)}
        units.append({"label": group_label(group), "group": group, "super_weights": members,
                      "edits": zero(members)})
    return units


# --- settings and evaluation of one condition ----------------------------------------------


@dataclass
class StudySettings:
    """What to evaluate per condition (the `evaluation` section of params/default.yaml)."""

    perplexity_samples: int | None = 2  # WikiText-2 windows (None: all)
    seq_len: int = 2048
    accuracy_samples: int | None = 40  # first N items per task (None: all)
    accuracy_tasks: tuple[str, ...] = ("hellaswag", "arc_easy", "mmlu", "gsm8k")
    mmlu_shots: int = 0
    gsm8k_samples: int | None = 4
    batch_size: int = 32
    token_budget: int = 1024
    skip_perplexity: bool = False
    skip_accuracy: bool = False
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.accuracy_tasks, str):
            self.accuracy_tasks = (self.accuracy_tasks,)
        self.accuracy_tasks = tuple(self.accuracy_tasks)

    @classmethod
    def from_dict(cls, params: dict) -> "StudySettings":
        """Build from a params mapping; keys this class does not know are ignored."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def samples_for(self, task: str) -> int | None:
        return self.gsm8k_samples if task == "gsm8k" else self.accuracy_samples

    def shots_for(self, task: str) -> int | None:
        return self.mmlu_shots if task == "mmlu" else None

    def tasks(self) -> tuple[str, ...]:
        return () if self.skip_accuracy else self.accuracy_tasks

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy_tasks"] = list(self.accuracy_tasks)
        return d


@dataclass
class Condition:
    """One evaluated condition: the edits applied and the raw evaluation results."""

    edits: list[WeightEdit]
    perplexity: dict | None = None
    tasks: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


def evaluate_condition(lm, edits: Iterable[WeightEdit], settings: StudySettings,
                       cache=None, keep_layers: Iterable[int] = ()) -> Condition:
    """Perplexity and every task under `edits` (the evaluation engine restores the weights).

    keep_layers: for the baseline, the layers later conditions will edit; the engine keeps
    their inputs so those conditions start at the edited layer instead of layer 0.
    """
    keep_layers = tuple(keep_layers)
    from . import evaluate

    edits = list(edits)
    start = time.perf_counter()
    condition = Condition(edits=edits)
    if not settings.skip_perplexity:
        condition.perplexity = evaluate.perplexity(
            lm, edits=edits, seq_len=settings.seq_len, n_windows=settings.perplexity_samples,
            batch_size=settings.batch_size, cache=cache, progress=settings.progress,
            keep_layers=keep_layers, token_budget=settings.token_budget)
    for task in settings.tasks():
        condition.tasks[task] = evaluate.run_task(
            lm, task, n_samples=settings.samples_for(task), edits=edits, cache=cache,
            shots=settings.shots_for(task), batch_size=settings.batch_size,
            progress=settings.progress, keep_layers=keep_layers, token_budget=settings.token_budget)
    condition.seconds = time.perf_counter() - start
    return condition


# --- comparing a condition with the baseline -----------------------------------------------


def paired_difference(baseline_items: Sequence[dict], modified_items: Sequence[dict],
                      metric: str) -> dict:
    """Mean of (modified - baseline) per item for `metric`, with stderr and a 95% normal CI.

    Items are paired by `doc_id`; both sides must hold the same items. The standard error is
    the sample standard deviation of the differences over sqrt(n) (None when n < 2).
    """
    base = {item["doc_id"]: item["correct"][metric] for item in baseline_items}
    mod = {item["doc_id"]: item["correct"][metric] for item in modified_items}
    if base.keys() != mod.keys():
        missing = sorted(base.keys() ^ mod.keys(), key=str)[:5]
        raise ValueError(f"paired difference of '{metric}': baseline and modified results hold "
                         f"different items (e.g. doc_id {missing}); evaluate both on the same items")
    ids = list(base)
    d = np.array([float(mod[i]) - float(base[i]) for i in ids], dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else None
    stderr = mean_stderr(d.tolist())  # the engine's (lm-eval's) standard error of the mean
    ci = [mean - Z95 * stderr, mean + Z95 * stderr] if stderr is not None else None
    return {"metric": metric, "mean": mean, "stderr": stderr, "ci95": ci, "n": n,
            "n_improved": int((d > 0).sum()), "n_worsened": int((d < 0).sum())}


def perplexity_impact(baseline: dict, modified: dict) -> dict:
    """Compare two perplexity results (the original script's `perplexity_impact`)."""
    base, mod = float(baseline["perplexity"]), float(modified["perplexity"])
    ratio = mod / base if base > 0 else None
    return {"baseline_perplexity": base, "modified_perplexity": mod, "perplexity_ratio": ratio,
            "perplexity_increase": mod - base, "impact_severity": perplexity_severity(ratio),
            "dataset_info": baseline.get("dataset_info"),
            "n_windows": baseline.get("n_windows"), "n_tokens": baseline.get("n_tokens")}


def accuracy_impact(baseline: dict, modified: dict) -> dict:
    """Compare two results of one task (the original script's `accuracy_impacts[task]`)."""
    primary = baseline["primary_metric"]
    base = float(baseline["metrics"][primary]["value"])
    mod = float(modified["metrics"][primary]["value"])
    drop = base - mod
    metrics = {}
    for name, value in baseline["metrics"].items():
        metrics[name] = {"baseline": value, "modified": modified["metrics"][name],
                         "paired_difference": paired_difference(
                             baseline["per_item"], modified["per_item"], name)}
    return {"primary_metric": primary, "baseline_accuracy": base, "modified_accuracy": mod,
            "accuracy_drop": drop, "accuracy_ratio": mod / base if base > 0 else None,
            "impact_severity": accuracy_severity(drop), "n_samples": baseline["n_samples"],
            "n_requested": baseline.get("n_requested"), "capped": baseline.get("capped"),
            "metrics": metrics, "paired_difference": metrics[primary]["paired_difference"]}


def compare(baseline: Condition, modified: Condition) -> dict:
    """`perplexity_impact` (None when skipped) and `accuracy_impacts` of `modified`."""
    ppl = (perplexity_impact(baseline.perplexity, modified.perplexity)
           if baseline.perplexity is not None and modified.perplexity is not None else None)
    acc = {task: accuracy_impact(baseline.tasks[task], modified.tasks[task])
           for task in baseline.tasks if task in modified.tasks}
    return {"perplexity_impact": ppl, "accuracy_impacts": acc}


def summarize(condition: Condition) -> dict:
    """The headline numbers of one condition (for JSON and tables)."""
    ppl = condition.perplexity
    return {"edits": [e.to_dict() for e in condition.edits],
            "perplexity": None if ppl is None else ppl["perplexity"],
            "dataset_info": None if ppl is None else ppl.get("dataset_info"),
            "accuracy": {task: r["metrics"][r["primary_metric"]]["value"]
                         for task, r in condition.tasks.items()},
            "primary_metric": {task: r["primary_metric"] for task, r in condition.tasks.items()},
            "seconds": condition.seconds}


# --- studies -------------------------------------------------------------------------------


def _progress(iterable, settings: StudySettings, desc: str):
    if not settings.progress:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, unit="condition")


def _analysis(unit: dict, baseline: Condition, condition: Condition, index: int) -> dict:
    analysis = {"index": index, "label": unit["label"]}
    if "group" in unit:
        analysis["group"] = unit["group"]
        analysis["super_weights"] = unit["super_weights"]
    else:
        analysis["super_weight"] = unit["super_weights"][0]
    analysis.update(compare(baseline, condition))
    analysis["seconds"] = condition.seconds
    return analysis


def individual_ablation(lm, weights: Sequence[dict], settings: StudySettings | None = None,
                        unit: str = "weight", cache=None,
                        baseline: Condition | None = None) -> dict:
    """Zero each super weight (or (layer, column) group) alone and compare with the baseline.

    Returns {"unit", "settings", "baseline": summary, "analyses": [analysis, ...]}, one
    analysis per unit in detection order; pass `baseline` to reuse one already evaluated.
    """
    settings = settings or StudySettings()
    units = ablation_units(weights, unit)
    if baseline is None:
        baseline = evaluate_condition(lm, [], settings, cache,
                                      keep_layers={w["layer"] for w in weights})
    analyses = [_analysis(u, baseline, evaluate_condition(lm, u["edits"], settings, cache), i)
                for i, u in enumerate(_progress(units, settings, "individual ablation"))]
    return {"unit": unit, "settings": settings.to_dict(), "baseline": summarize(baseline),
            "analyses": analyses}


def combined_ablation(lm, weights: Sequence[dict], settings: StudySettings | None = None,
                      cache=None, baseline: Condition | None = None) -> dict:
    """Zero every super weight together and compare with the baseline.

    Returns {"label", "super_weights", "settings", "baseline": summary, "perplexity_impact",
    "accuracy_impacts", "seconds"}; with no weights the impacts are None / {}.
    """
    settings = settings or StudySettings()
    weights = list(weights)
    result = {"label": "all " + str(len(weights)) + " super weights", "super_weights": weights,
              "settings": settings.to_dict(), "baseline": None, "perplexity_impact": None,
              "accuracy_impacts": {}, "seconds": 0.0}
    if not weights:
        return result
    if baseline is None:
        baseline = evaluate_condition(lm, [], settings, cache,
                                      keep_layers=[min(w["layer"] for w in weights)])
    condition = evaluate_condition(lm, zero(weights), settings, cache)
    result.update(compare(baseline, condition))
    result["baseline"] = summarize(baseline)
    result["seconds"] = condition.seconds
    return result


# --- detection input and tables (what the notebooks show) ----------------------------------


def find_detection_json(output_dir: str | Path, detection_json: str | Path | None = None) -> Path:
    """The detection JSON to read: the given path, else the latest data/detection_*.json."""
    if detection_json:
        path = Path(detection_json)
        if not path.is_file():
            raise FileNotFoundError(f"detection JSON '{path}' does not exist; run "
                                    "01_detection first or pass detection_json=None")
        return path
    found = sorted(Path(output_dir, "data").glob("detection_*.json"))
    if not found:
        raise FileNotFoundError(f"no data/detection_*.json under '{output_dir}'; run "
                                "01_detection first or pass detection_json")
    return found[-1]  # timestamps YYYYMMDD_HHMMSS sort in time order


def load_detection(path: str | Path) -> dict:
    """Read a detection JSON; its `super_weights` list is what the studies ablate."""
    detection = json.loads(Path(path).read_text())
    if not isinstance(detection.get("super_weights"), list):
        raise ValueError(f"'{path}' is not a detection JSON: it has no 'super_weights' list")
    return detection


def perplexity_rows(analyses: Sequence[dict]) -> list[dict]:
    """One row per condition: label, baseline/modified perplexity, ratio, severity."""
    rows = []
    for a in analyses:
        p = a.get("perplexity_impact")
        if p:
            rows.append({"condition": a["label"], "baseline": p["baseline_perplexity"],
                         "modified": p["modified_perplexity"], "ratio": p["perplexity_ratio"],
                         "severity": p["impact_severity"]})
    return rows


def accuracy_rows(analyses: Sequence[dict]) -> list[dict]:
    """One row per (condition, task): primary metric before/after, drop, paired 95% CI."""
    rows = []
    for a in analyses:
        for task, i in (a.get("accuracy_impacts") or {}).items():
            ci = i["paired_difference"]["ci95"]
            rows.append({"condition": a["label"], "task": task, "metric": i["primary_metric"],
                         "n": i["n_samples"], "baseline": i["baseline_accuracy"],
                         "modified": i["modified_accuracy"], "drop": i["accuracy_drop"],
                         "change 95% CI": "n/a" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]",
                         "severity": i["impact_severity"]})
    return rows

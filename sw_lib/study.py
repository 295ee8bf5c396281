"""Individual and combined ablation studies: what zeroing super weights does to the model.

A study evaluates a handful of *conditions* on the same items: the unmodified model (the
baseline, computed once per study; the evaluation cache makes it once per model), each super
weight (or each (layer, column) group) zeroed alone, and all of them zeroed together. A
condition equal to one already evaluated against the same baseline (all weights together when
there is only one) is evaluated once, cache or not. Each ablated condition is compared with the
baseline in the original script's JSON vocabulary, with the statistics of `evaluate.stats`:

- `perplexity_impact`: baseline/modified WikiText-2 perplexity, their ratio with a paired
  bootstrap interval over windows, `significant` (the interval excludes 1) and a severity;
  a non-finite modified perplexity is a destroyed model (`modified_perplexity_finite: false`).
- `accuracy_impacts[task]`: per metric of the task (acc and acc_norm side by side where the
  task has both), baseline, modified and the paired change over the same items with its
  Tango score interval, exact McNemar p-value, discordant counts and minimum detectable
  change; the primary metric's numbers are repeated at the top.

A severity label is given only where the change is significant (p < ALPHA, or the perplexity
interval excludes 1); otherwise the label is "inconclusive", and a significant improvement is
"improved". Severity thresholds follow the original script: perplexity ratio >10
catastrophic, >3 severe, >1.5 moderate, >1.1 mild; accuracy drop >0.5 catastrophic, >0.2
severe, >0.1 moderate, >0.05 mild (else "minimal").
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from . import ablate, config, memory
from .ablate import WeightEdit, weight_label, zero
from .evaluate import stats

PERPLEXITY_SEVERITY = ((10.0, "catastrophic"), (3.0, "severe"), (1.5, "moderate"), (1.1, "mild"))
ACCURACY_SEVERITY = ((0.5, "catastrophic"), (0.2, "severe"), (0.1, "moderate"), (0.05, "mild"))
ALPHA = stats.ALPHA  # significance level of every accuracy test (exact McNemar, two-sided)
CONFIDENCE = 0.95  # of every interval
INCONCLUSIVE, IMPROVED = "inconclusive", "improved"
ACCURACY_INTERVAL = "Tango score interval (paired difference of proportions)"
ACCURACY_TEST = "exact McNemar (two-sided binomial on the discordant items)"
PERPLEXITY_INTERVAL = (f"paired percentile bootstrap over windows ({stats.BOOTSTRAP_RESAMPLES} "
                       f"resamples, seed {stats.BOOTSTRAP_SEED})")
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


def perplexity_verdict(ratio: float | None, finite: bool, significant: bool) -> str:
    """Severity of a perplexity change, given only where it is significant."""
    if not finite:
        return "catastrophic"  # the model no longer gives a finite perplexity
    if not significant:
        return INCONCLUSIVE
    return IMPROVED if ratio < 1 else perplexity_severity(ratio)


def accuracy_verdict(change: float, significant: bool) -> str:
    """Severity of a paired accuracy change (modified - baseline), given only where significant."""
    if not significant:
        return INCONCLUSIVE
    return IMPROVED if change > 0 else accuracy_severity(-change)


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


def _default(name: str):
    return lambda: config.default(f"evaluation.{name}")


@dataclass
class StudySettings:
    """What to evaluate per condition (the `evaluation` section of params/default.yaml)."""

    # Defaults are read from params/default.yaml (the one source of defaults).
    perplexity_samples: int | None = field(default_factory=_default("perplexity_samples"))
    seq_len: int = field(default_factory=_default("seq_len"))
    accuracy_samples: int | None = field(default_factory=_default("accuracy_samples"))
    accuracy_tasks: tuple[str, ...] = field(default_factory=_default("accuracy_tasks"))
    mmlu_shots: int = field(default_factory=_default("mmlu_shots"))
    gsm8k_samples: int | None = field(default_factory=_default("gsm8k_samples"))
    batch_size: int = field(default_factory=_default("batch_size"))
    token_budget: int | str = field(default_factory=_default("token_budget"))  # or "auto"
    skip_perplexity: bool = field(default_factory=_default("skip_perplexity"))
    skip_accuracy: bool = field(default_factory=_default("skip_accuracy"))
    progress: bool = True
    # The tokens per forward pass the run used (token_budget, "auto" resolved): set by for_model.
    resolved_token_budget: int | None = None

    def __post_init__(self):
        if isinstance(self.accuracy_tasks, str):
            self.accuracy_tasks = (self.accuracy_tasks,)
        self.accuracy_tasks = tuple(self.accuracy_tasks)
        self.token_budget = memory.check_token_budget(self.token_budget)

    def for_model(self, lm) -> "StudySettings":
        """These settings with the token budget resolved for the loaded model `lm` (an integer
        stays as it is; "auto" is sized to the memory free after loading, once per model), so
        the results record the number used. Without a model (nothing to evaluate): unchanged."""
        if lm is None:
            return self
        return replace(self, resolved_token_budget=memory.resolve_token_budget(
            lm, self.token_budget))

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

    def key(self) -> dict:
        """What decides the evaluated items and numbers (progress bars do not)."""
        return {k: v for k, v in self.to_dict().items() if k != "progress"}


@dataclass
class Condition:
    """One evaluated condition: the edits applied and the raw evaluation results."""

    edits: list[WeightEdit]
    perplexity: dict | None = None
    tasks: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict | None = None  # StudySettings.key() it was evaluated with
    # For a baseline: the conditions evaluated against it, by (edits, settings), so a study
    # never evaluates one twice, even without the on-disk cache.
    evaluated: dict = field(default_factory=dict, repr=False, compare=False)


def evaluate_condition(lm, edits: Iterable[WeightEdit], settings: StudySettings,
                       cache=None, keep_layers: Iterable[int] = ()) -> Condition:
    """Perplexity and every task under `edits` (the evaluation engine restores the weights).

    keep_layers: for the baseline, the layers later conditions will edit; the engine keeps
    their inputs so those conditions start at the edited layer instead of layer 0.
    """
    keep_layers = tuple(keep_layers)
    from . import evaluate

    settings = settings.for_model(lm)
    edits = list(edits)
    start = time.perf_counter()
    condition = Condition(edits=edits, settings=settings.key())
    if not settings.skip_perplexity:
        condition.perplexity = evaluate.perplexity(
            lm, edits=edits, seq_len=settings.seq_len, n_windows=settings.perplexity_samples,
            batch_size=settings.batch_size, cache=cache, progress=settings.progress,
            keep_layers=keep_layers, token_budget=settings.resolved_token_budget)
    for task in settings.tasks():
        condition.tasks[task] = evaluate.run_task(
            lm, task, n_samples=settings.samples_for(task), edits=edits, cache=cache,
            shots=settings.shots_for(task), batch_size=settings.batch_size,
            progress=settings.progress, keep_layers=keep_layers,
            token_budget=settings.resolved_token_budget)
    condition.seconds = time.perf_counter() - start
    return condition


def _condition_key(edits: Sequence[WeightEdit], settings: StudySettings) -> tuple:
    return ablate.edits_key(edits), json.dumps(settings.key(), sort_keys=True)


def evaluate_against(lm, baseline: Condition, edits: Iterable[WeightEdit],
                     settings: StudySettings, cache=None) -> Condition:
    """The condition `edits` on the baseline's items, evaluated at most once per baseline."""
    edits, settings = list(edits), settings.for_model(lm)
    key = _condition_key(edits, settings)
    if key not in baseline.evaluated:
        baseline.evaluated[key] = evaluate_condition(lm, edits, settings, cache)
    return baseline.evaluated[key]


# --- comparing a condition with the baseline -----------------------------------------------


def _outcomes(items: Sequence[dict], metric: str) -> dict:
    return {item["doc_id"]: item["correct"][metric] for item in items}


def paired_difference(baseline_items: Sequence[dict], modified_items: Sequence[dict],
                      metric: str, alpha: float = ALPHA) -> dict:
    """The paired change (modified - baseline) of a 0/1 `metric` over the same items.

    Items are paired by `doc_id`; both sides must hold the same items. Returns the mean change
    with its standard error, its CONFIDENCE interval (Tango's score interval, right at small
    n and never [0, 0]), the exact McNemar p-value, the improved/worsened counts, the minimum
    detectable change at this n and discordance (exact test at `alpha`, power 0.8) and
    `significant` (p < alpha).
    """
    base, mod = _outcomes(baseline_items, metric), _outcomes(modified_items, metric)
    if base.keys() != mod.keys():
        missing = sorted(base.keys() ^ mod.keys(), key=str)[:5]
        raise ValueError(f"paired difference of '{metric}': baseline and modified results hold "
                         f"different items (e.g. doc_id {missing}); evaluate both on the same items")
    ids = list(base)
    n = len(ids)
    improved, worsened = stats.discordant_counts([base[i] for i in ids], [mod[i] for i in ids])
    d = [float(mod[i]) - float(base[i]) for i in ids]
    p_value = stats.mcnemar_p_value(improved, worsened)
    ci = stats.paired_change_interval(improved, worsened, n, CONFIDENCE)
    return {"metric": metric, "mean": (improved - worsened) / n if n else None,
            "stderr": stats.mean_stderr(d), "ci95": None if ci is None else list(ci),
            "interval": ACCURACY_INTERVAL, "n": n, "n_improved": improved,
            "n_worsened": worsened, "n_discordant": improved + worsened,
            "p_value": p_value, "test": ACCURACY_TEST, "alpha": alpha,
            "mde": stats.minimum_detectable_change(n, (improved + worsened) / n, alpha)
            if n else None,
            "significant": p_value < alpha}


def perplexity_impact(baseline: dict, modified: dict) -> dict:
    """Compare two perplexity results: ratio, its bootstrap interval over windows, verdict.

    `significant` when the interval excludes 1, or when the modified perplexity is not finite
    (a destroyed model: `modified_perplexity_finite` is false, and its JSON values are null).
    """
    base, mod = float(baseline["perplexity"]), float(modified["perplexity"])
    finite = math.isfinite(mod)
    ratio = mod / base if base > 0 else None
    if baseline.get("windows") != modified.get("windows"):
        raise ValueError("perplexity impact: baseline and modified were evaluated on different "
                         "windows; evaluate both with the same perplexity settings")
    interval = None
    if baseline.get("per_window_nll") is not None and modified.get("per_window_nll") is not None:
        per_window_tokens = baseline["n_tokens"] / baseline["n_windows"]
        interval = stats.perplexity_ratio_interval(
            baseline["per_window_nll"], modified["per_window_nll"], per_window_tokens,
            CONFIDENCE)
    significant = not finite or (interval is not None and (interval[0] > 1 or interval[1] < 1))
    return {"baseline_perplexity": base, "modified_perplexity": mod,
            "modified_perplexity_finite": finite, "perplexity_ratio": ratio,
            "ratio_ci95": None if interval is None else list(interval),
            "interval": PERPLEXITY_INTERVAL, "significant": significant,
            "perplexity_increase": mod - base,
            "impact_severity": perplexity_verdict(ratio, finite, significant),
            "dataset_info": baseline.get("dataset_info"),
            "n_windows": baseline.get("n_windows"), "n_tokens": baseline.get("n_tokens")}


def metric_impact(baseline: dict, modified: dict, metric: str) -> dict:
    """One metric of one task: baseline and modified {value, stderr}, the paired change, verdict."""
    diff = paired_difference(baseline["per_item"], modified["per_item"], metric)
    return {"baseline": baseline["metrics"][metric], "modified": modified["metrics"][metric],
            "paired_difference": diff,
            "impact_severity": accuracy_verdict(diff["mean"], diff["significant"])}


def accuracy_impact(baseline: dict, modified: dict) -> dict:
    """Compare two results of one task, every metric side by side (`metrics`); the primary
    metric's numbers are also at the top (the original script's `accuracy_impacts[task]`)."""
    primary = baseline["primary_metric"]
    metrics = {name: metric_impact(baseline, modified, name) for name in baseline["metrics"]}
    head = metrics[primary]
    base, mod = float(head["baseline"]["value"]), float(head["modified"]["value"])
    return {"primary_metric": primary, "baseline_accuracy": base, "modified_accuracy": mod,
            "accuracy_drop": base - mod, "accuracy_ratio": mod / base if base > 0 else None,
            "p_value": head["paired_difference"]["p_value"],
            "significant": head["paired_difference"]["significant"],
            "impact_severity": head["impact_severity"], "n_samples": baseline["n_samples"],
            "n_requested": baseline.get("n_requested"), "capped": baseline.get("capped"),
            "metrics": metrics, "paired_difference": head["paired_difference"]}


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
            "metrics": {task: {name: m["value"] for name, m in r["metrics"].items()}
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
    settings = (settings or StudySettings()).for_model(lm)
    units = ablation_units(weights, unit)
    if baseline is None:
        baseline = evaluate_condition(lm, [], settings, cache,
                                      keep_layers={w["layer"] for w in weights})
    analyses = [_analysis(u, baseline, evaluate_against(lm, baseline, u["edits"], settings, cache),
                          i)
                for i, u in enumerate(_progress(units, settings, "individual ablation"))]
    return {"unit": unit, "settings": settings.to_dict(), "baseline": summarize(baseline),
            "analyses": analyses}


def combined_ablation(lm, weights: Sequence[dict], settings: StudySettings | None = None,
                      cache=None, baseline: Condition | None = None) -> dict:
    """Zero every super weight together and compare with the baseline.

    Returns {"label", "super_weights", "settings", "baseline": summary, "perplexity_impact",
    "accuracy_impacts", "seconds", "reused"}; with no weights the impacts are None / {}.
    `reused` is true when the same condition was already evaluated against this `baseline`
    (e.g. by `individual_ablation` with a single weight) and its results were taken as they are.
    """
    settings = (settings or StudySettings()).for_model(lm)
    weights = list(weights)
    result = {"label": "all " + str(len(weights)) + " super weights", "super_weights": weights,
              "settings": settings.to_dict(), "baseline": None, "perplexity_impact": None,
              "accuracy_impacts": {}, "seconds": 0.0, "reused": False}
    if not weights:
        return result
    if baseline is None:
        baseline = evaluate_condition(lm, [], settings, cache,
                                      keep_layers=[min(w["layer"] for w in weights)])
    edits = zero(weights)
    result["reused"] = _condition_key(edits, settings) in baseline.evaluated
    condition = evaluate_against(lm, baseline, edits, settings, cache)
    result.update(compare(baseline, condition))
    result["baseline"] = summarize(baseline)
    result["seconds"] = condition.seconds
    return result


# --- detection input ----------------------------------------------------------------------


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

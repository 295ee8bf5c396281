"""The paper's experiments on how a super weight acts (notebook 06), beyond zeroing it.

- **Restore** (`restore_experiment`): zero the super weights, then put their super
  activations back (`edits.ActivationRestore` on each down projection, at the tokens where the
  original output is massive: at least `trace.MASSIVE_FRACTION` x the super activation the
  trace measured on the prompt). Original vs zeroed vs zeroed-plus-restored on perplexity and
  the accuracy tasks. Recovery = how much of the damage the restore undoes: on perplexity
  (ln zeroed - ln restored) / (ln zeroed - ln original), on accuracy (restored - zeroed) /
  (original - zeroed); 1 = all of it, 0 = none.
- **Scaling** (`scaling_sweep`): the super weights multiplied by each factor together
  (`edits.WeightEdit(scale=f)`); factor 1 is the unedited model (a weight times 1.0 is the
  same bits), factor 0 the zeroed one, both shared with notebooks 02/03 through the cache.
- **Stop words** (`stop_word_shift`): on detection's reference text, the next-token probability
  mass on stop words (`sw_lib.stopwords`) and the share of positions whose top token is one,
  with and without the super weights, the change with a block-bootstrap interval (blocks of
  consecutive tokens, as the verdicts use), and the tokens whose mean probability rose most.

Every condition is an edit set the evaluation engine caches (`sw_lib.study` evaluates it once
per baseline and compares it with the paired statistics of `evaluate.stats`).
`mechanisms_document` assembles the JSON `data/mechanisms_<ts>.json` (schema sw-mechanisms/1).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from typing import Iterator, Sequence

import torch

from . import ablate, arch, stopwords, study, trace, verdict
from .edits import ActivationRestore, scale, zero
from .evaluate import stats

SCHEMA = "sw-mechanisms/1"


# --- restore ---------------------------------------------------------------------------------


def _dense(w: dict) -> bool:
    return w.get("expert") is None and not w.get("shared", False)


def restore_edits(model: torch.nn.Module, weights: Sequence[dict], trace_doc: dict,
                  fraction: float = trace.MASSIVE_FRACTION) -> tuple[list, list[dict]]:
    """One ActivationRestore per (layer, row) of the dense super weights, each restoring
    where the original output reaches `fraction` x the super activation on the traced prompt;
    and the weights it cannot restore (expert weights: fused experts have no module to hook)."""
    outputs = {(w["layer"], w["row"]): abs(w["down_proj_output"])
               for a in trace_doc["activations"] for w in a["super_weights"]
               if w["down_proj_output"] is not None}
    by_row: dict[tuple[int, int], list[int]] = {}
    for w in weights:
        if _dense(w) and (w["layer"], w["row"]) in outputs:
            by_row.setdefault((int(w["layer"]), int(w["row"])), []).append(int(w["column"]))
    restores = []
    for (layer, row), columns in by_row.items():
        matrix = arch.down_proj_matrix(model, layer)
        values = tuple(float(matrix[row, c].detach()) for c in columns)
        restores.append(ActivationRestore(layer, row, tuple(columns), values,
                                          fraction * outputs[(layer, row)]))
    skipped = [w for w in weights if (w["layer"], w["row"]) not in by_row or not _dense(w)]
    return restores, skipped


def _recovery(original: float, zeroed: float, restored: float, log: bool = False) -> float | None:
    if log:
        if not all(map(math.isfinite, (original, zeroed, restored))) or min(original, zeroed,
                                                                            restored) <= 0:
            return None
        original, zeroed, restored = map(math.log, (original, zeroed, restored))
    damage = zeroed - original
    return None if damage == 0 else (zeroed - restored) / damage


def recovery(summaries: dict[str, dict]) -> dict:
    """Share of the zeroing's damage the restore undoes, on perplexity and per task."""
    o, z, r = (summaries[k] for k in ("original", "zeroed", "restored"))
    return {"perplexity": (None if o["perplexity"] is None else
                           _recovery(o["perplexity"], z["perplexity"], r["perplexity"], log=True)),
            "accuracy": {task: _recovery(o["accuracy"][task], z["accuracy"][task],
                                         r["accuracy"][task]) for task in o["accuracy"]},
            "definition": "perplexity: (ln zeroed - ln restored) / (ln zeroed - ln original); "
                          "accuracy: (restored - zeroed) / (original - zeroed); 1 = all of the "
                          "damage undone, 0 = none; null where zeroing changed nothing"}


def restore_experiment(lm, weights: Sequence[dict], trace_doc: dict,
                       settings: study.StudySettings, cache=None,
                       baseline: study.Condition | None = None) -> dict | None:
    """Original vs zeroed vs zeroed-plus-restored (None: no dense super weight to restore)."""
    restores, skipped = restore_edits(lm.model, weights, trace_doc)
    if not restores:
        return None
    if baseline is None:
        baseline = study.evaluate_condition(lm, [], settings, cache,
                                            keep_layers={w["layer"] for w in weights})
    zeroed_edits = zero(weights)
    zeroed = study.evaluate_against(lm, baseline, zeroed_edits, settings, cache)
    restored = study.evaluate_against(lm, baseline, zeroed_edits + restores, settings, cache)
    summaries = {"original": study.summarize(baseline), "zeroed": study.summarize(zeroed),
                 "restored": study.summarize(restored)}
    return {"restores": [r.to_dict() for r in restores], "not_restored": skipped,
            "conditions": summaries,
            "zeroed": study.compare(baseline, zeroed),
            "restored": study.compare(baseline, restored),
            "restored_vs_zeroed": study.compare(zeroed, restored),
            "recovery": recovery(summaries),
            "seconds": zeroed.seconds + restored.seconds}


def restore_rows(restore: dict) -> list[dict]:
    """The restore table: one row per condition, perplexity and each task's primary metric."""
    rows = []
    labels = {"original": "original", "zeroed": "super weights zeroed",
              "restored": "zeroed + super activations restored"}
    for key, label in labels.items():
        c = restore["conditions"][key]
        impact = (restore.get(key) or {}).get("perplexity_impact") or {}
        row = {"condition": label, "perplexity": c["perplexity"],
               "ratio to original": impact.get("perplexity_ratio", 1.0 if key == "original" else None),
               "ratio 95% CI": impact.get("ratio_ci95")}
        for task, value in c["accuracy"].items():
            row[f"{task} {c['primary_metric'][task]}"] = value
        rows.append(row)
    rec = restore["recovery"]
    row = {"condition": "recovery (share of the damage undone)", "perplexity": rec["perplexity"]}
    for task, value in rec["accuracy"].items():
        row[f"{task} {restore['conditions']['original']['primary_metric'][task]}"] = value
    rows.append(row)
    return rows


# --- scaling ---------------------------------------------------------------------------------


def scaling_sweep(lm, weights: Sequence[dict], factors: Sequence[float],
                  settings: study.StudySettings, cache=None,
                  baseline: study.Condition | None = None) -> dict | None:
    """Perplexity (and the settings' tasks) with the super weights scaled by each factor."""
    if not weights:
        return None
    if baseline is None:
        baseline = study.evaluate_condition(lm, [], settings, cache,
                                            keep_layers={w["layer"] for w in weights})
    points = []
    for factor in factors:
        factor = float(factor)
        # x * 1.0 is x bit for bit: factor 1 is the unedited model (evaluated once).
        condition = (baseline if factor == 1.0 else
                     study.evaluate_against(lm, baseline, scale(weights, factor), settings, cache))
        summary = study.summarize(condition)
        points.append({"factor": factor, "edits": summary["edits"],
                       "perplexity": summary["perplexity"], "accuracy": summary["accuracy"],
                       "primary_metric": summary["primary_metric"],
                       "same_as_baseline": condition is baseline,
                       **study.compare(baseline, condition)})
    finite = [p for p in points if p["perplexity"] is not None and math.isfinite(p["perplexity"])]
    best = min(finite, key=lambda p: p["perplexity"])["factor"] if finite else None
    return {"factors": [float(f) for f in factors], "points": points,
            "lowest_perplexity_factor": best}


def scaling_rows(sweep: dict) -> list[dict]:
    rows = []
    for p in sweep["points"]:
        impact = p["perplexity_impact"] or {}
        row = {"factor": p["factor"], "perplexity": p["perplexity"],
               "ratio to factor 1": impact.get("perplexity_ratio"),
               "ratio 95% CI": impact.get("ratio_ci95"),
               "verdict": impact.get("impact_severity")}
        for task, value in p["accuracy"].items():
            row[f"{task} {p['primary_metric'][task]}"] = value
        rows.append(row)
    return rows


# --- stop words ------------------------------------------------------------------------------


@torch.no_grad()
def next_token_distribution(model: torch.nn.Module, input_ids: torch.Tensor,
                            stop_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per predicted position: the probability mass on `stop_ids` and whether the top token is
    one of them; and the mean next-token distribution (float32, CPU)."""
    device = next(model.parameters()).device
    logits = model(input_ids.to(device)).logits[0, :-1].float()
    probs = torch.softmax(logits, dim=-1)
    is_stop = torch.zeros(probs.shape[1], dtype=torch.bool, device=probs.device)
    is_stop[stop_ids.to(probs.device)] = True
    return {"mass": probs[:, is_stop].sum(dim=1).cpu(),
            "top_is_stop": is_stop[probs.argmax(dim=1)].float().cpu(),
            "mean_probs": probs.mean(dim=0).cpu()}


def _shift(original: torch.Tensor, changed: torch.Tensor, rule: verdict.VerdictRule) -> dict:
    """Mean change (changed - original) with a block-bootstrap interval over the text."""
    sums, counts = verdict.block_sums(changed - original, rule.block_tokens)
    interval = stats.bootstrap_interval([sums, counts], lambda s, n: s.sum() / n.sum(),
                                        confidence=rule.confidence, seed=rule.seed)
    return {"change": float((changed - original).double().mean()),
            "ci95": None if interval is None else list(interval)}


def stop_word_shift(lm, weights: Sequence[dict], input_ids: torch.Tensor,
                    rule: verdict.VerdictRule | None = None, top_k: int = 10) -> dict | None:
    """Stop-word probability mass and top-1 share on `input_ids`, unedited vs super weights
    zeroed, with the change and its interval; the `top_k` tokens whose mean probability rose
    most. None without super weights."""
    if not weights:
        return None
    rule = rule or verdict.VerdictRule()
    stop_ids = torch.tensor(stopwords.token_ids(lm.tokenizer), dtype=torch.long)
    original = next_token_distribution(lm.model, input_ids, stop_ids)
    with ablate.zeroed(lm.model, weights):
        zeroed = next_token_distribution(lm.model, input_ids, stop_ids)
    rise = zeroed["mean_probs"] - original["mean_probs"]
    stop_set = set(stop_ids.tolist())
    top = [{"token": lm.tokenizer.decode([i]), "token_id": i,
            "original": float(original["mean_probs"][i]), "zeroed": float(zeroed["mean_probs"][i]),
            "stop_word": i in stop_set} for i in rise.topk(top_k).indices.tolist()]
    return {"stop_words": {**stopwords.source(), "n_token_ids": len(stop_set)},
            "predicted_tokens": int(original["mass"].numel()),
            "original": {"stop_word_mass": float(original["mass"].double().mean()),
                         "top1_stop_share": float(original["top_is_stop"].double().mean())},
            "zeroed": {"stop_word_mass": float(zeroed["mass"].double().mean()),
                       "top1_stop_share": float(zeroed["top_is_stop"].double().mean())},
            "change": {"stop_word_mass": _shift(original["mass"], zeroed["mass"], rule),
                       "top1_stop_share": _shift(original["top_is_stop"], zeroed["top_is_stop"],
                                                 rule),
                       "interval": f"block bootstrap over {rule.block_tokens} consecutive tokens "
                                   f"({stats.BOOTSTRAP_RESAMPLES} resamples, seed {rule.seed})"},
            "rose_most": top}


def stop_word_rows(shift: dict) -> list[dict]:
    rows = []
    for key, label in (("stop_word_mass", "probability mass on stop words"),
                       ("top1_stop_share", "share of positions whose top token is a stop word")):
        change = shift["change"][key]
        rows.append({"quantity": label, "original": shift["original"][key],
                     "super weights zeroed": shift["zeroed"][key], "change": change["change"],
                     "change 95% CI": change["ci95"]})
    return rows


# --- the document ---------------------------------------------------------------------------


def settings_for_sweep(settings: study.StudySettings, tasks: Sequence[str]) -> study.StudySettings:
    """The study settings with only `tasks` as accuracy tasks ([] = perplexity only)."""
    return replace(settings, accuracy_tasks=tuple(tasks))


def mechanisms_document(*, model: str, fingerprint: str | None, run_timestamp: str,
                        detection_json, selection: dict, settings: dict, trace_doc: dict,
                        restore: dict | None, scaling: dict | None, stop_words: dict | None,
                        reference: dict | None, timing: dict) -> dict:
    """`data/mechanisms_<ts>.json`: the trace, restore, scaling and stop-word results."""
    weights = selection["weights"]
    why = None if weights else "no super weight to ablate (" + selection["statement"] + ")"
    return {"schema": SCHEMA, "model": model, "fingerprint": fingerprint,
            "run_timestamp": run_timestamp,
            "detection_json": None if detection_json is None else str(detection_json),
            "settings": settings, "super_weights": weights,
            "ablation_selection": {k: v for k, v in selection.items() if k != "weights"},
            "trace": trace_doc,
            "restore": restore,
            "restore_skipped": (why or "no dense super weight: fused experts have no down "
                                "projection to hook") if restore is None else None,
            "scaling": scaling, "scaling_skipped": why if scaling is None else None,
            "stop_words": stop_words, "stop_words_skipped": why if stop_words is None else None,
            "reference": reference, "timing": timing}


@contextlib.contextmanager
def timed(seconds: dict, name: str) -> Iterator[None]:
    """Add the block's wall time to seconds[name] (the documents' `timing`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

"""The tables and JSON documents of notebooks 02 and 03, built from a study's results."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sw_lib import results, study, study_report

TS = "20250102_030405"
WEIGHTS = [{"layer": 2, "row": 507, "column": 90, "expert": None, "shared": False},
           {"layer": 11, "row": 507, "column": 1229, "expert": None, "shared": False}]


def _condition(shift: float, lost: int, destroyed: bool = False):
    nll = (np.linspace(2.9, 3.1, 4) + shift) * 63
    if destroyed:
        nll[:] = math.inf
    correct = np.array([1] * 10 + [0] * 10)
    norm, acc = correct.copy(), correct.copy()
    norm[:lost] = 0
    acc[10:10 + lost // 2] = 1  # acc gains where acc_norm loses
    task = {"primary_metric": "acc_norm", "n_samples": 20, "n_requested": 20, "capped": False,
            "metrics": {"acc_norm": {"value": float(norm.mean()), "stderr": 0.1},
                        "acc": {"value": float(acc.mean()), "stderr": 0.1}},
            "per_item": [{"doc_id": i, "correct": {"acc_norm": int(a), "acc": int(b)}}
                         for i, (a, b) in enumerate(zip(norm, acc))]}
    ppl = {"perplexity": math.exp(nll.sum() / (4 * 63)), "per_window_nll": nll.tolist(),
           "n_windows": 4, "n_tokens": 4 * 63, "windows": [0, 1, 2, 3], "dataset_info": {}}
    return study.Condition(edits=[], perplexity=ppl, tasks={"arc_easy": task})


@pytest.fixture(scope="module")
def studied():
    base = _condition(0.0, 0)
    units = study.ablation_units(WEIGHTS)
    analyses = [study._analysis(units[0], base, _condition(0.2, 8), 0),
                study._analysis(units[1], base, _condition(0.0, 0, destroyed=True), 1)]
    individual = {"unit": "weight", "settings": {}, "baseline": study.summarize(base),
                  "analyses": analyses}
    combined = {"label": "all 2 super weights", "super_weights": WEIGHTS, "settings": {},
                "baseline": study.summarize(base), "seconds": 0.0, "reused": False,
                **study.compare(base, _condition(0.5, 10))}
    return individual, combined


HEAD = dict(model="tiny", fingerprint="abc", run_timestamp=TS, detection_json="d.json",
            settings={"accuracy_samples": 20}, unit="weight")


def test_write_individual_files_and_summary(studied, tmp_path):
    individual, _ = studied
    written = study_report.write_individual(tmp_path, individual, WEIGHTS, **HEAD,
                                            ablated_verdicts=["super_weight"])
    paths = results.ModelPaths(tmp_path, TS)
    assert written["files"] == [paths.individual_json(0), paths.individual_json(1)]
    assert written["summary"] == tmp_path / "data" / f"individual_summary_{TS}.json"
    first = json.loads(written["files"][0].read_text())
    assert first["schema"] == "sw-individual/2" and first["ablated_verdicts"] == ["super_weight"]
    assert first["label"] == "L2 [507, 90]" and first["baseline"]["metrics"]["arc_easy"]["acc"] == 0.5

    summary = json.loads(written["summary"].read_text())
    assert summary["super_weights"] == WEIGHTS
    entry, destroyed = summary["analyses"]
    assert entry["file"] == f"data/individual_analyses/sw_0_analysis_{TS}.json"
    arc = entry["accuracy"]["arc_easy"]
    full = individual["analyses"][0]["accuracy_impacts"]["arc_easy"]["metrics"]
    for name in ("acc", "acc_norm"):  # both metrics side by side, each with its own test
        d = full[name]["paired_difference"]
        assert arc["metrics"][name] == {
            "baseline": full[name]["baseline"]["value"], "modified": full[name]["modified"]["value"],
            "change": d["mean"], "ci95": d["ci95"], "p_value": d["p_value"],
            "n_improved": d["n_improved"], "n_worsened": d["n_worsened"], "mde": d["mde"],
            "significant": d["significant"], "impact_severity": full[name]["impact_severity"]}
    assert arc["metrics"]["acc_norm"]["impact_severity"] == "severe"  # 8 of 20 lost: p < 0.05
    assert arc["metrics"]["acc"]["impact_severity"] == "inconclusive"   # 4 gained: p = 0.125
    assert entry["accuracy_drops"] == {"arc_easy": pytest.approx(0.4)}
    # A destroyed model stays readable as destroyed after inf became null.
    assert destroyed["perplexity_ratio"] is None and destroyed["modified_perplexity_finite"] is False
    assert destroyed["perplexity_severity"] == "catastrophic"


def test_write_combined(studied, tmp_path):
    individual, combined = studied
    path = study_report.write_combined(tmp_path, individual, combined, **HEAD)
    assert path == results.ModelPaths(tmp_path, TS).combined_json
    record = json.loads(path.read_text())
    assert record["schema"] == "sw-combined/2" and record["reused"] is False
    assert [u["label"] for u in record["individual"]] == ["L2 [507, 90]", "L11 [507, 1229]"]
    assert record["individual"][0]["super_weight"]["layer"] == 2
    assert record["individual"][0]["accuracy_impacts"] == json.loads(json.dumps(
        results.jsonable(individual["analyses"][0]["accuracy_impacts"])))
    assert record["accuracy_impacts"]["arc_easy"]["significant"] is True


def test_tables(studied):
    individual, combined = studied
    conditions = individual["analyses"] + [{**combined, "label": "all combined"}]
    ppl = study_report.perplexity_rows(conditions)
    assert [r["condition"] for r in ppl] == ["L2 [507, 90]", "L11 [507, 1229]", "all combined"]
    assert ppl[0]["ratio"] == pytest.approx(math.exp(0.2), rel=1e-3)
    assert ppl[1]["modified"] == math.inf and ppl[1]["severity"] == "catastrophic"
    ci = individual["analyses"][0]["perplexity_impact"]["ratio_ci95"]
    assert ppl[0]["ratio 95% CI"] == f"[{ci[0]:.3f}, {ci[1]:.3f}]"

    rows = study_report.accuracy_tables(conditions)["arc_easy"]
    first = rows[0]
    d = individual["analyses"][0]["accuracy_impacts"]["arc_easy"]["metrics"]["acc_norm"][
        "paired_difference"]
    assert first["acc_norm"] == "0.500 → 0.100" and first["acc"] == "0.500 → 0.700"
    assert first["acc_norm change [95% CI]"] == (
        f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    assert first["acc_norm ↑/↓"] == "0/8" and first["acc ↑/↓"] == "4/0"
    assert first["acc_norm MDE"] == f"±{d['mde']:.3f}"
    assert first["acc_norm verdict"] == "severe" and first["acc verdict"] == "inconclusive"
    assert [r["task"] for r in study_report.accuracy_rows(conditions)] == ["arc_easy"] * 3

    notes = study_report.resolution_notes(conditions)
    assert len(notes) == 1 and notes[0].startswith("arc_easy (n=20): a change of acc_norm "
                                                   "smaller than ±")

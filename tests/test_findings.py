"""Findings blocks and the index built from stage JSON: the numbers and verdicts they state,
plain words when nothing was found, a failed stage's error; the HTML export's reader order."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat

from sw_lib import ablate, findings, reports, results, runner


def _candidate(layer, row, column, verdict, ratio, interval, control=1.01, flagged=("down_proj",)):
    return {"layer": layer, "row": row, "column": column, "expert": None, "shared": False,
            "verdict": verdict, "perplexity_ratio": ratio, "perplexity_ratio_interval": interval,
            "flagged_by": list(flagged), "input_value": 2996.0, "output_value": 24021.9,
            "token_text": "Apple",
            "control": {"max_perplexity_ratio": control, "measured": verdict != "no_effect"}}


DETECTION = {
    "model": "smollm2-135m", "num_layers": 30, "config": {"spike_threshold": 50.0},
    "verdict_rule": {"super_ratio": 2.0},
    "candidates": [_candidate(11, 507, 1229, "super_weight", 6.79, [5.76, 8.19], 1.10),
                   _candidate(2, 507, 90, "contributor", 1.66, [1.50, 1.85], 1.44),
                   *[_candidate(layer, 903, 3 + layer, "no_effect", r, [0.99, 1.01])
                     for layer, r in ((27, 0.998), (28, 1.0), (29, 1.0102))]],
    "iterations": [],
}


def test_weight_label_is_the_library_label():
    for w in ({"layer": 3, "row": 5, "column": 7}, {"layer": 1, "row": 2, "column": 3, "expert": 4},
              {"layer": 0, "row": 1, "column": 2, "expert": None, "shared": True}):
        assert findings.weight_label(w) == ablate.weight_label(w)


def test_detection_findings_name_each_verdict_with_its_numbers():
    f = findings.detection(DETECTION)
    text = findings.to_text(f)
    assert f.sentences[0] == ("5 spike candidates: 1 super weight, 1 contributor, "
                              "3 with no effect beyond the control.")
    assert "Super weight L11 [507, 1229]" in text and "6.79 [5.76, 8.19]" in text
    assert "control's largest change is 1.1" in text
    assert "L2 [507, 90] × 1.66" in text and "layers 27-29" in text
    assert f.rows[0][:3] == ["L11 [507, 1229]", "super_weight", "6.79 [5.76, 8.19]"]
    assert f.rows[-1][:3] == ["3 others (layers 27-29)", "no_effect", "0.9980 to 1.01"]
    html = findings.to_html(f)
    assert 'class="sw-findings sw-findings-ok"' in html and "<table" in html


def test_nothing_found_is_said_plainly_with_the_largest_spikes():
    det = {"model": "/models/gemma3-270m", "num_layers": 2, "config": {"spike_threshold": 50.0},
           "verdict_rule": {"super_ratio": 2.0}, "candidates": [],
           "iterations": [{"layers": [
               {"layer": 0, "max_input": 12.5, "max_output": 80.0},
               {"layer": 1, "max_input": 31.0, "max_output": 4.0}]}]}
    f = findings.detection(det)
    assert f.status == "empty" and f.title == "Detection: gemma3-270m"
    assert ("largest input 31 at layer 1, largest output 80 at layer 0" in f.sentences[0])
    assert f.sentences[1] == "gemma3-270m has no super weight by this detector."
    none_super = dict(DETECTION, candidates=DETECTION["candidates"][1:])
    g = findings.detection(none_super)
    assert g.status == "empty" and any(s.startswith("No super weight:") for s in g.sentences)


def _metric(baseline, modified, change, ci, p, significant, severity):
    return {"baseline": {"value": baseline}, "modified": {"value": modified},
            "impact_severity": severity,
            "paired_difference": {"mean": change, "ci95": ci, "p_value": p,
                                  "significant": significant}}


def test_combined_findings_state_only_significant_accuracy_changes():
    doc = {"model": "m", "super_weights": [DETECTION["candidates"][0]],
           "baseline": {"perplexity": 21.3, "accuracy": {"hellaswag": 0.45},
                        "primary_metric": {"hellaswag": "acc_norm"}},
           "perplexity_impact": {"baseline_perplexity": 21.3, "modified_perplexity": 221.0,
                                 "perplexity_ratio": 10.35, "ratio_ci95": [9.1, 11.8],
                                 "significant": True, "impact_severity": "catastrophic",
                                 "modified_perplexity_finite": True},
           "accuracy_impacts": {"hellaswag": {"primary_metric": "acc_norm", "n_samples": 40, "metrics": {
               "acc": _metric(0.4, 0.375, -0.025, [-0.1, 0.05], 1.0, False, "inconclusive"),
               "acc_norm": _metric(0.45, 0.2, -0.25, [-0.4, -0.1], 0.002, True, "severe")}}},
           "individual": [], "reused": True}
    f = findings.combined(doc)
    text = findings.to_text(f)
    assert ("1 weight zeroed (L11 [507, 1229]): perplexity 21.3 → 221 "
            "(× 10.3 [9.1, 11.8], catastrophic)") in text
    assert "hellaswag acc_norm 0.450 → 0.200, -0.250 [-0.400, -0.100], p = 0.002 (severe)" in text
    assert "hellaswag acc " not in text.replace("hellaswag acc_norm", "")
    assert f.rows[-1] == ["all together", "10.3 [9.1, 11.8]", "catastrophic",
                          "hellaswag acc_norm -0.250"]
    doc["accuracy_impacts"]["hellaswag"]["metrics"]["acc_norm"]["paired_difference"]["significant"] = False
    assert "no accuracy change is significant" in findings.to_text(findings.combined(doc))
    assert findings.combined({"super_weights": []}).status == "empty"


def _analysis(root: Path, ts: str, slug: str, failed: bool) -> None:
    paths = results.ModelPaths(root / slug, ts).make()
    stages = {"resolve": {"status": "ok", "error": None},
              "01_detection": {"status": "ok", "error": None},
              "02_individual_ablation": ({"status": "failed", "error": "RuntimeError: out of memory"}
                                         if failed else {"status": "ok", "error": None})}
    results.write_json(paths.analysis_json, {"status": "failed" if failed else "ok",
                                             "family": "llama", "model": slug, "stages": stages,
                                             "detection": DETECTION, "combined": None})
    paths.log_file.write_text("log\n")
    paths.report("01_detection").write_text("<html></html>")


def test_index_states_findings_failures_and_links_relative_paths(tmp_path):
    root = tmp_path / "results"
    _analysis(root, "20250101_000000", "good", failed=False)
    _analysis(root, "20250102_000000", "broken", failed=True)
    index = reports.write_index(tmp_path / "reports", root).read_text()
    assert index.index("20250102_000000") < index.index("20250101_000000")  # newest first
    assert "failed: 02_individual_ablation: RuntimeError: out of memory" in index
    assert "Super weight L11 [507, 1229]" in index
    for href in re.findall(r'href="([^"]+)"', index):
        assert not href.startswith("/") and (tmp_path / "reports" / href).resolve().is_file(), href


def test_export_puts_findings_under_the_title_and_links_the_notebook(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# 01 · Title\n\nA long introduction."),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("show()", outputs=[nbformat.v4.new_output(
            "display_data", data={"text/html": findings.to_html(findings.detection(DETECTION)),
                                  "text/plain": "f"})])])
    nb.cells[-1].metadata["tags"] = ["findings"]
    source = tmp_path / "notebooks" / "01_detection_20250101_000000.ipynb"
    source.parent.mkdir()
    nbformat.write(nb, str(source))
    page = runner.export_html(source, tmp_path / "reports" / "01_detection_20250101_000000.html")
    text = page.read_text()
    title, block, intro = (text.index("01 · Title"), text.index('class="sw-findings'),
                           text.index("A long introduction"))
    assert title < block < intro
    assert 'href="../notebooks/01_detection_20250101_000000.ipynb"' in text
    assert "<script src=" not in text  # nothing fetched from the network
    failed = runner.export_html(source, tmp_path / "f.html", error="ValueError: bad").read_text()
    assert "This stage failed: ValueError: bad" in failed
    assert json.loads(json.dumps(findings.detection(DETECTION).to_dict()))["title"]


def test_moe_and_comparison_findings():
    dense = findings.moe({"model": "smollm2-135m", "is_moe": False})
    assert dense.status == "empty" and "no mixture-of-experts layers" in dense.sentences[0]
    doc = {"model": "m", "is_moe": True, "moe_layers": [1, 2, 3], "num_experts": 8, "top_k": 2,
           "super_experts": {"flagged": [
               {"layer": 1, "expert": 68, "max_output": 912.0, "p_active": 0.05,
                "verdict": "super_weight", "perplexity_ratio": 40.0,
                "perplexity_ratio_interval": [30.0, 55.0], "control": {"max_perplexity_ratio": 1.02}},
               {"layer": 2, "expert": None, "shared": True, "max_output": 300.0, "p_active": 1.0,
                "verdict": "no_effect", "perplexity_ratio": 1.001,
                "perplexity_ratio_interval": [0.999, 1.003], "control": {"max_perplexity_ratio": 1.004}}]},
           "skip_evaluation": {
               "super_experts": {"perplexity_impact": {"perplexity_ratio": 37.5,
                                                       "ratio_ci95": [31.0, 44.0],
                                                       "modified_perplexity_finite": True,
                                                       "impact_severity": "catastrophic"}},
               "controls": [{"perplexity_impact": {"perplexity_ratio": 1.03,
                                                   "modified_perplexity_finite": True}},
                            {"perplexity_impact": {"perplexity_ratio": 1.21,
                                                   "modified_perplexity_finite": True}}]},
           "expert_super_weights": [{"layer": 1, "expert": 68, "row": 940, "column": 711,
                                     "verdict": "contributor", "perplexity_ratio": 1.6,
                                     "perplexity_ratio_interval": [1.4, 1.8]}]}
    f = findings.moe(doc)
    assert f.sentences == [
        "3 MoE layers of 8 experts (top-2).",
        "2 super experts by the reference rule: L1 E68 (super_weight, × 40 [30, 55]); "
        "L2 shared (no_effect, × 1.0010 [0.9990, 1.0030]).",
        "Skipping them all: WikiText-2 perplexity × 37.5 [31, 44] (catastrophic); "
        "2 frequency-matched control sets: at most × 1.21.",
        "1 expert super weight: L1 E68 [940, 711] (contributor, × 1.6 [1.4, 1.8])."]
    assert f.rows[0] == ["L1 E68", "912", "0.05", "super_weight", "40 [30, 55]", "1.02"]
    assert f.rows[1][3] == "no_effect"
    unjudged = findings.moe({**doc, "skip_evaluation": None,
                             "super_experts": {"flagged": [{"layer": 1, "expert": 3}]}})
    assert unjudged.sentences[1:3] == [
        "1 super expert by the reference rule: L1 E3 (not judged).",
        "Skipping them was not evaluated on WikiText-2 (evaluation off)."]
    cmp = findings.comparison({"models": [
        {"slug": "smollm2-135m", "family": "llama", "detection_ok": True,
         "super_weights": [{"layer": 11, "row": 507, "column": 1229}], "perplexity_ratio": 10.3,
         "perplexity_ratio_ci95": [9.1, 11.8], "accuracy_drops": {"hellaswag": 0.2, "mmlu": 0.05},
         "accuracy_significant": {"hellaswag": True, "mmlu": False}},
        {"slug": "gemma3-270m", "family": "gemma", "detection_ok": True, "super_weights": []}]})
    assert cmp.sentences == ["smollm2-135m (llama): 1 super weight in layer 11; zeroing it: "
                             "perplexity × 10.3 [9.1, 11.8].",
                             "gemma3-270m (gemma): no super weight found."]
    assert cmp.rows[0][-1] == "hellaswag +0.200"  # the n.s. mmlu drop is not named

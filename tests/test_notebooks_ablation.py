"""Notebooks 02 and 03 under papermill on a tiny model with planted super weights."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import matplotlib.image
import papermill
import pytest

from sw_lib import evaluate, memory, models
from sw_lib.ablate import zero

ROOT = Path(__file__).resolve().parents[1]
TS = "20250102_030405"
PROMPT = "Apple Inc. is a worldwide tech company."
PLANTED = [{"layer": 1, "row": 5, "column": 7}, {"layer": 2, "row": 11, "column": 20}]
TASKS = ["arc_easy", "mmlu"]  # GSM8K generation is tested by the engine; too slow here
SMALL = dict(perplexity_samples=2, seq_len=32, accuracy_samples=3, accuracy_tasks=TASKS,
             batch_size=4, dtype="float32", device="cpu", run_timestamp=TS)

COORD = {"type": "object", "required": ["layer", "row", "column", "expert", "shared"],
         "properties": {"layer": {"type": "integer"}, "row": {"type": "integer"},
                        "column": {"type": "integer"}}}
NUMBER = {"type": "number"}
SEVERITIES = ["inconclusive", "improved", "minimal", "mild", "moderate", "severe", "catastrophic"]
PAIRED = {"type": "object",
          "required": ["mean", "stderr", "ci95", "n", "n_improved", "n_worsened", "p_value",
                       "mde", "significant"],
          "properties": {"p_value": {"type": "number", "minimum": 0, "maximum": 1},
                         "ci95": {"type": "array", "items": NUMBER, "minItems": 2},
                         "significant": {"type": "boolean"}}}
PERPLEXITY_IMPACT = {
    "type": "object",
    "required": ["baseline_perplexity", "modified_perplexity", "modified_perplexity_finite",
                 "perplexity_ratio", "ratio_ci95", "significant", "perplexity_increase",
                 "impact_severity", "dataset_info"],
    "properties": {"baseline_perplexity": NUMBER, "modified_perplexity": NUMBER,
                   "modified_perplexity_finite": {"const": True},
                   "perplexity_ratio": NUMBER, "perplexity_increase": NUMBER,
                   "ratio_ci95": {"type": "array", "items": NUMBER, "minItems": 2, "maxItems": 2},
                   "significant": {"type": "boolean"},
                   "impact_severity": {"enum": SEVERITIES},
                   "dataset_info": {"type": "object", "required": ["windows_used"]}}}
ACCURACY_IMPACT = {
    "type": "object",
    "required": ["baseline_accuracy", "modified_accuracy", "accuracy_drop", "accuracy_ratio",
                 "p_value", "significant", "impact_severity", "n_samples", "metrics",
                 "paired_difference", "primary_metric"],
    "properties": {"baseline_accuracy": NUMBER, "modified_accuracy": NUMBER,
                   "accuracy_drop": NUMBER, "n_samples": {"type": "integer"},
                   "impact_severity": {"enum": SEVERITIES},
                   "paired_difference": PAIRED,
                   "metrics": {"type": "object", "additionalProperties": {
                       "type": "object",
                       "required": ["baseline", "modified", "paired_difference", "impact_severity"],
                       "properties": {"paired_difference": PAIRED,
                                      "impact_severity": {"enum": SEVERITIES}}}}}}
IMPACTS = {"perplexity_impact": PERPLEXITY_IMPACT,
           "accuracy_impacts": {"type": "object", "additionalProperties": ACCURACY_IMPACT,
                                "required": TASKS}}
INDIVIDUAL_SCHEMA = {
    "type": "object",
    "required": ["schema", "model", "fingerprint", "run_timestamp", "settings", "index", "label",
                 "super_weight", "perplexity_impact", "accuracy_impacts", "baseline"],
    "properties": {"schema": {"const": "sw-individual/2"}, "run_timestamp": {"const": TS},
                   "super_weight": COORD, **IMPACTS}}
COMBINED_SCHEMA = {
    "type": "object",
    "required": ["schema", "model", "fingerprint", "run_timestamp", "settings", "super_weights",
                 "perplexity_impact", "accuracy_impacts", "individual", "baseline"],
    "properties": {"schema": {"const": "sw-combined/2"}, "run_timestamp": {"const": TS},
                   "super_weights": {"type": "array", "items": COORD}, **IMPACTS}}


def _weight(w: dict) -> dict:
    """A weight as the detection JSON lists it."""
    return {**w, "expert": None, "shared": False, "iteration": 0, "input_value": 200.0,
            "output_value": 1200.0, "input_token": 0, "output_token": 0, "token_text": "Apple",
            "co_occurs": True, "loss_ratio": 1.5, "confirmed": True}


def _detection(lm, weights: list[dict]) -> dict:
    return {"schema": "sw-detection/1", "model": "tiny-planted", "fingerprint": lm.fingerprint,
            "family": lm.family.name, "num_layers": 4, "config": {},
            "super_weights": weights, "candidates": weights,
            "groups": [{"layer": w["layer"], "column": w["column"], "rows": [w["row"]],
                        "loss_ratio": 1.5, "confirmed": True} for w in weights],
            "iterations": [], "reference": {}, "published": None, "timing": {}}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny Llama with two planted super weights, saved as a folder load_model accepts."""
    from tiny import plant_super_weight, save_tiny, tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    for w in PLANTED:
        plant_super_weight(model, w["layer"], w["row"], w["column"], ids)
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-planted")


@pytest.fixture(scope="module")
def tiny_lm(tiny_folder):
    return models.load_model(str(tiny_folder), dtype="float32", device="cpu")


def _run(name: str, out: Path, tiny_folder: Path, cache: Path, **params) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread is faster; kernels inherit it
        papermill.execute_notebook(
            str(ROOT / "notebooks" / name), str(out / "notebooks" / name), kernel_name="python3",
            cwd=str(ROOT), progress_bar=False,
            parameters={"model": str(tiny_folder), "output_dir": str(out),
                        "cache_dir": str(cache), **SMALL, **params})


def _write_detection(out: Path, lm, weights: list[dict]) -> None:
    (out / "data").mkdir(parents=True)
    (out / "notebooks").mkdir()
    # An older detection file too: the notebooks must pick the latest one.
    (out / "data" / "detection_20240101_000000.json").write_text(
        json.dumps(_detection(lm, [_weight({"layer": 3, "row": 1, "column": 2})])))
    (out / "data" / f"detection_{TS}.json").write_text(json.dumps(_detection(lm, weights)))


def _ppl(lm, weights) -> float:
    return evaluate.perplexity(lm, edits=zero(weights), seq_len=SMALL["seq_len"],
                               n_windows=SMALL["perplexity_samples"], cache=False,
                               progress=False)["perplexity"]


def _png_ok(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200


def test_notebooks_02_and_03_on_a_planted_tiny_model(tiny_folder, tiny_lm, tmp_path):
    out, cache = tmp_path / "tiny-planted", tmp_path / "eval"
    _write_detection(out, tiny_lm, [_weight(w) for w in PLANTED])

    _run("02_individual_ablation.ipynb", out, tiny_folder, cache)
    files = sorted((out / "data" / "individual_analyses").glob("*.json"))
    assert [f.name for f in files] == [f"sw_{i}_analysis_{TS}.json" for i in range(2)]
    individual = [json.loads(f.read_text()) for f in files]
    baseline_ppl = _ppl(tiny_lm, [])
    for i, (record, planted) in enumerate(zip(individual, PLANTED)):
        jsonschema.validate(record, INDIVIDUAL_SCHEMA)
        assert record["index"] == i
        assert {k: record["super_weight"][k] for k in planted} == planted
        impact = record["perplexity_impact"]
        assert impact["baseline_perplexity"] == pytest.approx(baseline_ppl, rel=1e-6)
        assert impact["modified_perplexity"] == pytest.approx(_ppl(tiny_lm, [planted]), rel=1e-5)
        assert impact["modified_perplexity"] != pytest.approx(baseline_ppl, rel=1e-4)
        accuracy = record["accuracy_impacts"]
        assert accuracy["arc_easy"]["n_samples"] == 3 and accuracy["mmlu"]["n_samples"] == 3
        assert accuracy["arc_easy"]["primary_metric"] == "acc_norm"
        assert set(accuracy["arc_easy"]["metrics"]) == {"acc", "acc_norm"}
        assert accuracy["mmlu"]["primary_metric"] == "acc"
    summary = json.loads((out / "data" / f"individual_summary_{TS}.json").read_text())
    assert [a["label"] for a in summary["analyses"]] == ["L1 [5, 7]", "L2 [11, 20]"]
    # the default token budget "auto", and the number it resolved to on this CPU (capped)
    assert summary["settings"]["token_budget"] == "auto"
    assert memory.AUTO_FLOOR <= summary["settings"]["resolved_token_budget"] <= 1024
    for entry, record in zip(summary["analyses"], individual):
        # Both metrics of a task side by side, each with its own interval and test.
        arc = entry["accuracy"]["arc_easy"]
        assert set(arc["metrics"]) == {"acc", "acc_norm"} and arc["primary_metric"] == "acc_norm"
        for name, metric in arc["metrics"].items():
            full = record["accuracy_impacts"]["arc_easy"]["metrics"][name]
            assert metric["p_value"] == full["paired_difference"]["p_value"]
            assert metric["ci95"] == full["paired_difference"]["ci95"]
            assert metric["impact_severity"] == full["impact_severity"]
        assert entry["perplexity_ratio_ci95"] == record["perplexity_impact"]["ratio_ci95"]
    _png_ok(out / "plots" / f"impact_comparison_{TS}.png")

    # 03 reuses 02's cached baseline and individual conditions: those files stay untouched.
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.json")}
    _run("03_combined_ablation.ipynb", out, tiny_folder, cache)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len(list(cache.rglob("*.json"))) == len(stamps) + 1 + len(TASKS)  # + the combined
    combined = json.loads((out / "data" / f"combined_analysis_{TS}.json").read_text())
    jsonschema.validate(combined, COMBINED_SCHEMA)
    assert combined["settings"]["resolved_token_budget"] == summary["settings"][
        "resolved_token_budget"]
    assert [{k: w[k] for k in PLANTED[0]} for w in combined["super_weights"]] == PLANTED
    impact = combined["perplexity_impact"]
    assert impact["baseline_perplexity"] == pytest.approx(baseline_ppl, rel=1e-6)
    assert impact["modified_perplexity"] == pytest.approx(_ppl(tiny_lm, PLANTED), rel=1e-5)
    assert [a["perplexity_impact"] for a in combined["individual"]] == [
        r["perplexity_impact"] for r in individual]
    _png_ok(out / "plots" / f"combined_analysis_{TS}.png")


def test_notebooks_without_super_weights_write_empty_lists(tiny_folder, tiny_lm, tmp_path):
    out, cache = tmp_path / "tiny-empty", tmp_path / "eval"
    _write_detection(out, tiny_lm, [])
    _run("02_individual_ablation.ipynb", out, tiny_folder, cache)
    _run("03_combined_ablation.ipynb", out, tiny_folder, cache)

    assert not list((out / "data").glob("individual_analyses/*.json"))
    summary = json.loads((out / "data" / f"individual_summary_{TS}.json").read_text())
    assert summary["super_weights"] == [] and summary["analyses"] == []
    assert summary["settings"]["resolved_token_budget"] is None  # no model loaded
    combined = json.loads((out / "data" / f"combined_analysis_{TS}.json").read_text())
    assert combined["super_weights"] == [] and combined["individual"] == []
    assert combined["perplexity_impact"] is None and combined["accuracy_impacts"] == {}
    assert not cache.exists()  # nothing was evaluated
    _png_ok(out / "plots" / f"impact_comparison_{TS}.png")
    _png_ok(out / "plots" / f"combined_analysis_{TS}.png")


@pytest.mark.parametrize("name", ["02_individual_ablation.ipynb", "03_combined_ablation.ipynb"])
def test_parameters_cell_defaults_are_the_default_params(name):
    import nbformat

    from sw_lib import config

    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and notebook.cells.index(cells[0]) == 1
    assert all(not c.outputs for c in notebook.cells if c.cell_type == "code")
    namespace: dict = {}
    exec(cells[0].source, namespace)
    evaluation = config.defaults()["evaluation"]
    assert {k: namespace[k] for k in evaluation} == evaluation
    assert namespace["model"] == config.defaults()["models"][0]
    assert namespace["detection_json"] is None and namespace["unit"] == "weight"

"""Notebooks 02 and 03 ablate the super_weight verdicts, contributors on request, and say so."""
from __future__ import annotations

import json
from pathlib import Path

import papermill
import pytest

import tiny

ROOT = Path(__file__).resolve().parents[1]
TS = "20250102_030405"
SMALL = dict(perplexity_samples=1, seq_len=32, skip_accuracy=True, dtype="float32",
             device="cpu", run_timestamp=TS)


def _candidate(layer, row, column, verdict):
    return {"layer": layer, "row": row, "column": column, "expert": None, "shared": False,
            "verdict": verdict, "perplexity_ratio": {"super_weight": 90.0,
                                                     "contributor": 1.3}.get(verdict, 1.0)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer))
    ids = tokenizer("Apple Inc. is a worldwide tech company.", return_tensors="pt").input_ids
    tiny.plant_verdict_examples(model, ids)
    return tiny.save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-verdicts")


def _run(name: str, out: Path, folder: Path, **params) -> str:
    executed = out / "notebooks" / name
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        papermill.execute_notebook(
            str(ROOT / "notebooks" / name), str(executed), kernel_name="python3", cwd=str(ROOT),
            progress_bar=False, parameters={"model": str(folder), "output_dir": str(out),
                                            "cache_dir": str(out / "cache"), **SMALL, **params})
    return executed.read_text()


def test_super_weights_by_default_contributors_on_request(folder, tmp_path):
    candidates = [_candidate(layer, r, c, v) for v, (layer, r, c) in tiny.VERDICT_EXAMPLES.items()]
    detection = {"schema": "sw-detection/2", "model": "tiny-verdicts", "fingerprint": None,
                 "candidates": candidates, "super_weights": [candidates[0]],
                 "contributors": [candidates[1]], "verdict_rule": {"super_ratio": 2.0},
                 "groups": [], "iterations": []}
    out = tmp_path / "m"
    (out / "data").mkdir(parents=True)
    (out / "notebooks").mkdir()
    (out / "data" / f"detection_{TS}.json").write_text(json.dumps(detection))

    shown = _run("02_individual_ablation.ipynb", out, folder)
    assert "ablating 1 weight(s) with verdict super_weight" in shown
    summary = json.loads((out / "data" / f"individual_summary_{TS}.json").read_text())
    assert [(w["layer"], w["verdict"]) for w in summary["super_weights"]] == [(1, "super_weight")]
    assert len(list((out / "data" / "individual_analyses").glob("*.json"))) == 1

    shown = _run("03_combined_ablation.ipynb", out, folder, include_contributors=True)
    assert "ablating 2 weight(s) with verdict super_weight or contributor" in shown
    combined = json.loads((out / "data" / f"combined_analysis_{TS}.json").read_text())
    assert [(w["layer"], w["verdict"]) for w in combined["super_weights"]] == [
        (1, "super_weight"), (2, "contributor")]
    assert [a["super_weight"]["verdict"] for a in combined["individual"]] == [
        "super_weight", "contributor"]

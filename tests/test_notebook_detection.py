"""The detection notebook runs under papermill on a tiny planted model and writes valid JSON."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

import tiny

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_detection.ipynb"


def test_notebook_is_committed_clean_with_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")


def test_detection_notebook_on_a_tiny_planted_model(tmp_path, tokenizer, prompt_ids):
    """One weight of each verdict (tiny.plant_verdict_examples): the notebook judges them
    as planted, and the JSON says on which text and by which rule."""
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer))
    planted = tiny.plant_verdict_examples(model, prompt_ids)
    folder = tiny.save_tiny(model, tokenizer, tmp_path / "tiny-llama")
    out = tmp_path / "out"
    executed = tmp_path / "executed.ipynb"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # tiny model: one thread is faster
        pm.execute_notebook(str(NOTEBOOK), str(executed), kernel_name="python3",
                            progress_bar=False, cwd=str(tmp_path),
                            parameters={"model": str(folder), "output_dir": str(out),
                                        "run_timestamp": "20260101_120000",
                                        "reference_tokens": 128, "control_random": 1})
    data = json.loads((out / "data" / "detection_20260101_120000.json").read_text())
    assert data["schema"] == "sw-detection/2" and data["family"] == "llama"
    verdicts = {(w["layer"], w["row"], w["column"]): w["verdict"] for w in data["candidates"]}
    assert verdicts == {coord: v for v, coord in planted.items()}
    coords = {key: [(w["layer"], w["row"], w["column"]) for w in data[key]]
              for key in ("super_weights", "contributors")}
    assert coords == {"super_weights": [planted["super_weight"]],
                      "contributors": [planted["contributor"]]}
    assert data["super_weights"][0]["expert"] is None
    assert data["verdict_rule"]["super_ratio"] == 2.0 and data["verdict_rule"]["control_random"] == 1
    assert data["reference"]["n_tokens"] == 128 and "disjoint" in data["reference"]
    shown = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                    for c in nbformat.read(executed, as_version=4).cells
                    for o in c.get("outputs", []))
    assert "1 super weight(s), 1 contributor(s), 1 spike(s) with no effect" in shown
    for png in ("detection_iterations", "super_weight_distribution"):
        assert (out / "plots" / f"{png}_20260101_120000.png").read_bytes()[:4] == b"\x89PNG"

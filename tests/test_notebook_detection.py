"""The detection notebook runs under papermill on a tiny planted model and writes valid JSON."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill as pm

from sw_lib import tiny

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_detection.ipynb"


def test_notebook_is_committed_clean_with_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")


def test_detection_notebook_on_a_tiny_planted_model(tmp_path, tokenizer, prompt_ids):
    model = tiny.tiny_model("llama", vocab_size=len(tokenizer))
    tiny.plant_super_weight(model, layer=2, row=37, column=101, input_ids=prompt_ids)
    folder = tiny.save_tiny(model, tokenizer, tmp_path / "tiny-llama")
    out = tmp_path / "out"
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "executed.ipynb"), kernel_name="python3",
                        progress_bar=False, cwd=str(tmp_path),
                        parameters={"model": str(folder), "output_dir": str(out),
                                    "run_timestamp": "20260101_120000", "confirm": False})
    data = json.loads((out / "data" / "detection_20260101_120000.json").read_text())
    assert data["schema"] == "sw-detection/1" and data["family"] == "llama"
    assert [(w["layer"], w["row"], w["column"]) for w in data["super_weights"]] == [(2, 37, 101)]
    assert data["super_weights"][0]["expert"] is None
    for png in ("detection_iterations", "super_weight_distribution"):
        assert (out / "plots" / f"{png}_20260101_120000.png").read_bytes()[:4] == b"\x89PNG"

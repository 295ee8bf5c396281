"""Notebook 04 runs under papermill on a tiny saved MoE model and writes valid JSON and the plot."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from sw_lib import moe

import tiny
import tiny_moe
from conftest import make_tiny

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_moe_routing.ipynb"
PROMPT = "The company is a worldwide tech company."


def _strict(constant: str):
    raise ValueError(f"{constant} is not valid JSON")


def test_notebook_04_is_clean_and_parameterised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for name in ("model", "dtype", "device", "output_dir", "run_timestamp",
                 "router_analysis_samples", "tokens_per_text", "p_active_floor",
                 "co_spike_threshold", "control_sets", "control_match_pool", "confirm",
                 "spike_threshold", "spike_threshold_mode", "relative_spike_factor",
                 "max_iterations", "prompt", "seed", "perplexity_samples", "accuracy_tasks"):
        assert f"\n{name} = " in "\n" + code[0].source, name


@pytest.mark.slow
def test_notebook_04_on_a_tiny_planted_moe_model(tmp_path, tokenizer, monkeypatch):
    # One intra-op thread in the kernel: a tiny model gains nothing from more, and on a shared
    # 2-core machine their spin-waits slow the run several times over.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lm = make_tiny("qwen2_moe", tokenizer)
    planted = tiny_moe.plant_super_expert(lm.model, moe.calibration_ids(tokenizer, 4, 32))
    folder = tiny.save_tiny(lm.model, tokenizer, tmp_path / "tiny-qwen2-moe")
    out_dir = tmp_path / "results" / "tiny-qwen2-moe"
    ts = "20250102_030405"
    pm.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "04_out.ipynb"), kernel_name="python3", progress_bar=False,
        cwd=str(tmp_path),
        parameters=dict(model=str(folder), dtype="float32", device="cpu", output_dir=str(out_dir),
                        run_timestamp=ts, router_analysis_samples=4, tokens_per_text=32,
                        prompt=PROMPT, control_sets=2, reference_tokens=128, seed=5,
                        perplexity_samples=3, seq_len=64, accuracy_tasks=["arc_easy"],
                        accuracy_samples=8, cache_dir=str(tmp_path / "cache")))

    data = json.loads((out_dir / "data" / f"moe_analysis_{ts}.json").read_text(),
                      parse_constant=_strict)
    assert data["schema"] == "sw-moe/2" and data["is_moe"] and data["run_timestamp"] == ts
    assert data["family"] == "qwen2_moe" and data["moe_layers"] == [0, 1, 2, 3]
    assert data["calibration"] == {"source": moe.texts.SOURCE, "count": 4, "tokens_per_text": 32,
                                   "tokens": 128}
    for layer in data["routing"]:
        assert abs(sum(layer["p_active"]) - data["top_k"]) < 1e-9
        assert layer["tokens"] == 4 * 32 and layer["sink"]["texts"] == 4
    assert len(data["expert_maxima"]) == 4 * 8 + 4  # routed experts + one shared per layer
    rule = data["super_experts"]
    population = [m["max_output"] for m in data["expert_maxima"]
                  if m["layer"] < rule["layer_limit"] and m["tokens"] > 0]
    assert rule["layer_limit"] == 3 and rule["global_max"] == max(population)
    assert rule["global_threshold"] == max(population) // 10
    assert [(m["layer"], m["expert"], m["shared"], m["output_channel"], m["input_channel"],
             m["verdict"]) for m in rule["flagged"]] == [
        (planted["layer"], planted["expert"], False, planted["row"], planted["column"],
         "super_weight")]
    sets = data["controls"]["sets"]
    assert data["controls"]["seed"] == 5 and len(sets) == 2
    assert all(c["layer"] == planted["layer"] and c["expert"] != planted["expert"]
               for cs in sets for c in cs)
    skipping = data["skip_evaluation"]
    assert skipping["super_experts"]["perplexity_impact"]["impact_severity"] == "catastrophic"
    assert all(c["perplexity_impact"]["impact_severity"] != "catastrophic"
               for c in skipping["controls"])
    assert set(skipping["super_experts"]["accuracy_impacts"]) == {"arc_easy"}
    for name in ("moe_analysis", "super_experts_skipped"):
        png = out_dir / "plots" / f"{name}_{ts}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

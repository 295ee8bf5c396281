"""Notebook 04 runs under papermill on a tiny saved MoE model and writes valid JSON and the plot."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from sw_lib import ablate, moe

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
                 "router_analysis_samples", "p_active_floor", "co_spike_threshold",
                 "enable_causal_scoring", "spike_threshold", "max_iterations", "prompt"):
        assert f"\n{name} = " in "\n" + code[0].source, name


def test_notebook_04_on_a_tiny_planted_moe_model(tmp_path, tokenizer, monkeypatch):
    # One intra-op thread in the kernel: a tiny model gains nothing from more, and on a shared
    # 2-core machine their spin-waits slow the run several times over.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lm = make_tiny("qwen2_moe", tokenizer)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    tiny_moe.plant_expert_super_weight(lm.model, 1, row=7, column=5, input_ids=ids, expert=3)
    tiny_moe.plant_expert_super_weight(lm.model, 2, row=11, column=9, input_ids=ids, shared=True)
    folder = tiny.save_tiny(lm.model, tokenizer, tmp_path / "tiny-qwen2-moe")
    out_dir = tmp_path / "results" / "tiny-qwen2-moe"
    ts = "20250102_030405"
    pm.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "04_out.ipynb"), kernel_name="python3", progress_bar=False,
        cwd=str(tmp_path),
        parameters=dict(model=str(folder), dtype="float32", device="cpu", output_dir=str(out_dir),
                        run_timestamp=ts, router_analysis_samples=4, tokens_per_text=32,
                        prompt=PROMPT, enable_causal_scoring=True, control_seeds=2,
                        reference_tokens=64))

    data = json.loads((out_dir / "data" / f"moe_analysis_{ts}.json").read_text(),
                      parse_constant=_strict)
    assert data["schema"] == "sw-moe/1" and data["is_moe"] and data["run_timestamp"] == ts
    assert data["family"] == "qwen2_moe" and data["moe_layers"] == [0, 1, 2, 3]
    assert data["texts"] == {"source": "wikitext-2-raw-v1/test paragraphs", "count": 4,
                             "tokens_per_text": 32}
    for layer in data["routing"]:
        assert abs(sum(layer["p_active"]) - data["top_k"]) < 1e-9
        assert layer["tokens"] == 4 * 32 and layer["sink"]["texts"] == 4
    coords = {(w["layer"], w["expert"], w["shared"], w["row"], w["column"])
              for w in data["expert_super_weights"]}
    assert coords == {(1, 3, False, 7, 5), (2, None, True, 11, 9)}
    # each weight's loss ratio is its own ablation's on the reference text (brute force here)
    ref = moe.reference_ids(tokenizer, 64)
    baseline = moe.reference_loss(lm.model, ref)
    for w in data["expert_super_weights"]:
        with ablate.zeroed(lm.model, [w]):
            assert w["loss_ratio"] == pytest.approx(moe.reference_loss(lm.model, ref) / baseline,
                                                    rel=1e-5)
    rule = data["super_experts"]
    maxima = [m["max_output"] for m in data["expert_maxima"] if m["layer"] < rule["layer_limit"]]
    assert rule["layer_limit"] == 3.0 and rule["global_threshold"] == pytest.approx(0.1 * max(maxima))
    # the planted shared expert of layer 2 writes the largest output below the layer limit:
    # it, and only it, clears both thresholds
    assert [(m["layer"], m["expert"], m["shared"], m["output_channel"], m["input_channel"])
            for m in rule["flagged"]] == [(2, None, True, 11, 9)]
    flagged = rule["flagged"][0]
    assert flagged["max_output"] == max(maxima)
    assert flagged["max_output"] > max(rule["percentile_threshold"], rule["global_threshold"])
    assert len(data["expert_maxima"]) == 4 * 8 + 4  # routed experts + one shared per layer
    causal = data["causal"]["super_experts"]
    assert len(causal["experts"]) == len(rule["flagged"]) and causal["seeds"] == 2
    png = out_dir / "plots" / f"moe_analysis_{ts}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

"""Issue 11 item 5: `sw-analyze` on a tiny MoE model given as a .gguf file, with a planted super
expert, beside a tiny dense model: every stage runs (01-04, 06, 07 for the MoE model; 01-03, 06, 07 for
the dense one; 05 for both), with the real notebooks."""
from __future__ import annotations

import pytest
import torch

from sw_lib import cli, models, moe, results, stages

import tiny
import tiny_moe

MOE_SLUG, DENSE_SLUG = "tiny-qwen3moe", "tiny-llama"
RUN = ["--perplexity-samples", "2", "--seq-len", "32", "--accuracy-samples", "4",
       "--accuracy-tasks", "arc_easy", "--max-iterations", "2", "--reference-tokens", "128",
       "--router-analysis-samples", "4", "--tokens-per-text", "32", "--control-sets", "2",
       "--device", "cpu", "--dtype", "float32", "-q"]


def _planted_gguf(folder) -> tuple[str, dict, torch.nn.Module]:
    """A tiny Qwen3-MoE with a planted super expert, written as a GGUF file (planted with the
    ids of the tokenizer the file carries, which a first, unplanted file gives)."""
    model = tiny_moe.gguf_qwen3_moe()
    tiny_moe.write_gguf(model, folder / "unplanted.gguf")
    tokenizer = models.load_model(str(folder / "unplanted.gguf"), dtype="float32",
                                  device="cpu").tokenizer
    planted = tiny_moe.plant_super_expert(model, moe.calibration_ids(tokenizer, 4, 32))
    path = folder / f"{MOE_SLUG}.gguf"
    tiny_moe.write_gguf(model, path)
    return str(path), planted, model


@pytest.mark.slow
def test_a_moe_model_given_as_gguf_loads_with_its_weights(tmp_path):
    path, _, original = _planted_gguf(tmp_path)
    lm = models.load_model(path, dtype="float32", device="cpu")
    assert lm.family.name == "qwen3_moe" and lm.model.config.num_experts == 8
    ids = lm.tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 256  # the one merge, "Th"
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, original(ids).logits)


@pytest.mark.slow
def test_sw_analyze_runs_every_stage_on_a_planted_moe_gguf_beside_a_dense_model(
        tmp_path, tokenizer, prompt_ids, monkeypatch):
    moe_path, planted, _ = _planted_gguf(tmp_path)
    dense = tiny.tiny_model("llama", vocab_size=len(tokenizer), seed=1)
    tiny.plant_super_weight(dense, 1, 7, 11, prompt_ids)
    dense_path = str(tiny.save_tiny(dense, tokenizer, tmp_path / DENSE_SLUG))
    root = tmp_path / "results"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = cli.main(["--models", moe_path, dense_path, "--results-dir", str(root),
                     "--reports-dir", str(tmp_path / "reports"),
                     "--cache-dir", str(tmp_path / "cache"), *RUN])
    assert code == 0
    ts = results.latest_timestamp(root)
    complete = results.read_json(root / f"complete_analysis_{ts}.json")
    assert complete["status"] == "ok" and results.validation_errors(complete) == []
    assert complete["stages"]["05_cross_model_comparison"]["status"] == "ok"
    assert {m["slug"] for m in complete["comparison"]["models"]} == {MOE_SLUG, DENSE_SLUG}

    analysis = results.read_json(results.ModelPaths(root / MOE_SLUG, ts).analysis_json)
    assert analysis["is_moe"] and results.validation_errors(analysis) == []
    assert {s.name: analysis["stages"][s.name]["status"] for s in stages.STAGES
            if s.name in analysis["stages"]} == {
        "01_detection": "ok", "02_individual_ablation": "ok", "03_combined_ablation": "ok",
        "04_moe_routing": "ok", "06_mechanisms": "ok", "07_quantization": "ok"}
    # notebook 01 finds the expert super weight the super expert holds, and 02/03 ablate it
    found = [(w["layer"], w["expert"], w["row"], w["column"])
             for w in analysis["detection"]["super_weights"]]
    assert (planted["layer"], planted["expert"], planted["row"], planted["column"]) in found
    doc = results.read_json(results.ModelPaths(root / MOE_SLUG, ts).moe_json)
    (flagged,) = doc["super_experts"]["flagged"]
    assert (flagged["layer"], flagged["expert"], flagged["verdict"]) == (
        planted["layer"], planted["expert"], "super_weight")
    skipping = doc["skip_evaluation"]
    assert skipping["super_experts"]["perplexity_impact"]["impact_severity"] == "catastrophic"
    assert all(c["perplexity_impact"]["impact_severity"] != "catastrophic"
               for c in skipping["controls"])

    dense_analysis = results.read_json(results.ModelPaths(root / DENSE_SLUG, ts).analysis_json)
    assert dense_analysis["stages"]["04_moe_routing"]["status"] == "skipped"
    assert dense_analysis["stages"]["03_combined_ablation"]["status"] == "ok"

"""Notebooks 06 and 07 under papermill on a tiny Llama with planted super weights: the JSON
they write holds the trace at the planted channels, the restore, a scaling curve whose factor
1 is the baseline, and quantization results equal to evaluating the same edits directly."""
from __future__ import annotations

import json
from pathlib import Path

import papermill
import pytest
from test_notebooks_ablation import PROMPT, TS, _detection, _png_ok, _weight

from sw_lib import edits, evaluate, models
from sw_lib.config import default
from sw_lib.edits import WeightQuantization, scale, zero

ROOT = Path(__file__).resolve().parents[1]
PLANTED = [{"layer": 1, "row": 5, "column": 7}, {"layer": 2, "row": 11, "column": 20}]
SMALL = dict(perplexity_samples=2, seq_len=32, accuracy_samples=3, batch_size=4,
             dtype="float32", device="cpu", run_timestamp=TS, prompt=PROMPT)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """Each super weight acts only through its MLP channel at the first token (ReLU MLP)."""
    from tiny import plant_first_token_super_weight, save_tiny, tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_act="relu")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    for w in PLANTED:
        plant_first_token_super_weight(model, w["layer"], w["row"], w["column"], ids)
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-planted")


def _run(name: str, out: Path, folder: Path, cache: Path, **params) -> dict:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        papermill.execute_notebook(
            str(ROOT / "notebooks" / name), str(out / "notebooks" / name), kernel_name="python3",
            cwd=str(ROOT), progress_bar=False,
            parameters={"model": str(folder), "output_dir": str(out), "cache_dir": str(cache),
                        **params})


@pytest.mark.slow
def test_notebooks_06_and_07_on_a_planted_tiny_model(tiny_folder, tmp_path):
    lm = models.load_model(str(tiny_folder), dtype="float32", device="cpu")
    out, cache = tmp_path / "tiny-planted", tmp_path / "eval"
    (out / "data").mkdir(parents=True)
    (out / "notebooks").mkdir()
    weights = [_weight(w) for w in PLANTED]
    (out / "data" / f"detection_{TS}.json").write_text(json.dumps(_detection(lm, weights)))

    _run("06_mechanisms.ipynb", out, tiny_folder, cache, **SMALL, restore_tasks=["arc_easy"],
         scaling_factors=[0.0, 1.0, 2.0], reference_tokens=64)
    doc = json.loads((out / "data" / f"mechanisms_{TS}.json").read_text())
    assert doc["schema"] == "sw-mechanisms/1"
    traced = {(a["channel"], a["token"]) for a in doc["trace"]["activations"]}
    assert traced == {(5, 0), (11, 0)}  # each planted super activation, at the first token
    assert {(a["channel"], a["born"]["layer"]) for a in doc["trace"]["activations"]} == \
        {(5, 1), (11, 2)}
    restore = doc["restore"]
    assert [r["layer"] for r in restore["restores"]] == [1, 2]
    assert restore["conditions"]["restored"]["accuracy"].keys() == {"arc_easy"}
    # the restored condition is the zeroing plus the hooks the JSON describes, evaluated
    restores = [edits.from_dict(r) for r in restore["restores"]]
    assert [r.values for r in restores] == [(6.0,), (6.0,)]
    direct = evaluate.perplexity(lm, zero(PLANTED) + restores, seq_len=32, n_windows=2,
                                 cache=False, progress=False)
    assert restore["conditions"]["restored"]["perplexity"] == pytest.approx(direct["perplexity"],
                                                                            rel=1e-6)
    assert restore["recovery"]["perplexity"] is not None
    points = {p["factor"]: p for p in doc["scaling"]["points"]}
    baseline = evaluate.perplexity(lm, seq_len=32, n_windows=2, cache=False, progress=False)
    assert points[1.0]["same_as_baseline"] and points[1.0]["perplexity"] == baseline["perplexity"]
    doubled = evaluate.perplexity(lm, scale(PLANTED, 2.0), seq_len=32, n_windows=2, cache=False,
                                  progress=False)
    assert points[2.0]["perplexity"] == pytest.approx(doubled["perplexity"], rel=1e-6)
    assert points[0.0]["perplexity"] == restore["conditions"]["zeroed"]["perplexity"]
    shift = doc["stop_words"]
    assert shift["predicted_tokens"] == 63 and 0 <= shift["original"]["stop_word_mass"] <= 1
    for name in ("super_activation_trace", "scaling_curve", "stop_words"):
        _png_ok(out / "plots" / f"{name}_{TS}.png")

    _run("07_quantization.ipynb", out, tiny_folder, cache, seq_len=32, batch_size=4,
         dtype="float32", device="cpu", run_timestamp=TS, weight_bits=[4, 3],
         block_sizes=[16, "tensor"], quantization_windows=2)
    doc = json.loads((out / "data" / f"quantization_{TS}.json").read_text())
    assert doc["schema"] == "sw-quantization/1"
    grid = {(p["bits"], p["block_size"], p["variant"]): p for p in doc["weights"]["points"]}
    assert len(grid) == 2 * 2 * 2
    aware = grid[(3, "tensor", "super_weight_aware")]
    direct = evaluate.perplexity(
        lm, [WeightQuantization.super_weight_aware(3, "tensor", default("quantization.clip_z"),
                                                   PLANTED)], seq_len=32,
        n_windows=2, cache=False, progress=False)
    assert aware["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert aware["edit"]["keep"] == [{**w, "expert": None, "shared": False} for w in PLANTED]
    assert {p["variant"] for p in doc["activations"]["points"]} == {"naive", "hold_out"}
    assert doc["activations"]["hold_out"] == [{"layer": 1, "column": 7}, {"layer": 2, "column": 20}]
    _png_ok(out / "plots" / f"weight_quantization_{TS}.png")

"""The pipeline's mechanics with real papermill and small stand-in notebooks.

The stand-ins for 01-03 follow the notebook contract (parameters cell, files written under
output_dir, a figure shown) without running a model, so these tests check what the pipeline
itself does -- parameter filtering, the results tree, stage records, failures, resume, HTML
export, the index page -- in seconds. The real notebooks run in tests/test_cli.py. Notebook 05
here is the real one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from sw_lib import config, pipeline, reports, results
from sw_lib.plots import comparison

REPO = Path(__file__).resolve().parents[1]

HEADER = '''import json, time
from pathlib import Path
import matplotlib.pyplot as plt
out = Path(output_dir)
marker = out / f"FAIL_{STAGE}"
if marker.exists():
    raise RuntimeError(f"simulated failure of {STAGE}: " + marker.read_text())
def write(path, data):
    path = out / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
'''

STAGES = {
    "01_detection": ('model = ""\noutput_dir = ""\nrun_timestamp = ""\nspike_threshold = 1.0\n'
                     'super_ratio = 9.9  # perplexity ratio (zeroed / unchanged) >= this\n'
                     'undeclared_default = 7', '''
cfg = json.loads((Path(model) / "config.json").read_text())
weights = [{"layer": 1, "row": 3, "column": 5, "expert": None, "shared": False},
           {"layer": 2, "row": 3, "column": 9, "expert": None, "shared": False}]
write(f"data/detection_{run_timestamp}.json",
      {"schema": "sw-detection/1", "model": model, "num_layers": cfg["num_hidden_layers"],
       "super_weights": weights, "spike_threshold": spike_threshold,
       "super_ratio": super_ratio,
       "saw_accuracy_samples": "accuracy_samples" in globals(),
       "undeclared_default": undeclared_default})
fig, ax = plt.subplots(); ax.plot([0, 1], [0, spike_threshold])
fig.savefig(out / "plots" / "detection_iterations.png"); plt.show()
'''),
    "02_individual_ablation": ('model = ""\noutput_dir = ""\nrun_timestamp = ""\n'
                               'accuracy_samples = 1', '''
det = json.loads((out / "data" / f"detection_{run_timestamp}.json").read_text())
for i, w in enumerate(det["super_weights"]):
    write(f"data/individual_analyses/sw_{i}_analysis_{run_timestamp}.json",
          {"index": i, "super_weight": w,
           "perplexity_impact": {"perplexity_ratio": 2.0 + i},
           "accuracy_impacts": {"hellaswag": {"accuracy_drop": 0.1 * (i + 1)}}})
fig, ax = plt.subplots(); ax.bar([0, 1], [1, accuracy_samples]); plt.show()
'''),
    "03_combined_ablation": ('model = ""\noutput_dir = ""\nrun_timestamp = ""', '''
write(f"data/combined_analysis_{run_timestamp}.json",
      {"perplexity_impact": {"baseline_perplexity": 10.0, "modified_perplexity": 80.0,
                             "perplexity_ratio": 8.0, "impact_severity": "severe"},
       "accuracy_impacts": {"hellaswag": {"baseline_accuracy": 0.5, "accuracy_drop": 0.25}}})
'''),
}


def _notebook(parameters: str, body: str, stage: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(
        f"STAGE = {stage!r}\n" + HEADER + body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def stand_in_notebooks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stage, (parameters, body) in STAGES.items():
        nbformat.write(_notebook(parameters, body, stage), str(folder / f"{stage}.ipynb"))
    shutil.copy(REPO / "notebooks" / "05_cross_model_comparison.ipynb", folder)
    return folder


def tiny_folder(path: Path, layers: int = 4) -> str:
    """A local model folder as far as resolving goes: a real llama config.json."""
    from sw_lib import tiny

    tiny.tiny_config("llama", vocab_size=128, num_hidden_layers=layers).save_pretrained(path)
    return str(path)


def _analysis(result, slug):
    return results.read_json(results.ModelPaths(result.results_dir / slug, result.ts).analysis_json)


def _mtimes(root: Path) -> dict[Path, int]:
    """Modification times of the files a stage produces (not the JSON the pipeline rewrites)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and (p.suffix in (".ipynb", ".html", ".png")
                                or p.parent.name == "individual_analyses"
                                or p.name.startswith(("detection_", "combined_")))}


def test_run_records_and_resume_redoes_only_unfinished_work(tmp_path):
    notebooks = stand_in_notebooks(tmp_path / "notebooks")
    results_dir = tmp_path / "results"
    overrides = {"models": [tiny_folder(tmp_path / "m")], "results_dir": str(results_dir),
                 "detection.spike_threshold": 42.0, "evaluation.accuracy_samples": 3}
    cfg = config.load(overrides=overrides)
    (results_dir / "m").mkdir(parents=True)
    (results_dir / "m" / "FAIL_03_combined_ablation").write_text("disk full")
    first = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False))
    assert first.failures == [f"{overrides['models'][0]}: 03_combined_ablation: "
                              "RuntimeError: simulated failure of 03_combined_ablation: disk full"]
    m = results.ModelPaths(results_dir / "m", first.ts)
    analysis = _analysis(first, "m")
    assert results.validation_errors(analysis) == []
    stages = analysis["stages"]
    assert [stages[s]["status"] for s in ("resolve", *results.MODEL_STAGES)] == \
        ["ok", "ok", "ok", "failed", "skipped"]
    assert stages["04_moe_routing"]["reason"] == "not a mixture-of-experts model"
    assert stages["01_detection"]["outputs"] == \
        [f"data/detection_{first.ts}.json", "plots/detection_iterations.png"]
    assert stages["01_detection"]["seconds"] > 0 and analysis["status"] == "failed"
    assert analysis["family"] == "llama" and analysis["is_moe"] is False
    assert analysis["config"] == cfg and len(analysis["individual"]) == 2
    assert {"torch", "transformers", "sw_lib"} <= set(analysis["versions"])
    log = m.log_file.read_text()
    assert "disk full" in log and "02_individual_ablation" in log

    # Each notebook got the parameters its parameters cell declares, and only those.
    detection = results.read_json(m.detection_json)
    assert detection["spike_threshold"] == 42.0
    assert detection["super_ratio"] == cfg["detection"]["super_ratio"]  # '=' in a comment
    assert detection["saw_accuracy_samples"] is False  # not declared by 01: not injected
    assert detection["undeclared_default"] == 7  # nothing to supply: the notebook's default
    assert set(stages["01_detection"]["parameters"]) == {
        "model", "output_dir", "run_timestamp", "spike_threshold", "super_ratio"}
    assert stages["02_individual_ablation"]["parameters"]["accuracy_samples"] == 3
    before = _mtimes(results_dir)

    # The problem is fixed, and one of 02's files went missing: 01 is kept, 02 and 03 redone.
    (results_dir / "m" / "FAIL_03_combined_ablation").unlink()
    m.individual_json(1).unlink()
    resume = pipeline.Options(notebooks_dir=notebooks, html=False, resume=True)
    second = pipeline.run(cfg, resume)
    assert second.ok and second.ts == first.ts
    after = _mtimes(results_dir)
    for kept in (m.notebook("01_detection"), m.detection_json, m.plots / "detection_iterations.png"):
        assert after[kept] == before[kept], kept
    for redone in (m.notebook("02_individual_ablation"), m.individual_json(0),
                   m.notebook("03_combined_ablation")):
        assert after[redone] != before[redone], redone
    assert m.individual_json(1).is_file() and m.combined_json.is_file()
    stages = _analysis(second, "m")["stages"]
    assert stages["01_detection"]["reused"] is True
    assert [stages[s]["status"] for s in results.MODEL_STAGES[:3]] == ["ok"] * 3
    assert "reused" not in stages["02_individual_ablation"]
    complete = results.read_json(second.complete_json)
    assert complete["status"] == "ok" and results.validation_errors(complete) == []
    assert complete["comparison"]["models"][0]["perplexity_ratio"] == 8.0

    # Nothing left to do: every produced file stays as it was, 05 included.
    third = pipeline.run(cfg, resume)
    assert third.ok and _mtimes(results_dir) == after
    assert results.read_json(third.complete_json)["stages"]["05_cross_model_comparison"]["reused"]

    # A changed detection parameter redoes 01 and, because they read its output, 02 and 03.
    fourth = pipeline.run(config.load(overrides={**overrides, "detection.spike_threshold": 9.0}),
                          resume)
    assert fourth.ok and fourth.ts == first.ts
    stages = _analysis(fourth, "m")["stages"]
    assert not any(stages[s].get("reused") for s in results.MODEL_STAGES[:3])
    assert results.read_json(m.detection_json)["spike_threshold"] == 9.0
    assert all(_mtimes(results_dir)[p] != after[p] for p in
               (m.notebook("02_individual_ablation"), m.notebook("03_combined_ablation")))


def test_missing_notebook_is_a_failed_stage(tmp_path):
    record = pipeline.execute(tmp_path / "03_combined_ablation.ipynb", tmp_path / "out.ipynb",
                              None, {}, tmp_path)
    assert record["status"] == "failed" and "03_combined_ablation.ipynb not found" in record["error"]


def test_moe_model_gets_the_moe_stage(tmp_path, monkeypatch):
    """A qwen2_moe config routes to 04_moe_routing, whose file lands in the analysis; the
    other notebooks are absent here, so those stages fail fast and 02/03 are skipped.
    The model is given as a relative path: the kernel (running elsewhere) still finds it."""
    from sw_lib import tiny

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()

    def moe_notebook(file_name: str):
        nbformat.write(_notebook('model = ""\noutput_dir = ""\nrun_timestamp = ""\n'
                                 'router_analysis_samples = 1', f'''
write(f"data/{file_name}",
      {{"router_analysis_samples": router_analysis_samples,
        "model_found": (Path(model) / "config.json").is_file(),
        "super_experts": {{"flagged": [{{"layer": 1, "expert": 2}}]}},
        "expert_super_weights": []}})
''', "04_moe_routing"), str(notebooks / "04_moe_routing.ipynb"))

    tiny.tiny_config("qwen2_moe", vocab_size=128).save_pretrained(tmp_path / "moe")
    monkeypatch.chdir(tmp_path)
    cfg = config.load(overrides={"models": ["./moe"], "results_dir": str(tmp_path / "r"),
                                 "moe.router_analysis_samples": 5})
    # A notebook that runs fine but does not write its contract file has failed.
    moe_notebook("moe_analysis_{run_timestamp}_v2.json")
    first = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False))
    stage = _analysis(first, "moe")["stages"]["04_moe_routing"]
    assert stage["status"] == "failed"
    assert stage["error"] == f"finished without writing data/moe_analysis_{first.ts}.json"

    moe_notebook("moe_analysis_{run_timestamp}.json")
    result = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False, resume=True))
    analysis = _analysis(result, "moe")
    assert results.validation_errors(analysis) == []
    assert analysis["family"] == "qwen2_moe" and analysis["is_moe"] is True
    stages = analysis["stages"]
    assert stages["04_moe_routing"]["status"] == "ok"
    assert analysis["moe"]["router_analysis_samples"] == 5 and analysis["moe"]["model_found"]
    assert stages["04_moe_routing"]["parameters"]["model"] == str(tmp_path / "moe")
    assert stages["01_detection"]["status"] == "failed"
    assert stages["02_individual_ablation"] == results.stage_record(
        "skipped", reason="01_detection did not succeed")
    complete = results.read_json(result.complete_json)
    assert complete["stages"]["05_cross_model_comparison"]["status"] == "failed"
    assert complete["comparison"] is None and results.validation_errors(complete) == []


def test_probe_reads_family_without_weights(tmp_path):
    from sw_lib import tiny

    dense = tiny_folder(tmp_path / "dense")
    moe_dir = tmp_path / "moe"
    tiny.tiny_config("qwen2_moe", vocab_size=128).save_pretrained(moe_dir)
    assert pipeline.probe(dense) == ("llama", False)
    assert pipeline.probe(str(moe_dir)) == ("qwen2_moe", True)
    with pytest.raises(Exception, match="does not exist"):
        pipeline.probe(str(tmp_path / "nope"))
    with pytest.raises(Exception, match="Unsupported architecture 'bert'"):
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
        pipeline.probe(str(tmp_path / "bert"))


def test_probe_reads_the_gguf_header(tmp_path):
    """GGUF files: the header's architecture and expert count, past the tokenizer arrays."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = str(tmp_path / "moe.gguf")
    writer = gguf.GGUFWriter(path, "qwen2moe")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5])
    writer.add_expert_count(4)
    writer.add_string("general.name", "tiny")
    writer.add_tensor("x", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert pipeline.gguf_metadata(path) == {"general.architecture": "qwen2moe",
                                            "qwen2moe.expert_count": 4, "general.name": "tiny"}
    assert pipeline.probe(path) == ("qwen2_moe", True)
    from sw_lib import models

    try:  # the default alias, when its package is installed
        models.resolve("smollm2-135m")
    except models.ModelLoadError:
        return
    assert pipeline.probe("smollm2-135m") == ("llama", False)


def test_latest_timestamp_and_slugs(tmp_path):
    assert results.latest_timestamp(tmp_path) is None
    for ts in ("20240101_000000", "20250102_030405"):
        results.write_json(tmp_path / "m" / "data" / f"analysis_{ts}.json", {})
    (tmp_path / "m" / "data" / "notes_2026.json").write_text("{}")
    assert results.latest_timestamp(tmp_path) == "20250102_030405"
    assert results.unique_slugs(["org/model", "/x/org_model", "a.gguf", "/p/a.gguf"]) == \
        ["org_model", "org_model-2", "a", "a-2"]


def test_write_json_is_atomic_and_strict(tmp_path):
    path = tmp_path / "x.json"
    results.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        results.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}  # the old content survives a failed write
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind
    results.write_json(path, {"inf": float("inf"), "nan": float("nan")})
    assert json.loads(path.read_text()) == {"inf": None, "nan": None}


def test_schema_rejects_broken_documents(tmp_path):
    from sw_lib import config as config_mod

    paths = results.ModelPaths(tmp_path / "m", "20250101_000000")
    results.write_json(paths.detection_json, {"num_layers": 4, "super_weights": [
        {"layer": 1, "row": 3, "column": 5, "expert": None, "shared": False}]})
    stages = {s: results.stage_record("ok", None, 1.0) for s in ("resolve", *results.MODEL_STAGES)}
    good = results.assemble_analysis(paths, model="m", family="llama", is_moe=False,
                                     config=config_mod.load(), stages=stages)
    assert results.validation_errors(good) == []
    broken = json.loads(json.dumps(good))
    broken["stages"]["01_detection"]["status"] = "done"
    broken["detection"]["super_weights"][0]["row"] = -1
    del broken["config"]["runtime"]["seed"]
    errors = results.validation_errors(broken)
    assert any("01_detection/status" in e for e in errors)
    assert any("super_weights/0/row" in e for e in errors)
    assert any("runtime" in e and "seed" in e for e in errors)
    failed = json.loads(json.dumps(good))
    failed["stages"]["02_individual_ablation"].update(status="failed", error=None)
    assert results.validation_errors(failed)
    del failed["stages"]["04_moe_routing"]
    assert any("04_moe_routing" in e for e in results.validation_errors(failed))


def test_comparison_of_one_model_and_shared_columns(tmp_path):
    weights = [{"layer": 2, "row": 525, "column": 808}, {"layer": 2, "row": 1693, "column": 808},
               {"layer": 4, "row": 525, "column": 2723}]
    analysis = {"slug": "phi", "model": "phi", "status": "ok", "family": "phi3",
                "detection": {"num_layers": 32, "super_weights": weights},
                "individual": [], "combined": None}
    summary = comparison.summarize([analysis])
    model = summary["models"][0]
    assert model["shared_columns"] == [{"layer": 2, "column": 808, "count": 2,
                                        "rows": [525, 1693]}]
    assert model["shared_rows"] == [{"row": 525, "count": 2, "layers": [2, 4]}]
    assert model["perplexity_ratio"] is None
    assert summary["statistics"]["relative_depth"]["max"] == 4 / 32
    fig = comparison.plot_model_comparison(summary, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000 and len(fig.axes) == 4


def test_index_covers_several_results_dirs(tmp_path):
    for name in ("a", "b"):
        page = tmp_path / name / "m" / "reports" / "01_detection_20250101_000000.html"
        page.parent.mkdir(parents=True)
        page.write_text("<html></html>")
        reports.write_index(tmp_path / "reports", tmp_path / name)
    index = (tmp_path / "reports" / "index.html").read_text()
    assert 'href="../a/m/reports/01_detection_20250101_000000.html"' in index
    assert 'href="../b/m/reports/01_detection_20250101_000000.html"' in index
    assert reports.default_reports_dir(REPO / "results") == REPO / "reports"

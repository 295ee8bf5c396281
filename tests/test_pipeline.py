"""The pipeline's mechanics with real papermill and small stand-in notebooks.

The stand-ins for 01-03 follow the notebook contract (parameters cell, files written under
output_dir, a figure shown) without running a model, so these tests check what the pipeline
itself does -- parameter filtering, the results tree, stage records, failures, resume, HTML
export, the index page -- in seconds. The real notebooks run in tests/test_cli.py. Notebook 05
here is the real one.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from sw_lib import config, pipeline, reports, results
from sw_lib.plots import comparison

REPO = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r'<img [^>]*src="data:image/png;base64,')  # a figure inlined by nbconvert

HEADER = '''import json, time
from pathlib import Path
import matplotlib.pyplot as plt
out = Path(output_dir)
marker = out.parent / f"FAIL_{STAGE}"
if marker.exists():
    raise RuntimeError(f"simulated failure of {STAGE}: " + marker.read_text())
def write(path, data):
    path = out / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
'''

STAGES = {
    "01_detection": ('model = ""\noutput_dir = ""\nrun_timestamp = ""\nspike_threshold = 1.0\n'
                     'undeclared_default = 7', '''
cfg = json.loads((Path(model) / "config.json").read_text())
weights = [{"layer": 1, "row": 3, "column": 5, "expert": None, "shared": False},
           {"layer": 2, "row": 3, "column": 9, "expert": None, "shared": False}]
write(f"data/detection_{run_timestamp}.json",
      {"schema": "sw-detection/1", "model": model, "num_layers": cfg["num_hidden_layers"],
       "super_weights": weights, "spike_threshold": spike_threshold,
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


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One good model and one that does not exist; stand-in notebooks."""
    tmp = tmp_path_factory.mktemp("pipeline")
    notebooks = stand_in_notebooks(tmp / "notebooks")
    models = [tiny_folder(tmp / "tiny-a"), str(tmp / "missing-model")]
    cfg = config.load(overrides={"models": models, "results_dir": str(tmp / "results"),
                                 "detection.spike_threshold": 42.0,
                                 "evaluation.accuracy_samples": 3})
    result = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks))
    return tmp, cfg, notebooks, result


def _analysis(result, slug):
    return results.read_json(results.ModelPaths(result.results_dir / slug, result.ts).analysis_json)


def test_tree_records_and_one_timestamp(first_run):
    tmp, cfg, notebooks, result = first_run
    ts = result.ts
    assert results.is_timestamp(ts)
    root = result.results_dir
    paths = results.ModelPaths(root / "tiny-a", ts)
    analysis = _analysis(result, "tiny-a")
    assert results.validation_errors(analysis) == []
    assert [analysis["stages"][s]["status"] for s in ("resolve", *results.MODEL_STAGES)] == \
        ["ok", "ok", "ok", "ok", "skipped"]
    assert analysis["stages"]["04_moe_routing"]["reason"] == "not a mixture-of-experts model"
    assert analysis["family"] == "llama" and analysis["is_moe"] is False
    assert len(analysis["individual"]) == 2 and analysis["combined"]["perplexity_impact"]
    assert analysis["config"] == cfg
    assert {"torch", "transformers", "sw_lib"} <= set(analysis["versions"])
    for stage in results.MODEL_STAGES[:3]:
        assert paths.notebook(stage).is_file() and paths.report(stage).is_file()
        assert analysis["stages"][stage]["seconds"] > 0
    assert analysis["stages"]["01_detection"]["outputs"] == \
        [f"data/detection_{ts}.json", "plots/detection_iterations.png"]
    log = paths.log_file.read_text()
    assert "01_detection" in log and "03_combined_ablation" in log
    assert [p.name for p in paths.individual_jsons()] == \
        [f"sw_0_analysis_{ts}.json", f"sw_1_analysis_{ts}.json"]
    # every timestamped file of the run carries the same timestamp
    stamped = [p for p in root.rglob("*") if p.is_file() and results._TS.search(p.name)]
    assert len(stamped) >= 5 + 3 + 3 + 1 + 3 and \
        {results._TS.search(p.name).group(1) for p in stamped} == {ts}


def test_notebooks_get_only_declared_parameters(first_run):
    tmp, cfg, notebooks, result = first_run
    paths = results.ModelPaths(result.results_dir / "tiny-a", result.ts)
    detection = results.read_json(paths.detection_json)
    assert detection["spike_threshold"] == 42.0  # the config's value reached the notebook
    assert detection["saw_accuracy_samples"] is False  # not declared by 01: not injected
    assert detection["undeclared_default"] == 7  # nothing to supply: the notebook's default
    record = _analysis(result, "tiny-a")["stages"]
    assert set(record["01_detection"]["parameters"]) == {"model", "output_dir", "run_timestamp",
                                                        "spike_threshold"}
    assert record["02_individual_ablation"]["parameters"]["accuracy_samples"] == 3


def test_bad_model_recorded_and_others_finish(first_run):
    tmp, cfg, notebooks, result = first_run
    assert not result.ok
    assert len(result.failures) == 1 and "missing-model" in result.failures[0]
    bad = _analysis(result, "missing-model")
    assert results.validation_errors(bad) == []
    assert bad["status"] == "failed"
    assert bad["stages"]["resolve"]["status"] == "failed"
    assert "does not exist" in bad["stages"]["resolve"]["error"]
    assert all(bad["stages"][s]["status"] == "skipped" for s in results.MODEL_STAGES)
    assert _analysis(result, "tiny-a")["status"] == "ok"


def test_complete_json_comparison_and_index(first_run):
    tmp, cfg, notebooks, result = first_run
    complete = results.read_json(result.complete_json)
    assert results.validation_errors(complete) == []
    assert complete["status"] == "failed"
    assert [m["slug"] for m in complete["models"]] == ["tiny-a", "missing-model"]
    assert complete["models"][1]["error"].startswith("resolve: ModelLoadError")
    assert complete["stages"]["05_cross_model_comparison"]["status"] == "ok"
    summary = {m["slug"]: m for m in complete["comparison"]["models"]}
    # 2 weights at layers 1 and 2 of 4, both writing row 3; one row shared, no column
    assert [w["relative_depth"] for w in summary["tiny-a"]["super_weights"]] == [0.25, 0.5]
    assert summary["tiny-a"]["shared_rows"] == [{"row": 3, "count": 2, "layers": [1, 2]}]
    assert summary["tiny-a"]["shared_columns"] == []
    assert summary["tiny-a"]["perplexity_ratio"] == 8.0
    assert summary["tiny-a"]["max_individual_perplexity_ratio"] == 3.0
    assert summary["tiny-a"]["accuracy_drops"] == {"hellaswag": 0.25}
    assert summary["missing-model"]["detection_ok"] is False
    assert complete["comparison"]["statistics"]["super_weight_counts"] == {"tiny-a": 2}
    assert (result.results_dir / "summary_plots" / "model_comparison.png").stat().st_size > 10_000
    html = results.RunPaths(result.results_dir, result.ts).report().read_text()
    assert len(FIGURE.findall(html)) == 1
    # not inside a git work tree: the index goes to results_dir/reports
    assert result.index_html == result.results_dir / "reports" / "index.html"
    index = result.index_html.read_text()
    assert f'href="../tiny-a/reports/01_detection_{result.ts}.html"' in index
    assert f'href="05_cross_model_comparison_{result.ts}.html"' in index
    assert "does not exist" in index


def test_html_reports_embed_figures(first_run):
    tmp, cfg, notebooks, result = first_run
    html = results.ModelPaths(result.results_dir / "tiny-a", result.ts).report("01_detection")
    text = html.read_text()
    assert len(FIGURE.findall(text)) == 1  # the one figure the notebook shows
    # the executed notebook, with its injected parameters cell
    assert re.search(r'celltag_injected-parameters.{0,2000}spike_threshold.{0,200}42\.0', text,
                     re.DOTALL)


def _mtimes(root: Path) -> dict[Path, int]:
    """Modification times of the files a stage produces (not the JSON the pipeline rewrites)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and (p.suffix in (".ipynb", ".html", ".png")
                                or p.parent.name == "individual_analyses"
                                or p.name.startswith(("detection_", "combined_")))}


def test_resume_redoes_only_unfinished_work(tmp_path):
    notebooks = stand_in_notebooks(tmp_path / "notebooks")
    results_dir = tmp_path / "results"
    overrides = {"models": [tiny_folder(tmp_path / "m")], "results_dir": str(results_dir)}
    cfg = config.load(overrides=overrides)
    results_dir.mkdir()
    (results_dir / "FAIL_03_combined_ablation").write_text("disk full")
    first = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False))
    assert first.failures == [f"{overrides['models'][0]}: 03_combined_ablation: "
                              "RuntimeError: simulated failure of 03_combined_ablation: disk full"]
    before = _mtimes(results_dir)
    m = results.ModelPaths(results_dir / "m", first.ts)

    # The problem is fixed, and one of 02's files went missing: 01 is kept, 02 and 03 redone.
    (results_dir / "FAIL_03_combined_ablation").unlink()
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


def test_probe_reads_family_without_weights(tmp_path):
    from sw_lib import tiny

    dense = tiny_folder(tmp_path / "dense")
    moe_dir = tmp_path / "moe"
    tiny.tiny_config("qwen2_moe", vocab_size=128).save_pretrained(moe_dir)
    assert pipeline.probe(dense) == ("llama", False)
    assert pipeline.probe(str(moe_dir)) == ("qwen2_moe", True)
    with pytest.raises(Exception, match="does not exist"):
        pipeline.probe(str(tmp_path / "nope"))


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


def test_schema_rejects_broken_documents(first_run):
    tmp, cfg, notebooks, result = first_run
    good = _analysis(result, "tiny-a")
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

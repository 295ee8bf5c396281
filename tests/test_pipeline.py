"""The pipeline's mechanics with real papermill and small stand-in notebooks.

The stand-ins for 01-03 follow the notebook contract (parameters cell, files written under
output_dir, a figure shown) without running a model, so these tests check what the pipeline
itself does -- parameter filtering, the results tree, stage records, failures, resume, HTML
export, the index page -- in seconds. The real notebooks run in tests/test_cli.py. Notebook 05
here is the real one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from sw_lib import config, gguf_header, models, pipeline, reports, results, runner
from sw_lib import stages as stage_table
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
def figure(name, values=(0, 1)):
    (out / "plots").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(); ax.plot(values)
    fig.savefig(out / "plots" / f"{name}_{run_timestamp}.png"); plt.show()
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
figure("detection_iterations", [0, spike_threshold])
figure("super_weight_distribution")
'''),
    "02_individual_ablation": ('model = ""\noutput_dir = ""\nrun_timestamp = ""\n'
                               'accuracy_samples = 1', '''
det = json.loads((out / "data" / f"detection_{run_timestamp}.json").read_text())
for i, w in enumerate(det["super_weights"]):
    write(f"data/individual_analyses/sw_{i}_analysis_{run_timestamp}.json",
          {"index": i, "super_weight": w,
           "perplexity_impact": {"perplexity_ratio": 2.0 + i},
           "accuracy_impacts": {"hellaswag": {"accuracy_drop": 0.1 * (i + 1)}}})
write(f"data/individual_summary_{run_timestamp}.json", {"count": len(det["super_weights"])})
figure("impact_comparison", [1, accuracy_samples])
'''),
    "03_combined_ablation": ('model = ""\noutput_dir = ""\nrun_timestamp = ""', '''
write(f"data/combined_analysis_{run_timestamp}.json",
      {"perplexity_impact": {"baseline_perplexity": 10.0, "modified_perplexity": 80.0,
                             "perplexity_ratio": 8.0, "impact_severity": "severe"},
       "accuracy_impacts": {"hellaswag": {"baseline_accuracy": 0.5, "accuracy_drop": 0.25}}})
figure("combined_analysis")
'''),
    "06_mechanisms": ('model = ""\noutput_dir = ""\nrun_timestamp = ""', '''
write(f"data/mechanisms_{run_timestamp}.json", {"schema": "sw-mechanisms/1"})
figure("super_activation_trace")
'''),
    "07_quantization": ('model = ""\noutput_dir = ""\nrun_timestamp = ""', '''
write(f"data/quantization_{run_timestamp}.json", {"schema": "sw-quantization/1"})
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


def tiny_folder(path: Path, model_type: str = "llama") -> str:
    """A local model folder (config.json and weights) of a tiny random model; the stand-in
    notebooks only read its config."""
    import tiny

    tiny.tiny_model(model_type, vocab_size=128).save_pretrained(path)
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
        ["ok", "ok", "ok", "failed", "skipped", "ok", "ok"]
    assert stages["04_moe_routing"]["reason"] == "not a mixture-of-experts model"
    assert stages["01_detection"]["outputs"] == [
        f"data/detection_{first.ts}.json", f"plots/detection_iterations_{first.ts}.png",
        f"plots/super_weight_distribution_{first.ts}.png"]
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
    for kept in (m.notebook("01_detection"), m.detection_json, m.plot("detection_iterations")):
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
    record = runner.execute(tmp_path / "03_combined_ablation.ipynb", tmp_path / "out.ipynb",
                              None, {}, tmp_path)
    assert record["status"] == "failed" and "03_combined_ablation.ipynb not found" in record["error"]


def test_moe_model_gets_the_moe_stage(tmp_path, monkeypatch):
    """A qwen2_moe config routes to 04_moe_routing, whose file lands in the analysis; the
    other notebooks are absent here, so those stages fail fast and 02/03 are skipped.
    The model is given as a relative path: the kernel (running elsewhere) still finds it."""
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
figure("moe_analysis")
figure("super_experts_skipped")
''', "04_moe_routing"), str(notebooks / "04_moe_routing.ipynb"))

    tiny_folder(tmp_path / "moe", "qwen2_moe")
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


def test_inspect_reads_family_without_loading_weights(tmp_path):
    dense = tiny_folder(tmp_path / "dense")
    moe_dir = tiny_folder(tmp_path / "moe", "qwen2_moe")
    info = models.inspect(dense)
    assert (info.source, info.family, info.is_moe) == ("folder", "llama", False)
    assert (models.inspect(moe_dir).family, models.inspect(moe_dir).is_moe) == ("qwen2_moe", True)
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.inspect(str(tmp_path / "nope"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(Exception, match="Unsupported architecture 'bert'"):
        models.inspect(str(tmp_path / "bert"))
    (tmp_path / "dense" / "model.safetensors").unlink()
    with pytest.raises(models.ModelLoadError, match="has a config.json but no weights"):
        models.inspect(dense)


def write_gguf(path: Path, arch: str = "qwen2moe", experts: int = 4) -> Path:
    """A small real GGUF file: metadata with tokenizer arrays, and two tensors."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5])
    writer.add_expert_count(experts)
    writer.add_string("general.name", "tiny")
    writer.add_tensor("x", np.zeros((2, 2), dtype=np.float32))
    writer.add_tensor("y", np.ones((64, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_header_and_its_size_against_the_tensor_table(tmp_path):
    """The header's architecture and expert count past the tokenizer arrays; the tensor table
    gives the exact size the file must have, so a truncated file is refused in one line."""
    path = write_gguf(tmp_path / "moe.gguf")
    header = gguf_header.check(path)
    assert header.metadata == {"general.architecture": "qwen2moe", "qwen2moe.expert_count": 4,
                               "general.name": "tiny"}
    assert [(t.name, t.shape) for t in header.tensors] == [("x", (2, 2)), ("y", (8, 64))]
    assert header.expected_size == path.stat().st_size  # the last tensor ends the file
    info = models.inspect(str(path))
    assert (info.source, info.family, info.is_moe) == ("gguf", "qwen2_moe", True)

    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1])  # one byte short of the last tensor
    with pytest.raises(models.ModelLoadError, match=rf"Model file '{cut}' is truncated: its "
                       rf"tensors need {len(data)} bytes, the file has {len(data) - 1}"):
        models.inspect(str(cut))
    cut.write_bytes(data[:40])  # inside the metadata
    with pytest.raises(models.ModelLoadError, match=r"is truncated: its header ends early"):
        models.inspect(str(cut))
    fake = tmp_path / "notes.gguf"
    fake.write_text("these are my notes")
    with pytest.raises(models.ModelLoadError, match=r"is not a GGUF file \(it starts with b'thes'"):
        models.inspect(str(fake))
    try:  # the default alias, when its package is installed
        models.resolve("smollm2-135m")
    except models.ModelLoadError:
        return
    assert models.inspect("smollm2-135m").family == "llama"


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


# --- runs never overwrite each other; the folder lock; resume; timeouts ----------------------


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_a_run_writes_only_its_results_folder_not_another_repositorys_reports(tmp_path):
    """Results inside some other git repository: the index goes to <results>/reports, the
    other repository's reports/index.html stays as it was; nothing is written elsewhere."""
    notebooks = stand_in_notebooks(tmp_path / "notebooks")
    model = tiny_folder(tmp_path / "m")
    other = tmp_path / "other-repo"
    (other / ".git").mkdir(parents=True)
    (other / "reports").mkdir()
    (other / "reports" / "index.html").write_text("theirs")
    before = _files(tmp_path)
    cfg = config.load(overrides={"models": [model], "results_dir": str(other / "results")})
    result = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks))
    assert result.ok and result.index_html == other / "results" / "reports" / "index.html"
    assert (other / "reports" / "index.html").read_text() == "theirs"
    changed = [p for p, m in _files(tmp_path).items() if before.get(p) != m]
    assert changed and all(p.is_relative_to(other / "results") for p in changed), changed
    assert reports.default_reports_dir(REPO / "results") == REPO / "reports"  # this project's


def test_runs_in_one_folder_never_share_a_file_and_the_folder_is_locked(tmp_path, caplog):
    from sw_lib.runlock import RunLock

    notebooks = stand_in_notebooks(tmp_path / "notebooks")
    results_dir = tmp_path / "results"
    cfg = config.load(overrides={"models": [tiny_folder(tmp_path / "m")],
                                 "results_dir": str(results_dir)})
    options = pipeline.Options(notebooks_dir=notebooks, html=False)
    # Another live run holds the folder: refused at once, in one line naming it.
    with RunLock(results_dir):
        with pytest.raises(pipeline.InputError, match=rf"^results folder '{results_dir}' is in "
                           rf"use by another run \(pid {os.getpid()} on "):
            pipeline.run(cfg, options)
    # A lock file left by a run that was killed: stale, taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (results_dir / ".sw-analyze.lock").write_text(json.dumps({"pid": dead.pid, "host": "h"}))
    caplog.set_level(logging.INFO, logger="sw_lib")
    first = pipeline.run(cfg, options)
    assert first.ok and f"took over a stale lock of pid {dead.pid}" in caplog.text
    first_files = _files(results_dir)
    second = pipeline.run(cfg, options)  # started within the same second, most likely
    assert second.ok and second.ts > first.ts
    after = _files(results_dir)
    assert {p: after[p] for p in first_files if p.name != ".sw-analyze.lock"} == \
        {p: m for p, m in first_files.items() if p.name != ".sw-analyze.lock"}
    for ts in (first.ts, second.ts):
        m = results.ModelPaths(results_dir / "m", ts)
        assert all(m.plot(f).is_file() for f in ("detection_iterations", "impact_comparison",
                                                 "combined_analysis"))
        assert results.RunPaths(results_dir, ts).comparison_png.is_file()


def test_resume_a_named_run_reruns_a_changed_notebook_from_a_clean_slate(tmp_path, caplog):
    """--resume TS resumes that run (not the newest); 01's notebook changed, so 01 reruns and
    finds one weight instead of two; 02 reruns after its old files are removed, so the
    analysis holds one individual result, not the stale second one."""
    notebooks = stand_in_notebooks(tmp_path / "notebooks")
    results_dir = tmp_path / "results"
    cfg = config.load(overrides={"models": [tiny_folder(tmp_path / "m")],
                                 "results_dir": str(results_dir)})
    options = pipeline.Options(notebooks_dir=notebooks, html=False)
    older = pipeline.run(cfg, options)
    newer = pipeline.run(cfg, options)
    newer_files = {p: m for p, m in _files(results_dir).items() if newer.ts in p.name}
    m = results.ModelPaths(results_dir / "m", older.ts)
    assert len(_analysis(older, "m")["individual"]) == 2 and m.individual_json(1).is_file()

    detection = notebooks / "01_detection.ipynb"
    nb = nbformat.read(str(detection), as_version=4)
    second_weight = '{"layer": 2, "row": 3, "column": 9, "expert": None, "shared": False}'
    assert second_weight in nb.cells[1].source
    nb.cells[1].source = nb.cells[1].source.replace(second_weight, "")
    nbformat.write(nb, str(detection))
    resumed = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False,
                                                 resume=older.ts))
    assert resumed.ok and resumed.ts == older.ts
    analysis = _analysis(resumed, "m")
    assert not any(analysis["stages"][s].get("reused") for s in results.MODEL_STAGES[:3])
    assert [a["index"] for a in analysis["individual"]] == [0]
    assert not m.individual_json(1).exists()
    assert {p: m_ for p, m_ in _files(results_dir).items() if newer.ts in p.name} == newer_files

    caplog.set_level(logging.INFO, logger="sw_lib")
    latest = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False, resume=True))
    assert latest.ts == newer.ts
    assert f"resuming run {newer.ts} (the newest of 2 in {results_dir})" in caplog.text
    stages_ = _analysis(latest, "m")["stages"]
    assert stages_["01_detection"].get("reused") is None  # its notebook changed since
    assert stages_["03_combined_ablation"].get("reused") is None


def test_a_stuck_notebook_fails_its_stage_at_the_timeout_and_the_run_goes_on(tmp_path):
    notebooks = stand_in_notebooks(tmp_path / "notebooks")
    combined = notebooks / "03_combined_ablation.ipynb"
    nb = nbformat.read(str(combined), as_version=4)
    nb.cells[1].source = "import time\nwhile True:\n    time.sleep(1)\n"
    nbformat.write(nb, str(combined))
    cfg = config.load(overrides={"models": [tiny_folder(tmp_path / "m")],
                                 "results_dir": str(tmp_path / "results"),
                                 "runtime.stage_timeout": 20})
    start = time.monotonic()
    result = pipeline.run(cfg, pipeline.Options(notebooks_dir=notebooks, html=False))
    assert time.monotonic() - start < 120
    stages_ = _analysis(result, "m")["stages"]
    assert stages_["03_combined_ablation"]["status"] == "failed"
    assert stages_["03_combined_ablation"]["error"] == (
        "StageTimeout: stopped after 20 s (runtime.stage_timeout); raise it or set it to null")
    assert 20 <= stages_["03_combined_ablation"]["seconds"] < 60
    assert [stages_[s]["status"] for s in results.MODEL_STAGES[:2]] == ["ok", "ok"]
    complete = results.read_json(result.complete_json)
    assert complete["stages"][stage_table.RUN_STAGES[0]]["status"] == "ok"  # the run went on


def test_stage_table_drives_layout_and_contract(tmp_path):
    """Every declared file maps to one path with the run timestamp; clear() removes exactly a
    stage's files of this run, indexed ones included, and nothing of another run."""
    paths = results.ModelPaths(tmp_path, "20250101_000000")
    other = results.ModelPaths(tmp_path, "20250101_000001")
    for stage in stage_table.STAGES:
        assert stage.name in stage_table.MODEL_STAGES + stage_table.RUN_STAGES
        for out in stage.writes:
            assert "20250101_000000" in paths.output(out, 0).name
    for p in (paths.individual_json(0), paths.individual_json(7), other.individual_json(0),
              paths.individual_summary_json, paths.detection_json, paths.plot("impact_comparison")):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
    assert paths.missing("02_individual_ablation") == []
    removed = paths.clear("02_individual_ablation")
    assert sorted(removed) == sorted([paths.individual_json(0), paths.individual_json(7),
                                      paths.individual_summary_json,
                                      paths.plot("impact_comparison")])
    assert other.individual_json(0).is_file() and paths.detection_json.is_file()
    assert paths.missing("02_individual_ablation") == [paths.individual_summary_json,
                                                       paths.plot("impact_comparison")]
    assert not stage_table.stage("04_moe_routing").applies(False)
    assert stage_table.stage("04_moe_routing").applies(True)

"""`sw-analyze` end to end: real notebooks on tiny models with planted super weights, an
interrupted run resumed, and the checks that stop a run before it starts (flags, models,
folders) with one line and nothing written."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sw_lib import cli, results, stages

import tiny

REPO = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r'<img [^>]*src="data:image/png;base64,')
PLANTED = {"tiny-llama": ("llama", 1, 7, 11), "tiny-qwen2": ("qwen2", 2, 20, 30)}
TINY_RUN = ["--perplexity-samples", "1", "--seq-len", "32", "--accuracy-samples", "2",
            "--accuracy-tasks", "arc_easy", "--no-confirm", "--max-iterations", "3",
            "--restore-tasks", "--scaling-factors", "0", "1", "2", "--weight-bits", "4",
            "--block-sizes", "tensor", "--device", "cpu", "--dtype", "float32", "-q"]


@pytest.fixture(scope="module")
def tiny_specs(tmp_path_factory, tokenizer, prompt_ids):
    """Two tiny models (llama, qwen2), each with one planted super weight, saved as folders."""
    tmp = tmp_path_factory.mktemp("models")
    specs = []
    for name, (model_type, layer, row, column) in PLANTED.items():
        model = tiny.tiny_model(model_type, vocab_size=len(tokenizer), seed=1)
        tiny.plant_super_weight(model, layer, row, column, prompt_ids)
        specs.append(str(tiny.save_tiny(model, tokenizer, tmp / name)))
    return specs


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_specs):
    """sw-analyze over the two tiny models with the real notebooks."""
    tmp = tmp_path_factory.mktemp("cli")
    results_dir = tmp / "results"
    with pytest.MonkeyPatch.context() as env:
        # Tiny models run faster on one thread; the notebook kernels inherit this.
        env.setenv("OMP_NUM_THREADS", "1")
        code = cli.main(["--models", *tiny_specs, "--results-dir", str(results_dir),
                         "--cache-dir", str(tmp / "eval-cache"), *TINY_RUN])
    ts = results.latest_timestamp(results_dir)
    return code, results_dir, ts


def test_every_stage_notebook_exists():
    """The end-to-end tests below run every stage's real notebook: none may be missing."""
    missing = [s.notebook for s in stages.STAGES if not (REPO / "notebooks" / s.notebook).is_file()]
    assert missing == []


@pytest.mark.timeout(900)  # the module's sw-analyze run (7 stages x 2 models) is set up here
def test_two_models_whole_tree(cli_run):
    code, root, ts = cli_run
    assert code == 0
    assert (root / f"complete_analysis_{ts}.json").is_file()
    assert results.RunPaths(root, ts).comparison_png.stat().st_size > 10_000
    for slug in PLANTED:
        m = results.ModelPaths(root / slug, ts)
        expected = [m.analysis_json, m.detection_json, m.combined_json, m.individual_json(0),
                    m.individual_summary_json, m.log_file, *(m.plot(f) for f in (
                        "detection_iterations", "super_weight_distribution",
                        "impact_comparison", "combined_analysis"))]
        expected += [m.notebook(s) for s in results.MODEL_STAGES[:3]]
        expected += [m.report(s) for s in results.MODEL_STAGES[:3]]
        missing = [str(p.relative_to(root)) for p in expected if not p.is_file()]
        assert not missing, missing
    # every file the run wrote carries its timestamp (figures included), except the lock
    # and the index pages that cover every run
    written = [p for p in root.rglob("*") if p.is_file()]
    unstamped = [str(p.relative_to(root)) for p in written if not results._TS.search(p.name)]
    assert sorted(unstamped) == [".sw-analyze.lock", "reports/.sw-index.lock",
                                 "reports/index.html", "reports/runs.json"]


def test_json_valid_and_planted_weights_found(cli_run):
    code, root, ts = cli_run
    complete = results.read_json(root / f"complete_analysis_{ts}.json")
    assert results.validation_errors(complete) == []
    assert complete["status"] == "ok" and [m["slug"] for m in complete["models"]] == list(PLANTED)
    summaries = {m["slug"]: m for m in complete["comparison"]["models"]}
    for slug, (model_type, layer, row, column) in PLANTED.items():
        analysis = results.read_json(results.ModelPaths(root / slug, ts).analysis_json)
        assert results.validation_errors(analysis) == []
        assert analysis["family"] == model_type and analysis["status"] == "ok"
        found = [(w["layer"], w["row"], w["column"]) for w in analysis["detection"]["super_weights"]]
        assert found == [(layer, row, column)]
        assert analysis["resolved_runtime"] == {"dtype": "float32", "device": "cpu"}
        cfg = analysis["config"]
        assert cfg["evaluation"]["accuracy_tasks"] == ["arc_easy"]
        assert cfg["detection"]["confirm"] is False and cfg["runtime"]["dtype"] == "float32"
        # the combined ablation's numbers are what the comparison reports
        ratio = analysis["combined"]["perplexity_impact"]["perplexity_ratio"]
        assert ratio is not None and summaries[slug]["perplexity_ratio"] == ratio
        assert summaries[slug]["super_weights"][0]["relative_depth"] == layer / 4
        assert set(summaries[slug]["accuracy_drops"]) == {"arc_easy"}


def test_html_reports_contain_figures_and_index_links_them(cli_run):
    code, root, ts = cli_run
    figures = {"01_detection": 2, "02_individual_ablation": 1, "03_combined_ablation": 1}
    for slug in PLANTED:
        m = results.ModelPaths(root / slug, ts)
        for stage, n in figures.items():
            assert len(FIGURE.findall(m.report(stage).read_text())) >= n, (slug, stage)
    comparison = results.RunPaths(root, ts).report().read_text()
    assert len(FIGURE.findall(comparison)) == 1
    index = (root / "reports" / "index.html").read_text()
    for slug in PLANTED:
        assert f'href="../{slug}/reports/03_combined_ablation_{ts}.html"' in index


@pytest.mark.parametrize("argv, message", [
    (["--spike-threshold", "-1"], "--spike-threshold: must be a number > 0, got -1.0"),
    (["--spike-threshold", "abc"], "argument --spike-threshold: invalid float value: 'abc'"),
    (["--max-iterations", "0"], "--max-iterations: must be an integer >= 1, got 0"),
    (["--accuracy-samples", "-3"], "--accuracy-samples: must be an integer >= 1 or null (all)"),
    (["--perplexity-samples", "many"], "argument --perplexity-samples: invalid count: 'many'"),
    (["--accuracy-tasks", "hellaswag", "winogrande"],
     "--accuracy-tasks: must be a list of tasks from: hellaswag arc_easy arc_challenge mmlu "
     "gsm8k (unknown: winogrande)"),
    (["--p-active-floor", "2"], "--p-active-floor: must be a number in [0, 1], got 2.0"),
    (["--router-analysis-samples", "-1"], "--router-analysis-samples: must be an integer >= 1"),
    (["--dtype", "fp8"], "--dtype: must be one of auto, float32, float16, bfloat16, got 'fp8'"),
    (["--device", "tpu"], "--device: must be one of auto, cpu, cuda, cuda:N, mps, got 'tpu'"),
    (["--mmlu-shots", "9"], "--mmlu-shots: must be an integer between 0 and 5, got 9"),
    (["--params", "/nonexistent/p.yaml"], "Params file '/nonexistent/p.yaml' does not exist"),
    (["--models"], "argument --models: expected at least one argument"),
    (["-v", "-q"], "argument -q/--quiet: not allowed with argument -v/--verbose"),
])
def test_invalid_flags_are_rejected_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv + ["--print-config"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_yaml_errors_name_the_field_and_flags_override_yaml(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("detection:\n  max_iterations: -2\n")
    with pytest.raises(SystemExit):
        cli.main(["--params", str(params), "--print-config"])
    assert f"{params}: detection.max_iterations: must be an integer >= 1, got -2" in \
        capsys.readouterr().err
    # the flag wins over the file, so the same file is fine with --max-iterations
    assert cli.main(["--params", str(params), "--max-iterations", "4", "--print-config"]) == 0
    assert "max_iterations: 4" in capsys.readouterr().out
    params.write_text("models: [a]\nevaluation:\n  accuracy_samples: 7\n")
    args = cli.build_parser().parse_args(["--params", str(params), "--accuracy-samples", "all",
                                          "--skip-perplexity", "--models", "b", "c"])
    cfg = cli.load_config(args)
    assert cfg["models"] == ["b", "c"] and cfg["evaluation"]["accuracy_samples"] is None
    assert cfg["evaluation"]["skip_perplexity"] is True
    assert cfg["evaluation"]["skip_accuracy"] is False  # not given: the default stays


def test_every_config_field_has_a_flag():
    from sw_lib import config

    assert set(cli.FIELDS.values()) == set(config.RULES)
    parser = cli.build_parser()
    for original in ("--models", "--spike-threshold", "--max-iterations", "--perplexity-samples",
                     "--accuracy-samples", "--accuracy-tasks", "--results-dir",
                     "--skip-perplexity", "--skip-accuracy", "--verbose", "--quiet",
                     "--router-analysis-samples", "--p-active-floor", "--co-spike-threshold",
                     "--confirm", "--params", "--device", "--dtype", "--resume"):
        assert original in parser._option_string_actions, original


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "sw_lib", "--models", "x", "--print-config"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and "models: [x]" in out.stdout


def test_peak_memory_of_each_model_is_recorded(cli_run):
    """Issue 9: each stage records its kernel's peak resident memory, the analysis JSON the
    largest (a kernel with torch and transformers loaded holds well over 100 MiB)."""
    code, root, ts = cli_run
    for slug in PLANTED:
        analysis = results.read_json(results.ModelPaths(root / slug, ts).analysis_json)
        ran = {name: s for name, s in analysis["stages"].items() if s.get("notebook")}
        assert set(ran) == set(results.MODEL_STAGES) - {"04_moe_routing"}
        assert all(100 < s["peak_memory_mib"] < 20_000 for s in ran.values())
        peak = analysis["peak_memory"]
        assert peak["mib"] == max(s["peak_memory_mib"] for s in ran.values())
        assert ran[peak["stage"]]["peak_memory_mib"] == peak["mib"]
        log = results.ModelPaths(root / slug, ts).log_file.read_text()
        assert f"{slug}: peak memory {peak['mib']:.0f} MiB ({peak['stage']})" in log


# --- bad input: one line, exit 2, nothing written ------------------------------------------


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sw-analyze: error: "), err
    return err.strip().removeprefix("sw-analyze: error: ")


def _gguf_file(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bad_models(tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (model spec, the line the user sees)."""
    truncated = _gguf_file(tmp / "truncated.gguf")
    full = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (tmp / "notes.txt").write_text("not a model")
    (tmp / "empty").mkdir()
    return {
        "typo alias": ("smollm-135m", "Unknown model alias 'smollm-135m'; known aliases: "
                       "gemma3-270m, smollm2-135m; or give a Hugging Face id 'org/name', a local folder or "
                       "a .gguf file"),
        "missing file": (str(tmp / "gone.gguf"), f"Model file or folder '{tmp}/gone.gguf' "
                         "does not exist"),
        "truncated gguf": (str(truncated), f"Model file '{truncated}' is truncated: its "
                           f"tensors need {full} bytes, the file has {full - 100}; download "
                           "it again"),
        "not a model": (str(tmp / "notes.txt"), f"Model path '{tmp}/notes.txt' is neither a "
                        ".gguf file nor a folder with config.json"),
        "empty folder": (str(tmp / "empty"), f"Model path '{tmp}/empty' is neither a .gguf "
                         "file nor a folder with config.json"),
        "hub id offline": ("nobody/no-such-model", "Model 'nobody/no-such-model': the Hugging "
                           "Face Hub cannot be reached and the model is not in the local cache"),
    }


@pytest.mark.parametrize("case", ["typo alias", "missing file", "truncated gguf", "not a model",
                                  "empty folder", "hub id offline"])
def test_a_bad_model_anywhere_in_the_list_stops_the_run_before_any_work(
        case, tiny_specs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec, line = _bad_models(tmp_path)[case]
    results_dir = tmp_path / "results"
    start = time.perf_counter()
    message = _refused(["--models", *tiny_specs, spec, "--results-dir", str(results_dir),
                        "--reports-dir", str(tmp_path / "reports")], capsys)
    assert message.startswith(line), message
    assert time.perf_counter() - start < 20  # no retries, no model loaded, no stage run
    assert not results_dir.exists() and not (tmp_path / "reports").exists()


def test_unwritable_results_or_reports_folder_is_refused(tiny_specs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = _refused(["--models", tiny_specs[0], "--results-dir", str(blocker / "results")],
                       capsys)
    assert message == (f"results folder '{blocker}/results' cannot be created: '{blocker}' is "
                       "a file; choose another with --results-dir")
    message = _refused(["--models", tiny_specs[0], "--results-dir", str(tmp_path / "r"),
                        "--reports-dir", str(blocker / "reports")], capsys)
    assert message.startswith(f"reports folder '{blocker}/reports' cannot be created")
    assert not (tmp_path / "r").exists()
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        message = _refused(["--models", tiny_specs[0], "--results-dir", str(locked / "r")], capsys)
        assert message.startswith(f"results folder '{locked}/r' is not writable")


def test_resume_of_an_unknown_run_is_refused(tiny_specs, tmp_path, capsys):
    (tmp_path / "r" / "logs").mkdir(parents=True)
    (tmp_path / "r" / "logs" / "run_20250101_000000.log").write_text("")
    base = ["--models", tiny_specs[0], "--results-dir", str(tmp_path / "r")]
    assert _refused([*base, "--resume", "20250101_000001"], capsys) == (
        f"--resume: no run 20250101_000001 in '{tmp_path / 'r'}' (newest runs: 20250101_000000)")
    assert _refused([*base, "--resume", "yesterday"], capsys) == (
        "--resume: 'yesterday' is not a run timestamp (YYYYMMDD_HHMMSS)")


def test_help_shows_the_defaults_of_params_default_yaml(capsys):
    """One source of defaults: every flag's help ends with its value in params/default.yaml."""
    from sw_lib import config

    defaults = config.defaults()
    parser = cli.build_parser()
    for action in parser._actions:
        dotted = cli.FIELDS.get(action.dest)
        if dotted is None:
            continue
        value = defaults
        for key in dotted.split("."):
            value = value[key]
        if value is None:
            assert "(default: " in action.help or "default" not in action.help, action.dest
            continue
        shown = (" ".join(map(str, value)) if isinstance(value, list)
                 else ("on" if value else "off") if isinstance(value, bool) else str(value))
        assert action.help.endswith(f"(default: {shown})"), (action.dest, action.help)
        assert action.help.count("default") == 1, action.help  # not written twice


# --- interrupting and resuming --------------------------------------------------------------


_VOLATILE = {"updated", "started", "seconds", "peak_memory_mib", "peak_memory", "reused",
             "timing", "load_seconds", "versions"}


def _normalized(doc, replace: dict[str, str]):
    """A JSON document without what differs between two runs of the same analysis: times,
    memory, and the run's own folder and timestamp in paths."""
    if isinstance(doc, dict):
        return {k: _normalized(v, replace) for k, v in doc.items()
                if k not in _VOLATILE and not k.endswith("_seconds")}
    if isinstance(doc, list):
        return [_normalized(v, replace) for v in doc]
    if isinstance(doc, str):
        for old, new in replace.items():
            doc = doc.replace(old, new)
    return doc


def _documents(root: Path, ts: str, cache: str) -> dict:
    replace = {str(root): "<results>", ts: "<ts>", cache: "<cache>"}
    docs = {"complete": results.read_json(root / f"complete_analysis_{ts}.json")}
    for slug in PLANTED:
        docs[slug] = results.read_json(results.ModelPaths(root / slug, ts).analysis_json)
    return _normalized(docs, replace)


@pytest.mark.timeout(900)
def test_interrupted_run_resumed_gives_the_same_json(cli_run, tiny_specs, tmp_path):
    """Ctrl-C (SIGINT to the process group, kernel included) while 02 runs on the first model,
    then --resume: the JSON equals the uninterrupted run's (times and paths aside)."""
    code, reference_root, reference_ts = cli_run
    root, cache = tmp_path / "results", str(tmp_path / "eval-cache")
    argv = [sys.executable, "-m", "sw_lib", "--models", *tiny_specs, "--results-dir", str(root),
            "--cache-dir", cache, *TINY_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # SIGINT as in a terminal: a suite started in the background (CI, `cmd &`) inherits SIGINT
    # ignored, and an ignored signal stays ignored in the child, so Ctrl-C would never arrive.
    run = subprocess.Popen(argv, cwd=tmp_path, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stage_notebook = root / "tiny-llama" / "notebooks"
    deadline = time.monotonic() + 300
    while not list(stage_notebook.glob("02_individual_ablation_*.ipynb")):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.2)
    time.sleep(2)  # inside the notebook
    os.killpg(run.pid, signal.SIGINT)
    # generous: the run records the interruption, kills the kernel and exports the pages first
    out, err = run.communicate(timeout=300)
    assert run.returncode == 130, (out, err)
    assert "interrupted; rerun with --resume to continue" in err
    ts = results.latest_timestamp(root)
    interrupted = results.read_json(results.ModelPaths(root / "tiny-llama", ts).analysis_json)
    assert interrupted["stages"]["01_detection"]["status"] == "ok"
    assert interrupted["stages"]["02_individual_ablation"] == {
        "status": "failed", "error": "interrupted", "seconds": None}

    resumed = subprocess.run([*argv, "--resume"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    analysis = results.read_json(results.ModelPaths(root / "tiny-llama", ts).analysis_json)
    assert analysis["stages"]["01_detection"]["reused"] is True
    assert "reused" not in analysis["stages"]["02_individual_ablation"]
    assert _documents(root, ts, cache) == _documents(reference_root, reference_ts,
                                                     str(reference_root.parent / "eval-cache"))
